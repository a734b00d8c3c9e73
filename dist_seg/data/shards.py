"""Shard lists and sample reading: resolve shard specs against their manifests, walk tars, decode samples.

Only `jpg`/`jpeg`/`png`/`seg.png`/`json` members are ever read; anything else (`.pickle`, `.pyd`, `.pth`...)
is skipped unread. Tars are read with `tarfile` rather than webdataset's pipeline: readers are given sample
ranges inside shards (webdataset splits by whole shard URL), seeking skips other readers' samples without
reading their bytes, every error is attributed to shard and key, and no default decoder (webdataset's
unpickle) is anywhere near the data. webdataset's `braceexpand` expands shard patterns.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from braceexpand import braceexpand
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, decode_png

from dist_seg.data import IGNORE_INDEX
from dist_seg.data.manifest import read_manifest

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png")
READ_EXTS = frozenset((*IMAGE_EXTS, "seg.png", "json"))  # every other member stays unread
assert IGNORE_INDEX == 255, "decode_sample's label range check relies on uint8 wrap-around"


class ShardError(ValueError):
    """A shard or one of its samples cannot be used; the message names the shard and the sample key."""

    def __init__(self, message: str, shard: str | None = None, key: str | None = None):
        super().__init__(message)
        self.shard, self.key = shard, key


# ---------------------------------------------------------------------------------------------- shard lists
def _split_top_level(spec: str) -> list[str]:
    """Split on commas outside braces, so `a,b` is two sources and `d/shard-{0,1}.tar` one."""
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in [*parts, cur] if p.strip()]


def _one_source(part: str) -> tuple[str, dict[str, Any], dict[str, int]]:
    """(directory, manifest, {shard path: samples}) of one directory or brace pattern."""
    if os.path.isdir(part):
        directory = os.path.normpath(part)
        manifest = read_manifest(directory)
        names = [s["name"] for s in manifest["shards"]]
    elif "{" not in part and not part.endswith(".tar"):
        raise ValueError(f"shard directory {part} does not exist")
    else:
        paths = [os.path.normpath(p) for p in braceexpand(part)]
        dirs = {os.path.dirname(p) or "." for p in paths}
        if len(dirs) != 1:
            raise ValueError(
                f"shard pattern {part!r} spans directories {sorted(dirs)}; give one per directory"
            )
        directory = dirs.pop()
        manifest, names = read_manifest(directory), [os.path.basename(p) for p in paths]
    if manifest.get("ignore_index", IGNORE_INDEX) != IGNORE_INDEX:
        raise ValueError(
            f"{os.path.join(directory, 'manifest.json')}: ignore_index {manifest['ignore_index']}, but label maps "
            f"mark unlabelled pixels with {IGNORE_INDEX}"
        )
    listed = {s["name"]: s for s in manifest["shards"]}
    counts: dict[str, int] = {}
    for name in names:
        path = os.path.join(directory, name)
        if name not in listed:
            raise ValueError(f"shard {path} is not listed in {os.path.join(directory, 'manifest.json')}")
        if not os.path.isfile(path):
            raise ValueError(f"shard {path} is listed in its manifest but does not exist")
        if os.path.getsize(path) != listed[name]["bytes"]:
            log.warning(
                "shard %s is %d bytes, its manifest says %d",
                path,
                os.path.getsize(path),
                listed[name]["bytes"],
            )
        counts[path] = int(listed[name]["samples"])
    return directory, manifest, counts


@dataclass(frozen=True)
class ShardSet:
    """The shards a spec names, in sorted path order, and what their manifests say of them together."""

    spec: str
    shard_samples: dict[str, int]  # shard path -> samples, sorted by path
    num_classes: int
    classes: list[dict[str, Any]]  # the manifest's class list: index, name, coco_id
    has_labels: bool
    class_stats: list[dict[str, Any]] | None  # per-class pixel/image counts summed over directories
    directories: list[str]

    @property
    def paths(self) -> list[str]:
        return list(self.shard_samples)

    @property
    def total_samples(self) -> int:
        return sum(self.shard_samples.values())

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.classes]


def resolve_shards(spec: str) -> ShardSet:
    """The shards of a directory, comma-joined directories or a brace pattern, checked against their
    manifests (every shard listed and present; every directory with the same classes and label kind)."""
    parts = _split_top_level(spec or "")
    if not parts:
        raise ValueError(f"empty shard spec {spec!r}: give a shard directory or a brace pattern")
    counts: dict[str, int] = {}
    first: tuple[str, dict[str, Any]] | None = None
    stats: list[dict[str, Any]] | None = None
    dirs = []
    for part in parts:
        directory, m, c = _one_source(part)
        if first is None:
            first = (directory, m)
            stats = [dict(s) for s in m["class_stats"]] if m.get("class_stats") else None
        else:
            d0, m0 = first
            if m["classes"] != m0["classes"]:
                n0, n1 = [x["name"] for x in m0["classes"]], [x["name"] for x in m["classes"]]
                raise ValueError(
                    f"shard directories {d0} and {directory} have different classes: {n0} vs {n1}"
                )
            if m["has_labels"] != m0["has_labels"]:
                raise ValueError(f"shard directories {d0} and {directory}: one has label maps, the other not")
            if stats is not None and m.get("class_stats"):
                for s, t in zip(stats, m["class_stats"], strict=True):
                    for k in ("pixels", "images", "image_pixels", "instances"):
                        s[k] += t[k]
            else:
                stats = None
        twice = sorted(counts.keys() & c.keys())
        if twice:
            raise ValueError(f"shard {twice[0]} is named twice in {spec!r}")
        counts.update(c)
        dirs.append(directory)
    assert first is not None
    m0 = first[1]
    return ShardSet(
        spec=spec,
        shard_samples={p: counts[p] for p in sorted(counts)},
        num_classes=int(m0["num_classes"]),
        classes=list(m0["classes"]),
        has_labels=bool(m0["has_labels"]),
        class_stats=stats,
        directories=dirs,
    )


def dataset_classes(spec: str, num_classes: int | None) -> ShardSet:
    """The shards `spec`, resolved; the one place a dataset's classes are checked against the config.
    `num_classes` is config key model.num_classes: when set it must agree with the shards."""
    shard_set = resolve_shards(spec)
    if num_classes is not None and num_classes != shard_set.num_classes:
        raise ValueError(
            f"config key model.num_classes={num_classes} but the shards {spec} have "
            f"{shard_set.num_classes} classes"
        )
    return shard_set


# ---------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of one shard, counted in tar order."""

    shard: str
    start: int
    stop: int


