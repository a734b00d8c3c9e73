"""Read and validate COCO instances datasets (image files: dist_seg.data.prep.images; rasterisation:
dist_seg.data.prep.raster).

The converter and the EDA share everything here, so both report bad input with the same reasons and the same
wording.

Validation happens in two places: `index_dataset` checks everything the json alone can tell (ids, categories,
polygons, RLE sizes) and `read_image` checks the image file. Each problem is a `Problem` with a reason code from
`REASONS`; callers count them and, in strict mode, stop at the first one.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

OVERLAP_POLICIES = ("area", "order", "max-class", "ignore")
CROWD_POLICIES = ("include", "ignore", "skip")
MAX_CLASSES = 255  # 0..254 are class indices; 255 is the ignore label

# reason code -> what it means. Manifests, summaries and EDA reports use these codes.
REASONS: dict[str, str] = {
    "bad_image_entry": "image entry lacks a valid id, file_name, width or height",
    "duplicate_image_id": "image id already used by an earlier image entry (the later entry is dropped)",
    "bad_key": "image id cannot be a shard key (keys may hold only letters, digits, '_' and '-')",
    "missing_image_file": "image file not found",
    "unreadable_image": "image file cannot be decoded (unreadable or truncated)",
    "size_mismatch": "image size differs from the json's width/height after EXIF orientation",
    "bad_annotation_entry": "annotation is not an object, or its id, image_id or iscrowd has the wrong type",
    "duplicate_annotation_id": "annotation id already used by an earlier annotation (the later one is dropped)",
    "missing_image_id": "annotation refers to an image id that has no (valid) image entry",
    "unknown_category": "annotation category_id is not in categories",
    "empty_segmentation": "annotation has no usable segmentation",
    "bad_polygon": "polygon with fewer than 3 points, an odd number of coordinates or non-numbers",
    "bad_rle": "RLE segmentation is malformed",
    "rle_size_mismatch": "RLE size differs from the image's height/width",
}

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_BACKGROUND_NAMES = {"background", "_background_", "__background__", "bg"}


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str


class Report:
    """Counts problems by reason; in strict mode the first problem raises ValueError with its message."""

    def __init__(
        self, strict: bool = False, warn: Callable[[str], None] | None = None, max_warnings: int = 20
    ):
        self.strict = strict
        self.dropped: Counter[str] = Counter()
        self.repaired: Counter[str] = Counter()
        self.remapped: Counter[str] = Counter()
        self._warn = warn
        self._max_warnings = max_warnings

    def problem(self, p: Problem) -> None:
        assert p.reason in REASONS, p.reason
        if self.strict:
            raise ValueError(f"[{p.reason}] {p.message}")
        self.dropped[p.reason] += 1
        if self._warn is not None:
            n = self.dropped[p.reason]
            if n <= self._max_warnings:
                self._warn(f"skipped [{p.reason}] {p.message}")
            elif n == self._max_warnings + 1:
                self._warn(f"... further [{p.reason}] problems are counted but not printed")

    def summary(self) -> str:
        parts = []
        for title, counter in (
            ("dropped", self.dropped),
            ("repaired", self.repaired),
            ("remapped", self.remapped),
        ):
            if counter:
                parts.append(f"{title}: " + ", ".join(f"{k}={v}" for k, v in sorted(counter.items())))
        return "; ".join(parts) if parts else "no problems found"


def load_coco(path: str | Path) -> dict[str, Any]:
    """Load an instances json; ValueError naming the file when it is not valid json or not COCO instances."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"COCO json not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid json: {e}") from e
    if not isinstance(coco, dict):
        raise ValueError(f"{path} is not a COCO instances json: the top level is not an object")
    for key in ("images", "categories"):
        if not isinstance(coco.get(key), list):
            raise ValueError(f"{path} is not a COCO instances json: '{key}' is missing or not a list")
    if "annotations" in coco and not isinstance(coco["annotations"], list):
        raise ValueError(f"{path} is not a COCO instances json: 'annotations' is not a list")
    for i, cat in enumerate(coco["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise ValueError(
                f"{path}: categories[{i}] needs an integer 'id' and a string 'name', got {cat!r}"
            )
    ids = [c["id"] for c in coco["categories"]]
    dup = [i for i, n in Counter(ids).items() if n > 1]
    if dup:
        raise ValueError(f"{path}: duplicate category ids {sorted(dup)}")
    return coco


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_id(v: Any) -> bool:
    return _is_int(v) or isinstance(v, str)


def is_background_name(name: str) -> bool:
    return name.strip().lower() in _BACKGROUND_NAMES


@dataclass(frozen=True)
class ClassMap:
    """Contiguous class indices: 0 = background, then categories in ascending COCO id (or --classes order)."""

    names: tuple[str, ...]
    category_ids: tuple[int | None, ...]  # COCO id per index; None for an implicit background
    index_of: dict[int, int]  # COCO category id -> class index, for the categories that are kept
    known_ids: frozenset[int]  # every category id in the json

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {"index": i, "name": n, "category_id": c}
            for i, (n, c) in enumerate(zip(self.names, self.category_ids, strict=True))
        ]


