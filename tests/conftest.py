"""Shared fixtures. Real datasets live in ../shared/data (read-only); tests skip when it is absent."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from servers import ShardServer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# (name, annotation json, image dir) of each shared dataset
SHARED_DATASETS = [
    ("trashcan_subset", "annotations/instances_train.json", "train"),
    ("trashcan_subset_val", "annotations/instances_val.json", "val"),
    ("icevision_coco6", "annotations.json", "images"),
    ("labelme_voc3_coco", "annotations.json", "."),
]


def shared_dataset(name: str) -> tuple[Path, Path]:
    """(json, image dir) of a shared dataset, or pytest.skip with the reason."""
    for n, ann, img in SHARED_DATASETS:
        if n == name:
            root = SHARED_DATA / n.replace("_val", "")
            if not (root / ann).is_file():
                pytest.skip(f"shared dataset {root} is absent (tests need ../shared/data next to the repo)")
            return root / ann, root / img
    raise KeyError(name)


def read_shards(shard_dir: Path) -> dict[str, dict[str, bytes]]:
    """All samples of a shard directory: key -> {extension: bytes}, in shard order."""
    out: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(Path(shard_dir).glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def decode_png(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="session")
def trash_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """trashcan_subset train (4 shards) and val (2 shards) converted once per test session."""
    from dist_seg.data.prep.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("trash_shards")
    for split, shards in (("trashcan_subset", 4), ("trashcan_subset_val", 2)):
        ann, img = shared_dataset(split)
        convert(
            ConvertOptions(
                str(ann),
                str(img),
                str(out / split),
                min_shards=shards,
                samples_per_shard=1000,
                progress=False,
            )
        )
    return out / "trashcan_subset", out / "trashcan_subset_val"


def reference_mask(seg: list | dict, h: int, w: int) -> np.ndarray:
    """An annotation's mask decoded directly with pycocotools, as COCO.annToMask does (polygons merged,
    uncompressed RLE converted, compressed RLE as is): the independent reference the tests compare with."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return mask_utils.decode(rle).astype(bool)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tests/tiny_shards.py's shard directories, built once per session."""
    from tiny_shards import build_tiny_datasets

    return build_tiny_datasets(tmp_path_factory.mktemp("tiny_shards"))


E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/e2e/ (real torchrun jobs, the demo script, stop signals, elastic restarts, fault
    drills) is `slow`, so `launch/test.sh -m "not slow"` is the quick loop."""
    for item in items:
        if E2E in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def server(tiny_shards: dict[str, Path]) -> Iterator[ShardServer]:
    """An HTTP server over the tiny shard directories: URL(name) is dataset `name`'s shard directory."""
    root = tiny_shards["train4"].parent.parent
    with ShardServer(root) as srv:
        yield srv
