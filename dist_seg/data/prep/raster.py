"""Rasterise COCO instances into semantic label maps under the overlap and crowd policies (docs/design.md §1).

The converter, the EDA and the tests' expectations all go through these functions, so a policy means the
same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from dist_seg.data import IGNORE_INDEX
from dist_seg.data.prep.coco import OVERLAP_POLICIES, ImageEntry, _is_int


@dataclass
class Instance:
    mask: np.ndarray  # bool [H, W]
    cls: int
    area: int
    ann_id: Any
    pos: int  # position in the json's annotation list
    crowd: bool


def decode_mask(seg: Any, height: int, width: int) -> np.ndarray:
    """Bool [H, W] mask of a checked segmentation (polygon parts merged, RLE decoded)."""
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    else:
        rle = seg
    return mask_utils.decode(rle).astype(bool)


def decode_instances(entry: ImageEntry) -> list[Instance]:
    out = []
    for a in entry.anns:
        m = decode_mask(a["segmentation"], entry.height, entry.width)
        out.append(Instance(m, a["cls"], int(m.sum()), a["id"], a["pos"], a["crowd"]))
    return out


def _id_rank(ann_id: Any) -> tuple[int, Any]:
    # ids may be ints or strings; order ints numerically, then strings, then missing ids
    if _is_int(ann_id):
        return (0, ann_id)
    return (1, str(ann_id)) if ann_id is not None else (2, "")


def paint_order(instances: list[Instance], policy: str) -> list[Instance]:
    """Instances in the order they are painted (later ones end on top)."""
    if policy in ("area", "ignore"):
        return sorted(instances, key=lambda i: (-i.area, _id_rank(i.ann_id), i.pos))
    if policy == "order":
        return sorted(instances, key=lambda i: i.pos)
    if policy == "max-class":
        return sorted(instances, key=lambda i: (i.cls, i.pos))
    raise ValueError(f"unknown overlap policy {policy!r}; choose from {', '.join(OVERLAP_POLICIES)}")


def rasterise(
    instances: list[Instance], height: int, width: int, policy: str, crowd: str = "include"
) -> np.ndarray:
    """uint8 [H, W] label map: 0 background, class indices, 255 ignore."""
    label = np.zeros((height, width), np.uint8)
    regular = [i for i in instances if not (i.crowd and crowd == "ignore")]
    for inst in paint_order(regular, policy):
        label[inst.mask] = inst.cls
    if policy == "ignore":
        label[class_count(regular, height, width) >= 2] = IGNORE_INDEX
    if crowd == "ignore":
        covered = np.zeros((height, width), bool)
        for inst in regular:
            covered |= inst.mask
        for inst in instances:
            if inst.crowd:
                label[inst.mask & ~covered] = IGNORE_INDEX
    return label


def class_count(instances: list[Instance], height: int, width: int) -> np.ndarray:
    """Per pixel, how many different classes claim it."""
    unions: dict[int, np.ndarray] = {}
    for inst in instances:
        if inst.cls in unions:
            unions[inst.cls] |= inst.mask
        else:
            unions[inst.cls] = inst.mask.copy()
    count = np.zeros((height, width), np.uint8)
    for m in unions.values():
        count += m
    return count


def instance_count(instances: list[Instance], height: int, width: int) -> np.ndarray:
    count = np.zeros((height, width), np.uint16)
    for inst in instances:
        count += inst.mask
    return count


def iter_labelled(
    entries: Iterable[ImageEntry], policy: str, crowd: str
) -> Iterable[tuple[ImageEntry, list[Instance], np.ndarray]]:
    """(entry, instances, label map) per entry; a convenience for analyses that don't read images."""
    for e in entries:
        inst = decode_instances(e)
        yield e, inst, rasterise(inst, e.height, e.width, policy, crowd)