def build_class_map(categories: list[dict[str, Any]], classes: list[str] | None = None) -> ClassMap:
    """Map COCO categories to class indices. `classes` keeps a named subset in that order (others -> dropped)."""
    cats = sorted(categories, key=lambda c: c["id"])
    bg = [c for c in cats if is_background_name(c["name"])]
    objects = [c for c in cats if not is_background_name(c["name"])]
    if classes is not None:
        by_name: dict[str, dict[str, Any]] = {}
        for c in objects:
            if c["name"] in by_name:
                raise ValueError(
                    f"--classes: category name {c['name']!r} is used by ids {by_name[c['name']]['id']} and {c['id']}"
                )
            by_name[c["name"]] = c
        wanted = [n for n in classes if not is_background_name(n)]
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            raise ValueError(f"--classes: unknown class name(s) {unknown}; the json has {sorted(by_name)}")
        dups = [n for n, k in Counter(wanted).items() if k > 1]
        if dups:
            raise ValueError(f"--classes: class name(s) listed twice: {dups}")
        objects = [by_name[n] for n in wanted]
    if len(objects) + 1 > MAX_CLASSES:
        raise ValueError(f"{len(objects) + 1} classes do not fit an 8-bit label map (at most {MAX_CLASSES})")
    names = [bg[0]["name"] if bg else "background"] + [c["name"] for c in objects]
    cat_ids: list[int | None] = [bg[0]["id"] if bg else None] + [c["id"] for c in objects]
    index_of = {c["id"]: 0 for c in bg}
    index_of.update({c["id"]: i + 1 for i, c in enumerate(objects)})
    return ClassMap(tuple(names), tuple(cat_ids), index_of, frozenset(c["id"] for c in cats))


@dataclass
class ImageEntry:
    """One valid image entry and its valid annotations (segmentations already checked)."""

    image_id: int | str
    file_name: str
    width: int
    height: int
    key: str
    anns: list[dict[str, Any]] = field(default_factory=list)
    dropped_anns: int = 0

    def where(self) -> str:
        return f"image id={self.image_id!r} file={self.file_name!r}"


def make_key(image_id: int | str) -> str | None:
    """Shard key of an image id; None when the id cannot be a safe key (dots, slashes, spaces...)."""
    if _is_int(image_id):
        return f"{image_id:012d}" if image_id >= 0 else f"n{-image_id:012d}"
    if isinstance(image_id, str) and _KEY_RE.match(image_id) and image_id not in (".", ".."):
        return image_id
    return None


def _ann_where(ann: dict[str, Any], image: ImageEntry | None = None) -> str:
    s = f"annotation id={ann.get('id')!r} image_id={ann.get('image_id')!r}"
    return s + (f" file={image.file_name!r}" if image is not None else "")


def check_segmentation(seg: Any, height: int, width: int) -> tuple[Any, list[Problem], str]:
    """Validate one annotation's segmentation. Returns (clean segmentation or None, problems, where-suffix).

    Polygons: every part needs >= 3 points and an even number of numeric coordinates; bad parts are dropped and
    reported. A 4-number part is rejected here because pycocotools would read it as a box.
    """
    problems: list[Problem] = []
    if isinstance(seg, list):
        good = []
        for j, poly in enumerate(seg):
            ok = (
                isinstance(poly, list)
                and len(poly) >= 6
                and len(poly) % 2 == 0
                and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in poly
                )
            )
            if ok:
                good.append([float(v) for v in poly])
            else:
                n = len(poly) if isinstance(poly, list) else type(poly).__name__
                problems.append(Problem("bad_polygon", f"polygon part {j} has {n} coordinates"))
        if not good:
            return None, problems + [Problem("empty_segmentation", "no valid polygon")], ""
        return good, problems, ""
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            return None, [Problem("bad_rle", f"RLE size {size!r} is not [height, width]")], ""
        if list(size) != [height, width]:
            return (
                None,
                [Problem("rle_size_mismatch", f"RLE size {size} but image is [{height}, {width}]")],
                "",
            )
        if isinstance(counts, list):
            if not all(_is_int(v) and v >= 0 for v in counts) or sum(counts) != height * width:
                return None, [Problem("bad_rle", "uncompressed RLE counts do not sum to height*width")], ""
            return mask_utils.frPyObjects(seg, height, width), [], ""
        if isinstance(counts, str | bytes):
            runs = compressed_rle_counts(counts)
            # pycocotools decodes short counts into uninitialised memory and rejects long ones without
            # naming the annotation, so the run lengths are checked here
            if runs is None or min(runs, default=0) < 0 or sum(runs) != height * width:
                total = "unreadable" if runs is None else sum(runs)
                return (
                    None,
                    [
                        Problem(
                            "bad_rle",
                            f"compressed RLE counts sum to {total}, not height*width={height * width}",
                        )
                    ],
                    "",
                )
            return {"size": size, "counts": counts}, [], ""
        return None, [Problem("bad_rle", f"RLE counts of type {type(counts).__name__}")], ""
    return (
        None,
        [Problem("empty_segmentation", f"segmentation is {type(seg).__name__}, not polygons or RLE")],
        "",
    )