@dataclass
class RawSample:
    shard: str
    key: str
    members: dict[str, bytes]  # extension ("jpg", "seg.png", "json") -> bytes; only READ_EXTS
    index: int = -1  # position of the sample in its shard (tar order)


def read_samples(shard: str, start: int = 0, stop: int | None = None) -> Iterator[RawSample]:
    """Samples start..stop-1 of a tar shard in tar order (a sample = consecutive members sharing a key).

    Raises ShardError naming the shard and key on a damaged tar, and when the tar ends before `stop`
    (tarfile ends silently at a truncated header, so the expected count is what catches a short shard).
    """
    index, key, members = -1, None, {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for info in tar:  # headers only: the data of members never extracted is skipped by seeking
                if not info.isfile():
                    continue
                head, _, base = info.name.rpartition("/")
                stem, _, ext = base.partition(".")
                k = f"{head}/{stem}" if head else stem
                if k != key:
                    if key is not None and index >= start:
                        yield RawSample(shard, key, members, index)
                    index, key, members = index + 1, k, {}
                    if stop is not None and index >= stop:
                        return
                if index >= start and ext.lower() in READ_EXTS:
                    f = tar.extractfile(info)
                    assert f is not None
                    members[ext.lower()] = f.read()
            if key is not None and index >= start:
                yield RawSample(shard, key, members, index)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"shard {shard}: damaged tar at sample {key!r} (#{index}): {e}", shard, key) from e
    if stop is not None and index + 1 < stop:
        raise ShardError(
            f"shard {shard}: ends after {index + 1} samples (last key {key!r}) but {stop} were expected; "
            "truncated or replaced since conversion?",
            shard,
            key,
        )


