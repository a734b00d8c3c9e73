"""Reading samples from shards: runs of samples of local tars or URLs, decoded and checked, and the on_error
policy. Only `jpg`/`jpeg`/`png`/`seg.png`/`json` members are ever read; anything else (`.pickle`, `.pyd`,
`.pth`...) is skipped unread, and no default decoder (webdataset's unpickle) is anywhere near the data.

Tars are read from their headers (dist_seg.data.format.tar_members, a fraction of `tarfile`'s cost per member)
rather than with webdataset's pipeline: readers are given sample ranges inside shards (webdataset splits by
whole shard URL), and every error is attributed to shard and key.

Every shard byte is read once per pass. A run of samples [start, stop) is the byte range the shard's index
gives (`offsets[start]` to `offsets[stop]`), so a reader seeks straight to its first sample (a resume
included) and reads nothing before it or after it:
- a local tar (or the cache's copy): seek, then read the range unbuffered, headers and member data only;
- a URL: one ranged GET of the range, every sample's bytes checked against the index's sha256 before they
  are parsed; a server that ignores Range is read as one stream per shard from its first byte, which the
  next run of the same shard continues (dist_seg.data.format.remote);
- shards without an index (format version 1, written before it existed): local ones get their offsets from
  one walk over the tar headers per shard and reader (512 bytes read per member, member data skipped by
  seeking); URLs are streamed from byte 0, the stream continued run after run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from dist_seg.data.format.cache import CorruptShard, cached_copy
from dist_seg.data.format.decode import READ_EXTS, ErrorPolicy, RawSample, Sample, decode_sample
from dist_seg.data.format.remote import (
    RemoteOptions,
    RemoteStream,
    note_ranges_ignored,
    ranges_ignored,
    read_bytes,
)
from dist_seg.data.format.shards import ShardError, ShardSet
from dist_seg.data.format.tar_members import iter_members, member_spans
from dist_seg.data.format.urls import is_url, join, parent, redact

__all__ = [  # decoding lives in decode.py; the loaders import it from here, with the reader
    "Piece",
    "ShardReader",
    "read_samples",
    "sample_offsets",
    "no_range_warning",
    "RawSample",
    "Sample",
    "decode_sample",
    "ErrorPolicy",
    "READ_EXTS",
]

log = logging.getLogger(__name__)

_OPEN_STREAMS = 2  # streams over shards of servers without Range a reader keeps open to continue


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of one shard, counted in tar order."""

    shard: str
    start: int
    stop: int


def read_samples(
    shard: str, start: int = 0, stop: int | None = None, name: str | None = None
) -> Iterator[RawSample]:
    """Samples start..stop-1 of a local tar shard in tar order (a sample = consecutive members sharing a key),
    without an index: one walk over the tar's headers finds where samples start (`sample_offsets`), then
    only the bytes of samples start..stop-1 are read. `name` is what samples and messages call the shard
    (its URL, for a cached copy).

    Raises ShardError naming the shard and key on a damaged or truncated tar, and when the tar ends cleanly
    before `stop` (a shard cut at a member boundary: the expected count is what catches it).
    """
    offsets = sample_offsets(shard, name)
    stop = len(offsets) - 1 if stop is None else stop
    yield from _local_run(shard, name or shard, offsets, start, stop)


def sample_offsets(path: str, name: str | None = None) -> list[int]:
    """Where each sample of a local tar starts, and where the last one ends: what a shard index holds, from
    one walk over the member headers (only headers are read; member data is skipped by seeking)."""
    offsets: list[int] = []
    key: str | None = None
    end = 0
    with _tar_errors(name or path) as where, open(path, "rb", buffering=0) as f:
        for member, lo, hi in member_spans(f):
            k, _ = _member_key(member)
            if k != key:
                offsets.append(lo)
                key, where.key, where.index = k, k, where.index + 1
            end = hi
    return offsets + [end]


