"""Reading samples from shards: runs of samples of local tars or URLs, decoded and checked, and the on_error
policy. Only `jpg`/`jpeg`/`png`/`seg.png`/`json` members are ever read; anything else (`.pickle`, `.pyd`,
`.pth`...) is skipped unread, and no default decoder (webdataset's unpickle) is anywhere near the data.

Tars are read from their headers (dist_seg.data.format.tar_members, a fraction of `tarfile`'s cost per member) rather
than with webdataset's pipeline: readers are given sample ranges inside shards (webdataset splits by whole
shard URL), seeking (or a ranged read, over a URL) skips other readers' samples without reading their bytes,
and every error is attributed to shard and key.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, decode_png

from dist_seg.data import IGNORE_INDEX
from dist_seg.data.format.remote import (
    CorruptShard,
    RangeReader,
    RemoteOptions,
    cached_copy,
    is_url,
    join,
    parent,
    read_bytes,
    redact,
)
from dist_seg.data.format.shards import ShardError, ShardSet
from dist_seg.data.format.tar_members import iter_members

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png")
READ_EXTS = frozenset((*IMAGE_EXTS, "seg.png", "json"))  # every other member stays unread
assert IGNORE_INDEX == 255, "decode_sample's label range check relies on uint8 wrap-around"


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
    members: dict[str, bytes]  # extension ("jpg", "seg.png", "json") -> bytes (a bytearray); only READ_EXTS
    index: int = -1  # position of the sample in its shard (tar order)


def read_samples(
    shard: str, start: int = 0, stop: int | None = None, name: str | None = None
) -> Iterator[RawSample]:
    """Samples start..stop-1 of a local tar shard in tar order (a sample = consecutive members sharing a key).
    `name` is what samples and messages call the shard (its URL, for a cached copy).

    Raises ShardError naming the shard and key on a damaged or truncated tar, and when the tar ends cleanly
    before `stop` (a shard cut at a member boundary: the expected count is what catches it).
    """
    with _tar_errors(name or shard) as where:
        with open(shard, "rb") as f:  # headers only: unread members' data is skipped by seeking
            yield from _walk(f, name or shard, start, stop, where)


class _Where:
    key: str | None = None
    index = -1


class _tar_errors:
    """Turns tar and I/O errors inside the block into a ShardError naming the shard and the sample reached."""

    def __init__(self, shard: str):
        self.shard, self.where = shard, _Where()

    def __enter__(self) -> _Where:
        return self.where

    def __exit__(self, kind: Any, e: BaseException | None, tb: Any) -> bool:
        if isinstance(e, (tarfile.TarError, OSError, EOFError)):
            w = self.where
            raise ShardError(
                f"shard {redact(self.shard)}: damaged or unreadable at sample {w.key!r} (#{w.index}): {e}",
                self.shard,
                w.key,
            ) from e
        return False


def _member_key(name: str) -> tuple[str, str]:
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _walk(f: BinaryIO, shard: str, start: int, stop: int | None, where: _Where) -> Iterator[RawSample]:
    members: dict[str, bytes] = {}
    for name, data in iter_members(f, READ_EXTS):
        k, ext = _member_key(name)
        if k != where.key:
            if where.key is not None and where.index >= start:
                yield RawSample(shard, where.key, members, where.index)
            where.index, where.key, members = where.index + 1, k, {}
            if stop is not None and where.index >= stop:
                return
        if where.index >= start and data is not None:
            members[ext] = data
    if where.key is not None and where.index >= start:
        yield RawSample(shard, where.key, members, where.index)
    if stop is not None and where.index + 1 < stop:
        raise ShardError(
            f"shard {redact(shard)}: ends after {where.index + 1} samples (last key {where.key!r}) but {stop} were "
            "expected; truncated or replaced since conversion?",
            shard,
            where.key,
        )


class ShardReader:
    """Reads runs of samples of one ShardSet's shards. Local files: `read_samples`. URLs, with data.cache_dir:
    the cache's verified copy. URLs without: one ranged read per run through the shard's index, every
    sample's bytes checked against the index's sha256 before it is parsed (a corrupted byte is an error
    naming the URL, never a training sample); shards of format version 1 (no index) are streamed from byte 0.
    """

    def __init__(self, shard_set: ShardSet, remote: RemoteOptions):
        self.entries, self.remote = shard_set.shard_entries, remote
        self._indexes: dict[str, tuple[list[int], list[str]]] = {}

    def samples(self, shard: str, start: int = 0, stop: int | None = None) -> Iterator[RawSample]:
        if not is_url(shard):
            yield from read_samples(shard, start, stop)
            return
        entry = self.entries[shard]
        if self.remote.cache_dir:
            try:
                local = cached_copy(shard, int(entry["bytes"]), entry["sha256"], self.remote)
            except (CorruptShard, OSError) as e:
                raise ShardError(f"shard {redact(shard)}: {e}", shard) from e
            yield from read_samples(local, start, stop, name=shard)
        elif entry.get("index"):
            yield from self._ranged(shard, entry, start, int(entry["samples"]) if stop is None else stop)
        else:
            log.warning(
                "shard %s has no index (format version 1): streamed from its first byte", redact(shard)
            )
            with _tar_errors(shard) as where:
                stream = RangeReader(shard, 0, int(entry["bytes"]), self.remote)
                yield from _walk(stream, shard, start, stop, where)  # type: ignore[arg-type]

    def _ranged(self, shard: str, entry: dict[str, Any], start: int, stop: int) -> Iterator[RawSample]:
        offsets, digests = self._index(shard, entry)
        reader = RangeReader(shard, offsets[start], offsets[stop], self.remote)
        for i in range(start, stop):
            lo, hi = offsets[i], offsets[i + 1]
            try:
                data = reader.read_exact(hi - lo)
            except OSError as e:
                raise ShardError(f"shard {redact(shard)}: cannot read sample #{i}: {e}", shard) from e
            got = hashlib.sha256(data).hexdigest()
            if got != digests[i]:
                raise ShardError(
                    f"shard {redact(shard)}: sample #{i} (bytes {lo}-{hi}) has sha256 {got[:16]}..., its index "
                    f"says {digests[i][:16]}...: corrupted in transit or changed since conversion",
                    shard,
                )
            with _tar_errors(shard) as where:
                where.index = i - 1  # _walk counts from here: the block holds sample i only
                got_samples = list(_walk(io.BytesIO(data), shard, i, i + 1, where))
            yield got_samples[0]

    def _index(self, shard: str, entry: dict[str, Any]) -> tuple[list[int], list[str]]:
        if shard not in self._indexes:
            url = join(parent(shard), entry["index"])
            try:
                raw = read_bytes(url, self.remote)
            except OSError as e:
                raise ShardError(f"shard index {redact(url)}: {e}", shard) from e
            if hashlib.sha256(raw).hexdigest() != entry.get("index_sha256"):
                raise ShardError(f"shard index {redact(url)}: sha256 differs from its manifest's", shard)
            doc = json.loads(raw)
            offsets, digests = doc["offsets"], doc["sha256"]
            if len(offsets) != int(entry["samples"]) + 1 or len(digests) != int(entry["samples"]):
                raise ShardError(
                    f"shard index {redact(url)}: does not describe {entry['samples']} samples", shard
                )
            self._indexes[shard] = (offsets, digests)
        return self._indexes[shard]

    def read_pieces(self, pieces: list[Piece], errors: ErrorPolicy) -> Iterator[RawSample]:
        """The samples of `pieces` in order; a damaged piece loses its remaining samples to `errors`."""
        for p in pieces:
            n = 0
            try:
                for raw in self.samples(p.shard, p.start, p.stop):
                    n += 1
                    yield raw
            except ShardError as e:
                errors.handle(e, lost=max(1, p.stop - p.start - n))


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
        # a map without ignore pixels passes on its max alone; with them, uint8 wraps 255 (ignore) to 0, so
        # valid maps have every value + 1 <= num_classes (~20x faster than comparing twice). A bad value would
        # otherwise surface as a device assert in the loss
        if int(mask.max()) >= num_classes and int((mask + 1).max()) > num_classes:
            raise ShardError(
                f"{where}: label map has values >= num_classes={num_classes}", raw.shard, raw.key
            )
    return Sample(raw.key, image, mask, meta)


def _tensor(data: bytes | bytearray) -> Tensor:
    if not isinstance(data, bytearray):
        data = bytearray(data)  # a copy: torch wants a writable buffer (the tar reader gives bytearrays)
    return torch.frombuffer(data, dtype=torch.uint8)


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
