"""dist_seg.data.format.tar_members against Python's tarfile, on every header format shard writers use, and on damage."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import pytest

from dist_seg.data.format.tar_members import _number, iter_members

WANTED = frozenset(("jpg", "seg.png", "json"))


class _Plain(io.RawIOBase):
    """A stream with read() only: no seek, as a URL streamed from its first byte."""

    def __init__(self, data: bytes):
        self._f = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def seekable(self) -> bool:
        return False


def _tar(members: list[tuple[str, bytes]], fmt: int, extras: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if extras:  # a directory and a symlink, which a reader passes over
            d = tarfile.TarInfo("somedir")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            link = tarfile.TarInfo("somedir/link.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, "elsewhere.jpg"
            tar.addfile(link)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _reference(data: bytes) -> list[tuple[str, bytes | None]]:
    out: list[tuple[str, bytes | None]] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            if info.isfile():
                ext = info.name.rpartition("/")[2].partition(".")[2].lower()
                f = tar.extractfile(info)
                assert f is not None
                out.append((info.name, f.read() if ext in WANTED else None))
    return out


def _members(rng: random.Random) -> list[tuple[str, bytes]]:
    long_dir = "/".join(["deep-folder-name"] * 9)  # > 100 characters: ustar prefix, pax or GNU long name
    names = [
        "img-0001.jpg",
        "img-0001.seg.png",
        "img-0001.json",
        "img-0001.pickle",  # never wanted: skipped unread
        f"{long_dir}/img-0002.JPG",
        f"{long_dir}/img-0002.seg.png",
        "caf\u00e9-\u5199\u771f/img-0003.jpg",  # non-ASCII: pax records in utf-8
        "x" * 140 + ".seg.png",  # a long base name: no ustar prefix can hold it
        "empty.json",
    ]
    sizes = [rng.randrange(1, 3000) for _ in names[:-1]] + [0]  # sizes on and off block boundaries
    sizes[1] = 1024
    return [(n, rng.randbytes(s)) for n, s in zip(names, sizes, strict=True)]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
@pytest.mark.parametrize("seekable", [True, False], ids=["file", "stream"])
def test_members_equal_tarfile_on_every_format(fmt: int, seekable: bool) -> None:
    data = _tar(_members(random.Random(fmt)), fmt)
    ref = _reference(data)
    got = list(iter_members(io.BytesIO(data) if seekable else _Plain(data), WANTED))
    assert got == ref
    assert [n for n, d in got if d is None] == ["img-0001.pickle"]


def test_ustar_prefix_joins_the_name() -> None:
    long_dir = "/".join(["folder"] * 20)  # 139 characters of directories, a short base name
    data = _tar([(f"{long_dir}/a.jpg", b"abc")], tarfile.USTAR_FORMAT, extras=False)
    assert list(iter_members(io.BytesIO(data), WANTED)) == [(f"{long_dir}/a.jpg", b"abc")]


def test_shards_of_the_converter_read_as_tarfile_reads_them(tiny_shards: dict[str, Path]) -> None:
    shards = sorted(Path(tiny_shards["train4"]).glob("*.tar")) + sorted(
        Path(tiny_shards["test"]).glob("*.tar")
    )
    assert len(shards) >= 5
    for shard in shards:
        data = shard.read_bytes()
        assert list(iter_members(io.BytesIO(data), WANTED)) == _reference(data)


def test_base256_sizes() -> None:
    field = tarfile.itn(12 * 2**30, 12, tarfile.GNU_FORMAT)  # 12 GiB does not fit 11 octal digits
    assert field[0] & 0x80 and _number(field) == 12 * 2**30
    assert _number(tarfile.itn(1234, 12, tarfile.GNU_FORMAT)) == 1234


def _rechecksummed(data: bytes) -> bytes:
    """`data` with its first header's checksum made valid again, so the damage is what gets reported."""
    header = bytearray(data[:512])
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + data[512:]


def _damage_cases() -> dict[str, tuple[bytes, str]]:
    data = _tar(
        [("a.jpg", b"j" * 700), ("a.seg.png", b"p" * 100), ("b.jpg", b"k" * 10)], tarfile.GNU_FORMAT, False
    )
    header = bytearray(data)
    header[3] ^= 0x20  # one bit of the first member's name
    second = 512 + 1024  # the second member's header: after a.jpg's header and two data blocks
    return {
        "checksum": (bytes(header), "bad tar header checksum at byte 0"),
        "cut in data": (data[:700], "unexpected end of data"),
        "cut in header": (data[: second + 100], f"truncated tar header at byte {second}"),
        "size field": (_rechecksummed(data[:124] + b"notoctal\0\0\0\0" + data[136:]), "invalid number field"),
    }


@pytest.mark.parametrize("case", list(_damage_cases()))
def test_damage_raises_tarfile_read_error_with_the_offset(case: str) -> None:
    data, message = _damage_cases()[case]
    with pytest.raises(tarfile.ReadError, match=message):
        list(iter_members(io.BytesIO(data), WANTED))


def test_a_bad_pax_size_is_a_read_error() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size, info.pax_headers = 3, {"comment": "x" * 20}
        tar.addfile(info, io.BytesIO(b"abc"))
    bad = "-" + "0" * 21 + "1"  # as long as the comment's value, so the record keeps its length
    data = buf.getvalue().replace(b"comment=" + b"x" * 20, b"size=" + bad.encode())
    with pytest.raises(tarfile.ReadError, match=f"invalid pax size '{bad}'"):
        list(iter_members(io.BytesIO(data), WANTED))


def test_a_cut_at_a_member_boundary_is_a_clean_end() -> None:
    # the shard reader's expected sample count is what catches this one (tests/data/test_shards.py)
    data = _tar([("a.jpg", b"j" * 512), ("b.jpg", b"k" * 10)], tarfile.GNU_FORMAT, False)
    assert list(iter_members(io.BytesIO(data[:1024]), WANTED)) == [("a.jpg", b"j" * 512)]