@dataclass
class Sample:
    key: str
    image: Tensor  # uint8 [3, H, W]
    mask: Tensor | None  # uint8 [H, W]
    meta: dict[str, Any] | None


def decode_sample(raw: RawSample, labelled: bool, num_classes: int) -> Sample:
    """Decode image (torchvision.io, libjpeg-turbo), label map and metadata json; ShardError on bad data."""
    where = f"shard {raw.shard}: sample {raw.key!r}"
    ext = next((e for e in IMAGE_EXTS if e in raw.members), None)
    if ext is None:
        raise ShardError(f"{where}: no .jpg/.png image member", raw.shard, raw.key)
    if labelled and "seg.png" not in raw.members:
        raise ShardError(f"{where}: no .seg.png label map in a labelled dataset", raw.shard, raw.key)
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders for TorchCodec (pyproject pins < 0.30); they remain the
            # fastest way from JPEG bytes to a uint8 tensor here (benchmarks/input_pipeline.py measures it)
            warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
            image = decode_image(_tensor(raw.members[ext]), mode=ImageReadMode.RGB)
            seg = raw.members["seg.png"] if labelled else None
            mask = decode_png(_tensor(seg), mode=ImageReadMode.GRAY)[0] if seg is not None else None
        meta = json.loads(raw.members["json"]) if "json" in raw.members else None
    except (RuntimeError, ValueError) as e:
        raise ShardError(f"{where}: cannot decode: {e}", raw.shard, raw.key) from e
    if mask is not None:
        if mask.shape != image.shape[1:]:
            raise ShardError(
                f"{where}: label map {tuple(mask.shape)} vs image {tuple(image.shape[1:])}",
                raw.shard,
                raw.key,
            )
        # uint8 wraps 255 (ignore) to 0, so valid maps have every value + 1 <= num_classes; ~20x faster
        # than comparing twice, and a bad value would otherwise surface as a device assert in the loss
        if int((mask + 1).max()) > num_classes:
            raise ShardError(
                f"{where}: label map has values >= num_classes={num_classes}", raw.shard, raw.key
            )
    return Sample(raw.key, image, mask, meta)


def _tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a copy: torch wants a writable buffer


class ErrorPolicy:
    """on_error bookkeeping of one worker for one pass: raise, or count, warn once per shard and cap."""

    def __init__(self, mode: str, max_errors: int, already: int = 0):
        self.mode, self.cap, self.already = mode, max_errors, already
        self.count = 0
        self.warned: set[str | None] = set()

    def handle(self, err: ShardError, lost: int = 1) -> None:
        if self.mode == "raise":
            raise err
        self.count += lost
        if err.shard not in self.warned:
            self.warned.add(err.shard)
            log.warning(
                "on_error=skip: skipped %d sample(s): %s (later errors in this shard: counted only)",
                lost,
                err,
            )
        if self.already + self.count > self.cap:
            raise ShardError(
                f"{self.already + self.count} samples skipped, more than data.max_errors={self.cap}; last: {err}",
                err.shard,
                err.key,
            ) from err


def read_pieces(pieces: list[Piece], errors: ErrorPolicy) -> Iterator[RawSample]:
    """The samples of `pieces` in order; a damaged piece loses its remaining samples to `errors`."""
    for p in pieces:
        n = 0
        try:
            for raw in read_samples(p.shard, p.start, p.stop):
                n += 1
                yield raw
        except ShardError as e:
            errors.handle(e, lost=max(1, p.stop - p.start - n))
