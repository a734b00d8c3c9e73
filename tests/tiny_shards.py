"""Tiny shard directories (40x30 noise photos with rectangles, converted by the real converter) and helpers
that read or rewrite shards independently of the pipeline; shared by tests/data/test_stream.py and
tests/data/test_shards.py through the session fixture `tiny_shards` in tests/conftest.py."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dist_seg.config.schema import DataConfig
from dist_seg.data.format.writer import write_index
from dist_seg.data.prep.convert import ConvertOptions, convert


def make_coco(root: Path, ids: list[int], categories: tuple[str, ...] = ("cat", "dog")) -> tuple[Path, Path]:
    """Tiny COCO dataset: 40x30 JPEG photos of noise with one or two rectangles annotated as polygons."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(ids[0])
    images, anns = [], []
    for iid in ids:
        w, h = 40, 30
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(img_dir / f"im{iid}.jpg", quality=90)
        images.append({"id": iid, "file_name": f"im{iid}.jpg", "width": w, "height": h})
        for j in range(1 + iid % 2):
            x0, y0 = int(rng.integers(0, 20)), int(rng.integers(0, 15))
            poly = [x0, y0, x0 + 15, y0, x0 + 15, y0 + 10, x0, y0 + 10]
            anns.append(
                {"id": 100 * iid + j, "image_id": iid, "category_id": 1 + j, "segmentation": [poly]}
                | {"area": 150.0, "bbox": [x0, y0, 15, 10], "iscrowd": 0}
            )
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(categories)]
    ann_path = root / "ann.json"
    ann_path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return ann_path, img_dir


def make_shards(root: Path, ids: list[int], per_shard: int, **kw) -> Path:
    ann, imgs = make_coco(root / "coco", ids, **{k: v for k, v in kw.items() if k == "categories"})
    out = root / "shards"
    convert(
        ConvertOptions(
            str(ann),
            str(imgs),
            str(out),
            samples_per_shard=per_shard,
            progress=False,
            no_labels=kw.get("no_labels", False),
        )
    )
    return out


def tar_keys(shard_dir: Path) -> list[str]:
    """Keys of a shard directory read straight from the tars (independent of the pipeline)."""
    keys = []
    for t in sorted(shard_dir.glob("shard-*.tar")):
        with tarfile.open(t) as tar:
            keys += sorted({m.name.split(".", 1)[0] for m in tar})
    return keys


def sample_ranges(shard: Path) -> list[tuple[str, int, int]]:
    """(key, first byte, end byte) of every sample of a tar, from its headers (independent of the converter's
    index): a sample runs from its first member's header to the padded end of its last member's data."""
    ranges: list[tuple[str, int, int]] = []
    with tarfile.open(shard) as tar:
        for m in tar:
            key = m.name.split(".", 1)[0]
            end = m.offset_data + (m.size + 511) // 512 * 512
            if ranges and ranges[-1][0] == key:
                ranges[-1] = (key, ranges[-1][1], end)
            else:
                ranges.append((key, m.offset, end))
    return ranges


def rewrite_member(shard: Path, edit: Callable[[str, bytes], list[tuple[str, bytes]]]) -> None:
    """Rewrite a shard member by member through `edit`, keeping the manifest's byte count and sha256, and the
    shard's index, true."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            for new_name, new_data in edit(name, data):
                ti = tarfile.TarInfo(new_name)
                ti.size = len(new_data)
                tar.addfile(ti, io.BytesIO(new_data))
    ranges = sample_ranges(shard)
    index = write_index(shard, [lo for _, lo, _ in ranges] + [ranges[-1][2]] if ranges else [0])
    manifest_path = shard.parent / "manifest.json"
    m = json.loads(manifest_path.read_text())
    for s in m["shards"]:
        if s["name"] == shard.name:
            s["bytes"] = shard.stat().st_size
            s["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
            s["index_sha256"] = hashlib.sha256(index.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(m))


def build_tiny_datasets(root: Path) -> dict[str, Path]:
    """The shard directories the stream and shard tests share, by name."""
    d = {}
    # three one-shard directories of unequal size: 5 + 13 + 19 = 37 samples
    for name, ids in (("u5", range(1, 6)), ("u13", range(10, 23)), ("u19", range(30, 49))):
        d[name] = make_shards(root / name, list(ids), per_shard=100)
    for n_shards, per in ((1, 23), (2, 12), (5, 5)):
        d[f"eval{n_shards}"] = make_shards(root / f"eval{n_shards}", list(range(200, 223)), per_shard=per)
    d["train4"] = make_shards(root / "train4", list(range(300, 340)), per_shard=10)  # 4 shards x 10
    d["test"] = make_shards(root / "test", list(range(400, 407)), per_shard=3, no_labels=True)
    d["other_classes"] = make_shards(root / "oc", [500, 501], per_shard=5, categories=("cat", "bird"))
    return d


def cfg(**kw) -> DataConfig:
    base = dict(crop_size=24, batch_size=2, eval_batch_size=3, num_workers=0, shuffle_buffer=8)
    return DataConfig(**(base | kw))


def epoch_keys(loader, epoch: int) -> tuple[int, list[str]]:
    loader.set_epoch(epoch)
    steps, keys = 0, []
    for b in loader:
        steps += 1
        keys += b.keys
    return steps, keys


def batches(loader, epoch: int = 0) -> list[tuple[list[str], torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return [(b.keys, b.images.clone(), b.masks.clone()) for b in loader]


def assert_same(a, b) -> None:
    assert len(a) == len(b) > 0
    for (ka, ia, ma), (kb, ib, mb) in zip(a, b, strict=True):
        assert ka == kb
        assert torch.equal(ia, ib) and torch.equal(ma, mb)
