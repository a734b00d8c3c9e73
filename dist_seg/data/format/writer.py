"""Writing shards: fixed tar metadata, near-equal shard sizes, the split of the converter's staging tar, and
each shard's index (where every sample starts, and its sha256) for ranged reads over the network."""

from __future__ import annotations

import hashlib
import json
import math
import tarfile
from pathlib import Path
from typing import Any


def fixed_tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # fixed metadata so identical inputs give identical bytes
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def plan_shard_counts(
    n: int, total_bytes: int, samples_per_shard: int | None, shard_size_mb: float | None, min_shards: int
) -> list[int]:
    """Near-equal sample counts per shard honouring samples-per-shard, shard-size and min-shards."""
    k = max(1, min_shards)
    if samples_per_shard is not None:
        k = max(k, math.ceil(n / samples_per_shard))
    if shard_size_mb is not None:
        k = max(k, math.ceil(total_bytes / (shard_size_mb * 1e6)))
    if n < min_shards:
        raise ValueError(
            f"--min-shards {min_shards} needs at least that many samples; only {n} were converted"
        )
    k = min(k, n) if n > 0 else 1
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def split_staging(staging: Path, out: Path, counts: list[int]) -> list[dict[str, Any]]:
    """Copy the staging tar's samples, in order, into shard-NNNNNN.tar files of the given sample counts, each
    with its index shard-NNNNNN.idx.json; returns the manifest's shard entries."""
    shards = []
    with tarfile.open(staging, "r") as src:
        members = iter(src)
        pending = next(members, None)
        for i, count in enumerate(counts):
            name = f"shard-{i:06d}.tar"
            offsets = []
            with tarfile.open(out / name, "w", format=tarfile.GNU_FORMAT) as dst:
                for _ in range(count):
                    assert pending is not None
                    key = pending.name.split(".", 1)[0]
                    offsets.append(dst.offset)
                    while pending is not None and pending.name.split(".", 1)[0] == key:
                        dst.addfile(pending, src.extractfile(pending))
                        pending = next(members, None)
                offsets.append(dst.offset)  # the end of the last sample; the tar's end blocks follow
            index = write_index(out / name, offsets)
            shards.append(
                {
                    "name": name,
                    "samples": count,
                    "bytes": (out / name).stat().st_size,
                    "sha256": sha256_file(out / name),
                    "index": index.name,
                    "index_sha256": sha256_file(index),
                }
            )
    return shards


INDEX_FORMAT = "dist_seg.shard_index"


def index_name(shard_name: str) -> str:
    return shard_name.removesuffix(".tar") + ".idx.json"


def write_index(shard: Path, offsets: list[int]) -> Path:
    """SHARD's index: sample i is bytes offsets[i]..offsets[i+1] of the tar (its headers and data), with that
    range's sha256, so a reader can fetch any run of samples with one ranged read and check every byte."""
    digests = []
    with open(shard, "rb") as f:
        for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
            f.seek(lo)
            digests.append(hashlib.sha256(f.read(hi - lo)).hexdigest())
    path = shard.with_name(index_name(shard.name))
    doc = {"format": INDEX_FORMAT, "shard": shard.name, "offsets": offsets, "sha256": digests}
    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