def _local_run(path: str, name: str, offsets: list[int], start: int, stop: int) -> Iterator[RawSample]:
    """Samples [start, stop) of a local tar: bytes offsets[start]..offsets[stop], and not one more, one read
    per sample (a buffered file would read ahead past the run; member-sized reads cost more calls)."""
    if stop >= len(offsets):
        raise _short(name, len(offsets) - 1, stop, None)
    with _tar_errors(name) as where, open(path, "rb", buffering=0) as f:
        f.seek(offsets[start])
        for i in range(start, stop):
            lo, hi = offsets[i], offsets[i + 1]
            data = f.read(hi - lo)
            if len(data) != hi - lo:  # truncated: parse what there is, so the error names the sample's key
                _one_sample(data, name, i, lo, where)
                raise tarfile.ReadError(f"unexpected end of data at byte {lo + len(data)} (sample #{i})")
            yield _one_sample(data, name, i, lo, where)


def _one_sample(data: bytes, shard: str, i: int, lo: int, where: _Where) -> RawSample:
    """Sample #i of `shard` from its bytes (what its index says lie at `lo`..`lo + len(data)`)."""
    where.index, where.key = i - 1, None  # _walk numbers on from here
    got = list(_walk(io.BytesIO(data), shard, lo, where))
    if len(got) != 1:
        raise ShardError(
            f"shard {redact(shard)}: bytes {lo}-{lo + len(data)} hold {len(got)} samples where its index "
            f"puts sample #{i}: the index does not match the tar",
            shard,
        )
    return got[0]


def _short(shard: str, got: int, stop: int, key: str | None) -> ShardError:
    return ShardError(
        f"shard {redact(shard)}: ends after {got} samples (last key {key!r}) but {stop} were expected; "
        "truncated or replaced since conversion?",
        shard,
        key,
    )


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
                f"shard {redact(self.shard)}: damaged or unreadable at sample {w.key!r} (#{w.index}): "
                f"{redact(str(e))}",
                self.shard,
                w.key,
            ) from e
        return False


def _member_key(name: str) -> tuple[str, str]:
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _walk(f: BinaryIO, shard: str, offset: int, where: _Where) -> Iterator[RawSample]:
    """The samples of the tar stream `f` (at byte `offset` of its shard), numbered on from `where.index`."""
    members: dict[str, bytes] = {}
    for name, data in iter_members(f, READ_EXTS, offset):
        k, ext = _member_key(name)
        if k != where.key:
            if where.key is not None:
                yield RawSample(shard, where.key, members, where.index)
            where.index, where.key, members = where.index + 1, k, {}
        if data is not None:
            members[ext] = data
    if where.key is not None:
        yield RawSample(shard, where.key, members, where.index)


class _Cursor:
    """An open stream over a whole shard of a server without Range (or a shard without an index), continued
    by the next run of the same shard instead of reading the shard again from byte 0."""

    def __init__(self, stream: RemoteStream, samples: Iterator[RawSample] | None = None):
        self.stream, self.samples = stream, samples
        self.next_index = 0  # with `samples`: the index of the next sample it yields

    def close(self) -> None:
        if self.samples is not None:
            self.samples.close()  # type: ignore[attr-defined]
        self.stream.close()