def compressed_rle_counts(counts: str | bytes) -> list[int] | None:
    """Run lengths of COCO's compressed RLE string (6-bit chunks from '0', sign bit, deltas from the run two
    back), or None when the string is malformed."""
    data = counts.encode() if isinstance(counts, str) else counts
    runs: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data):
                return None
            c = data[p] - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def index_dataset(
    coco: dict[str, Any], class_map: ClassMap, report: Report, crowd: str = "include"
) -> list[ImageEntry]:
    """Valid image entries in json order, each with its valid annotations in json order."""
    images: list[ImageEntry] = []
    by_id: dict[Any, ImageEntry] = {}
    used_keys: set[str] = set()
    for i, im in enumerate(coco["images"]):
        im = im if isinstance(im, dict) else {}
        iid, fname, w, h = im.get("id"), im.get("file_name"), im.get("width"), im.get("height")
        if not (_is_int(iid) or isinstance(iid, str)) or not isinstance(fname, str) or not fname:
            report.problem(Problem("bad_image_entry", f"images[{i}] (id={iid!r}, file_name={fname!r})"))
            continue
        if not (_is_int(w) and _is_int(h) and w > 0 and h > 0):
            report.problem(
                Problem("bad_image_entry", f"image id={iid!r} file={fname!r}: width={w!r} height={h!r}")
            )
            continue
        if iid in by_id:
            report.problem(
                Problem(
                    "duplicate_image_id", f"image id={iid!r} file={fname!r} (first: {by_id[iid].file_name!r})"
                )
            )
            continue
        key = make_key(iid)
        if key is None or key in used_keys:
            report.problem(Problem("bad_key", f"image id={iid!r} file={fname!r} gives key {key!r}"))
            continue
        used_keys.add(key)
        by_id[iid] = ImageEntry(iid, fname, w, h, key)
        images.append(by_id[iid])

    seen_ann_ids: set[Any] = set()
    for pos, ann in enumerate(coco.get("annotations") or []):
        crowd_flag = ann.get("iscrowd", 0) if isinstance(ann, dict) else None
        if (
            not isinstance(ann, dict)
            or not all(_is_id(ann.get(k)) or ann.get(k) is None for k in ("id", "image_id"))
            or crowd_flag not in (0, 1, "0", "1")  # also admits False/True
        ):
            shown = {k: ann.get(k) for k in ("id", "image_id", "iscrowd")} if isinstance(ann, dict) else ann
            report.problem(Problem("bad_annotation_entry", f"annotations[{pos}]: {str(shown)[:200]}"))
            continue
        aid = ann.get("id")
        if aid is not None and aid in seen_ann_ids:
            report.problem(Problem("duplicate_annotation_id", _ann_where(ann)))
            continue
        seen_ann_ids.add(aid)
        image = by_id.get(ann.get("image_id"))
        if image is None:
            report.problem(Problem("missing_image_id", _ann_where(ann)))
            continue
        cid = ann.get("category_id")
        if not _is_int(cid) or cid not in class_map.known_ids:
            report.problem(Problem("unknown_category", f"{_ann_where(ann, image)} category_id={cid!r}"))
            image.dropped_anns += 1
            continue
        if cid not in class_map.index_of:
            report.remapped["class_not_selected"] += 1
            continue
        is_crowd = crowd_flag in (1, "1")
        if is_crowd and crowd == "skip":
            report.remapped["crowd_skipped"] += 1
            continue
        seg, problems, _ = check_segmentation(ann.get("segmentation"), image.height, image.width)
        for p in problems:
            report.problem(Problem(p.reason, f"{_ann_where(ann, image)}: {p.message}"))
        if seg is None:
            image.dropped_anns += 1
            continue
        image.anns.append(
            {"id": aid, "pos": pos, "cls": class_map.index_of[cid], "crowd": is_crowd, "segmentation": seg}
        )
    return images
