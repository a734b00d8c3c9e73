"""Shards of the built-in synthetic dataset for the benchmarks that need a shard directory of a chosen size
(resume_seek.py, stop_latency.py): `dist-seg synth` at 224 px, seed 0, then `dist-seg convert`."""

from __future__ import annotations

from pathlib import Path

from dist_seg.data.prep.convert import ConvertOptions, convert
from dist_seg.data.prep.synth.dataset import generate


def synthetic_shards(root: Path, images: int) -> Path:
    """ROOT/shards: `images` synthetic 224x224 training images (no val split), converted to shards."""
    generate(root / "synth", images=images, val_images=0, size=224, seed=0)
    out = root / "shards"
    convert(
        ConvertOptions(str(root / "synth/train.json"), str(root / "synth/images"), str(out), progress=False)
    )
    return out