class ShardReader:
    """Reads runs of samples of one ShardSet's shards, each byte once: local files and the cache's copies by
    seeking to the run's bytes; URLs by one ranged read per run (every sample checked against the index's
    sha256), or, from a server without Range, by continuing one stream per shard (module docstring)."""

    def __init__(self, shard_set: ShardSet, remote: RemoteOptions):
        self.entries, self.remote = shard_set.shard_entries, remote
        self.no_range = shard_set.no_range
        self._indexes: dict[str, tuple[list[int], list[str] | None]] = {}  # shard -> offsets, digests
        self._cursors: OrderedDict[str, _Cursor] = OrderedDict()  # most recently used last
        self._unindexed: set[str] = set()  # URL shards without an index, warned about

    def samples(self, shard: str, start: int = 0, stop: int | None = None) -> Iterator[RawSample]:
        entry = self.entries.get(shard, {})
        stop = int(entry["samples"]) if stop is None and "samples" in entry else stop
        if not is_url(shard):
            offsets, _ = self._local_index(shard, entry)
            yield from _local_run(shard, shard, offsets, start, len(offsets) - 1 if stop is None else stop)
            return
        assert stop is not None, "a URL shard's sample count comes from its manifest"
        note_ranges_ignored(self.no_range)  # probed by the rank (resolve_shards); workers learn it here
        if self.remote.cache_dir:
            try:
                local = cached_copy(shard, int(entry["bytes"]), entry["sha256"], self.remote)
            except (CorruptShard, OSError) as e:
                raise ShardError(f"shard {redact(shard)}: {e}", shard) from e
            offsets = self._index(shard, entry)[0] if entry.get("index") else None
            offsets = offsets or self._local_index(local, {}, name=shard)[0]
            yield from _local_run(local, shard, offsets, start, stop)
        elif entry.get("index"):
            yield from self._ranged(shard, entry, start, stop)
        else:
            yield from self._streamed(shard, entry, start, stop)

    def _local_index(
        self, path: str, entry: dict[str, Any], name: str | None = None
    ) -> tuple[list[int], list[str] | None]:
        """A local shard's sample offsets: its index file when the manifest names one (checked against the
        manifest's sha256), else a header walk, once per shard and reader."""
        if path not in self._indexes:
            index = os.path.join(os.path.dirname(path), entry["index"]) if entry.get("index") else None
            if index is not None and os.path.isfile(index):
                self._indexes[path] = _parse_index(_read_file(index), entry, index, path)
            else:
                if index is not None:
                    log.warning(
                        "shard index %s is missing: sample offsets from the tar headers instead", index
                    )
                self._indexes[path] = (sample_offsets(path, name), None)
        return self._indexes[path]

    def _index(self, shard: str, entry: dict[str, Any]) -> tuple[list[int], list[str] | None]:
        if shard not in self._indexes:
            url = join(parent(shard), entry["index"])
            try:
                raw = read_bytes(url, self.remote)
            except OSError as e:
                raise ShardError(f"shard index {redact(url)}: {e}", shard) from e
            self._indexes[shard] = _parse_index(raw, entry, url, shard)
        return self._indexes[shard]

    def _ranged(self, shard: str, entry: dict[str, Any], start: int, stop: int) -> Iterator[RawSample]:
        offsets, digests = self._index(shard, entry)
        assert digests is not None
        stream, cursor = self._stream(shard, entry, offsets[start], offsets[stop])
        try:
            for i in range(start, stop):
                lo, hi = offsets[i], offsets[i + 1]
                try:
                    data = stream.read_exact(hi - lo)
                except OSError as e:
                    raise ShardError(f"shard {redact(shard)}: cannot read sample #{i}: {e}", shard) from e
                got = hashlib.sha256(data).hexdigest()
                if got != digests[i]:
                    raise ShardError(
                        f"shard {redact(shard)}: sample #{i} (bytes {lo}-{hi}) has sha256 {got[:16]}..., its "
                        f"index says {digests[i][:16]}...: corrupted in transit or changed since conversion",
                        shard,
                    )
                with _tar_errors(shard) as where:
                    yield _one_sample(data, shard, i, lo, where)
        finally:
            if cursor is None:
                stream.close()  # a ranged read ends with its run; a cursor's stream goes on

    def _stream(
        self, shard: str, entry: dict[str, Any], lo: int, hi: int
    ) -> tuple[RemoteStream, _Cursor | None]:
        """A stream at byte `lo` of `shard`: a ranged read of [lo, hi), or, from a server without Range, the
        shard's open stream moved forward to `lo` (a new one from byte 0 when it is past `lo` already)."""
        if not ranges_ignored(shard):  # (a server answering this very read with the whole file: see there)
            return RemoteStream(shard, lo, hi, self.remote), None
        cursor = self._cursors.get(shard)
        if cursor is None or cursor.stream.pos > lo:
            cursor = self._open_cursor(
                shard, _Cursor(RemoteStream(shard, 0, int(entry["bytes"]), self.remote))
            )
        self._cursors.move_to_end(shard)
        cursor.stream.skip_to(lo)
        return cursor.stream, cursor

    def _open_cursor(self, shard: str, cursor: _Cursor) -> _Cursor:
        old = self._cursors.pop(shard, None)
        if old is not None:
            old.close()
        self._cursors[shard] = cursor
        while len(self._cursors) > _OPEN_STREAMS:
            self._cursors.popitem(last=False)[1].close()
        return cursor

    def _streamed(self, shard: str, entry: dict[str, Any], start: int, stop: int) -> Iterator[RawSample]:
        """A shard without an index (format version 1) at a URL: one stream from byte 0, its tar walked, the
        walk continued by the next run of the shard (a run before where it stands starts a new stream)."""
        cursor = self._cursors.get(shard)
        if cursor is None or cursor.samples is None or cursor.next_index > start:
            if shard not in self._unindexed:
                self._unindexed.add(shard)
                log.warning(
                    "shard %s has no index (format version 1): streamed from its first byte", redact(shard)
                )
            stream = RemoteStream(shard, 0, int(entry["bytes"]), self.remote)
            cursor = self._open_cursor(shard, _Cursor(stream, self._walk_stream(shard, stream)))
        self._cursors.move_to_end(shard)
        while cursor.next_index < stop:
            try:
                raw = next(cursor.samples)  # type: ignore[arg-type]
            except StopIteration:
                self._cursors.pop(shard).close()
                raise _short(shard, cursor.next_index, stop, None) from None
            cursor.next_index += 1
            if raw.index >= start:
                yield raw

    def _walk_stream(self, shard: str, stream: RemoteStream) -> Iterator[RawSample]:
        with _tar_errors(shard) as where:
            yield from _walk(stream, shard, 0, where)  # type: ignore[arg-type]

    def read_pieces(self, pieces: list[Piece], errors: ErrorPolicy) -> Iterator[RawSample]:
        """The samples of `pieces` in order; a damaged piece loses its remaining samples to `errors`."""
        for p in pieces:
            n = 0
            try:
                for raw in self.samples(p.shard, p.start, p.stop):
                    n += 1
                    yield raw
            except ShardError as e:
                self._drop_cursor(p.shard)
                errors.handle(e, lost=max(1, p.stop - p.start - n))

    def _drop_cursor(self, shard: str) -> None:
        cursor = self._cursors.pop(shard, None)
        if cursor is not None:
            cursor.close()

    def close(self) -> None:
        """Close the streams kept open to continue (a reader that is done with its pass)."""
        for shard in list(self._cursors):
            self._drop_cursor(shard)


