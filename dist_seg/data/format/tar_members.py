"""The members of a tar stream, read straight from its 512-byte headers.

`tarfile` builds a TarInfo object per member, parses every header field and wraps each read in a file object:
about 30 us a member, which is a tenth of a loader worker's time on small images. Shards need far less: the
name, the size, the type, and the data of the members we read. This reader handles what shard writers produce
(POSIX ustar with its name prefix, pax extended headers for long or non-ASCII names and large sizes, GNU long
names and base-256 sizes), verifies every header's checksum, and raises `tarfile.ReadError` on a damaged or
truncated stream, so callers treat it as they treat `tarfile`'s errors.
"""

from __future__ import annotations

import io
import struct
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
_ZERO = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # file, old-style file, contiguous file
_SKIPPED = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos: no member data we read
_META = (b"x", b"g", b"L", b"K")  # pax (per member, global), GNU long name, GNU long link name


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256, for sizes past 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise tarfile.ReadError(f"invalid number field {field!r} in a tar header") from None


def _check(header: bytes, offset: int) -> None:
    stored = _number(header[148:156])
    unsigned = sum(header) - sum(header[148:156]) + 256  # the checksum field counts as 8 spaces
    if stored != unsigned:
        signed = sum(struct.unpack("148b", header[:148])) + 256 + sum(struct.unpack("356b", header[156:]))
        if stored != signed:  # some old writers summed signed bytes; tarfile accepts both too
            raise tarfile.ReadError(f"bad tar header checksum at byte {offset}")


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    """'LEN key=value\\n' records; LEN counts the whole record."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise tarfile.ReadError(f"malformed pax header at byte {offset}") from None
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if length <= 0 or pos + length > len(data) or not key:
            raise tarfile.ReadError(f"malformed pax header at byte {offset}")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _pax_size(pax: dict[str, str], offset: int) -> int:
    try:
        size = int(pax["size"])
    except ValueError:
        size = -1
    if size < 0:
        raise tarfile.ReadError(f"invalid pax size {pax['size']!r} for the member at byte {offset}")
    return size


class _Stream:
    """Exact reads and forward skips with the byte offset kept, on seekable files and plain streams alike."""

    def __init__(self, f: BinaryIO, offset: int = 0):
        self.f, self.offset = f, offset
        seekable = getattr(f, "seekable", None)
        self.seekable = bool(seekable()) if seekable is not None else False
        # files (buffered or raw) and BytesIO read straight into a bytearray; other streams through read()
        raw = isinstance(f, io.RawIOBase) and type(f).readinto is not io.RawIOBase.readinto
        self.readinto = isinstance(f, io.BufferedIOBase) or raw

    def read(self, n: int, what: str) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise tarfile.ReadError(f"unexpected end of data at byte {self.offset + len(data)} ({what})")
        self.offset += n
        return data

    def read_writable(self, n: int, what: str) -> bytearray:
        """n bytes into a fresh bytearray, which torch can wrap without the copy it makes of bytes."""
        if not self.readinto:
            return bytearray(self.read(n, what))
        readinto = self.f.readinto
        data = bytearray(n)
        got = readinto(data)
        if got != n:  # a short read only happens at the end of the file, or in the middle of a pipe
            view = memoryview(data)
            while got and got < n and (more := readinto(view[got:])):
                got += more
            if got != n:
                raise tarfile.ReadError(f"unexpected end of data at byte {self.offset + got} ({what})")
        self.offset += n
        return data

    def skip(self, n: int, what: str) -> None:
        if not self.seekable:
            self.read(n, what)
            return
        self.f.seek(n, 1)
        self.offset += n


def _regular_members(s: _Stream) -> Iterator[tuple[str, int, int]]:
    """(name, size, offset of its first header) of each regular file of the stream, in order, with the stream
    at the member's data: the caller reads or skips the padded data before asking for the next member. The
    offset counts the pax or GNU headers that precede a member, so it is where a shard index says the member's
    sample starts. Ends at the first zero block or at a clean end of file."""
    f = s.f
    pax: dict[str, str] = {}
    long_name: str | None = None
    first: int | None = None  # where the current member's chain of headers began
    while True:
        at = s.offset
        header = f.read(BLOCK)
        if not header or header == _ZERO:
            return
        if len(header) != BLOCK:
            raise tarfile.ReadError(f"truncated tar header at byte {at}")
        s.offset += BLOCK
        _check(header, at)
        first = at if first is None else first
        kind = header[156:157]
        size = _pax_size(pax, at) if "size" in pax and kind not in _META else _number(header[124:136])
        padded = -(-size // BLOCK) * BLOCK
        if kind in _META:
            data = s.read(padded, "extended header")[:size]
            if kind == b"x":
                pax = _pax_records(data, at)
            elif kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue  # global pax headers and long link names say nothing a shard reader needs
        if "path" in pax:
            name = pax["path"]
        elif long_name is not None:
            name = long_name
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:263] == b"ustar\0":  # POSIX ustar: a prefix holds the leading directories
                prefix = header[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        sparse = any(k.startswith("GNU.sparse") for k in pax)
        pax, long_name, start, first = {}, None, first, None
        if kind in _SKIPPED:
            s.skip(padded, name)
            continue
        if kind not in _REGULAR or sparse:
            raise tarfile.ReadError(f"tar member {name!r} at byte {at}: unsupported type {kind!r}")
        yield name, size, start


def iter_members(
    f: BinaryIO, wanted: frozenset[str], offset: int = 0
) -> Iterator[tuple[str, bytearray | None]]:
    """(name, data) of every regular file of the tar stream `f`, in order: data (a bytearray) for the members
    whose extension (what follows the first dot of the base name, lower-cased) is in `wanted`, None for the
    others, whose data is skipped by seeking (or read and dropped on a plain stream). The stream ends at its
    first zero block or at a clean end of file; anything else short or malformed raises tarfile.ReadError
    with its byte offset (counted from `offset`, where `f` starts in its tar: a reader that seeked there)."""
    s = _Stream(f, offset)
    for name, size, _ in _regular_members(s):
        padded = -(-size // BLOCK) * BLOCK
        base = name.rpartition("/")[2]
        if base.partition(".")[2].lower() in wanted:
            data = s.read_writable(size, name)
            s.skip(padded - size, name)
            yield name, data
        else:
            s.skip(padded, name)
            yield name, None


def member_spans(f: BinaryIO) -> Iterator[tuple[str, int, int]]:
    """(name, first byte, end byte) of every regular file of the tar `f`: from its first header (pax and GNU
    headers included) to the end of its padded data. Only headers are read; data is skipped by seeking, so
    on an unbuffered file this reads 512 bytes per header and nothing else."""
    s = _Stream(f)
    for name, size, start in _regular_members(s):
        s.skip(-(-size // BLOCK) * BLOCK, name)
        yield name, start, s.offset