def no_range_warning(shard_set: ShardSet, what: str) -> str | None:
    """What a rank says once when the shards' servers ignore Range, naming them and the cost; None if none."""
    if not shard_set.no_range:
        return None
    return (
        f"{what}: {', '.join(sorted(shard_set.no_range))} ignore(s) HTTP Range requests, so each loader "
        "worker reads a shard as one stream from its first byte: a worker whose samples start inside a shard also "
        "downloads the bytes before them, and a resume or a dropped connection reads a shard again from its "
        "start. Each rank still reads only its own shards. "
        "Serve the shards with Range support (nginx, Apache, object storage) or set data.cache_dir to "
        "download each shard once per machine."
    )


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _parse_index(raw: bytes, entry: dict[str, Any], where: str, shard: str) -> tuple[list[int], list[str]]:
    """(offsets, sha256 per sample) of a shard index, checked against the manifest entry's sha256 and sample
    count; ShardError naming the index otherwise."""
    if hashlib.sha256(raw).hexdigest() != entry.get("index_sha256"):
        raise ShardError(f"shard index {redact(where)}: sha256 differs from its manifest's", shard)
    doc = json.loads(raw)
    offsets, digests = doc["offsets"], doc["sha256"]
    if len(offsets) != int(entry["samples"]) + 1 or len(digests) != int(entry["samples"]):
        raise ShardError(f"shard index {redact(where)}: does not describe {entry['samples']} samples", shard)
    return offsets, digests
