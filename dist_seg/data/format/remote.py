"""Shards at URLs: fsspec filesystems, ranged reads with bounded retries, integrity checks, the local cache.

Any fsspec URL names shards (`https://`, `s3://` with the `s3` extra, `gs://` with `gcs`, ...); a path
without a scheme, or `file://`, stays a local path and is read as before. Credentials come from each
protocol's own sources (AWS_* variables and profiles for s3, .netrc for HTTP, ...): a URL that carries a
password is refused, and every message prints URLs with user info and query strings removed.

Reads are ranged: a reader fetches only the bytes of its samples, in blocks of `BLOCK_BYTES`. A transient
fault (connection reset, timeout, HTTP 5xx/408/429) is retried from the block it interrupted, with
exponential backoff, data.remote_retries times; then, like a missing file or a 4xx answer at once, it is a
ShardError naming the URL. Retries are logged and counted per process (`retry_count`).

The cache (data.cache_dir) holds whole shards named by their sha256, so two datasets can never read each
other's shard under a shared name; a file enters it only after its size and sha256 matched the manifest,
through a temporary file renamed into place under a per-shard lock (ranks and workers on one machine fill it
together safely), and the least recently used files leave it when it grows past data.cache_max_gb.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

BLOCK_BYTES = 4 << 20  # one ranged request; large enough that per-request latency is noise on a LAN
BACKOFF_S, BACKOFF_MAX_S = 0.5, 8.0
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_retries = 0  # transient faults retried in this process

T = TypeVar("T")


class RemoteError(OSError):
    """A URL that cannot be read (after retries, where the fault was transient); the message names the URL."""


@dataclass(frozen=True)
class RemoteOptions:
    """How URLs are read: from the data.remote_* and data.cache_* config keys."""

    retries: int = 5
    timeout_s: float = 60.0
    cache_dir: str | None = None
    cache_max_gb: float = 100.0

    @classmethod
    def from_config(cls, cfg: Any) -> RemoteOptions:
        return cls(cfg.remote_retries, cfg.remote_timeout_s, cfg.cache_dir, cfg.cache_max_gb)


# ---------------------------------------------------------------------------------------------- names
def is_url(spec: str) -> bool:
    """True for `scheme://...` other than file://, which is a local path."""
    m = _SCHEME.match(spec.strip())
    return bool(m) and m.group(1).lower() != "file"


def local_path(spec: str) -> str:
    """A local path for `spec`: file:// prefixes removed."""
    s = spec.strip()
    return s[len("file://") :] if s.lower().startswith("file://") else s


def redact(url: str) -> str:
    """The URL as messages print it: no user info, no query string (signed URLs carry secrets there)."""
    if not is_url(url):
        return url
    p = urlsplit(url)
    host = p.hostname or ""
    netloc = host + (f":{p.port}" if p.port else "")
    return urlunsplit((p.scheme, netloc, p.path, "..." if p.query else "", ""))


def check_url(url: str, what: str) -> None:
    """Refuse a URL that carries credentials: they belong to the protocol's own sources, not a config file."""
    p = urlsplit(url)
    if p.password is not None:
        raise ValueError(
            f"{what}: the URL {redact(url)} carries a password; remove it and give credentials the protocol's "
            "own way (AWS_* variables or profiles for s3://, ~/.netrc for https://, ...)"
        )


def join(base: str, name: str) -> str:
    """`base/name` for a URL or a local path (a URL keeps its `//`)."""
    return base.rstrip("/") + "/" + name if is_url(base) else os.path.join(base, name)


def parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------------------- filesystems
def _storage_options(protocol: str, opts: RemoteOptions) -> dict[str, Any]:
    """Timeouts for the protocols we test; other protocols get fsspec's defaults."""
    t = opts.timeout_s
    if protocol in ("http", "https"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)
        return {"client_kwargs": {"timeout": timeout, "trust_env": True}}
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": t, "read_timeout": t}}
    return {}


def filesystem(url: str, opts: RemoteOptions) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for `url`; fsspec caches the instances per process."""
    import fsspec

    protocol = _SCHEME.match(url).group(1).lower()  # type: ignore[union-attr]
    try:
        return fsspec.core.url_to_fs(url, **_storage_options(protocol, opts))
    except (ImportError, ValueError) as e:
        extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol)
        hint = f" (pip install 'dist-seg[{extra}]')" if extra else ""
        raise RemoteError(f"cannot open {redact(url)}: {e}{hint}") from e


def _transient(e: BaseException) -> bool:
    """A fault worth retrying: connection-level errors, timeouts, and server-side HTTP statuses."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    status = getattr(e, "status", None)
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    if isinstance(e, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    module = type(e).__module__.split(".")[0]
    if module in ("aiohttp", "botocore", "aiobotocore", "urllib3", "requests", "fsspec"):
        return True  # payload cut short, server disconnected, fsspec's own timeout...
    return isinstance(e, OSError)


def with_retries(what: str, url: str, opts: RemoteOptions, call: Callable[[], T]) -> T:
    """`call()`, retried with backoff on transient faults; RemoteError naming `url` when it keeps failing,
    FileNotFoundError naming it at once when it does not exist."""
    global _retries
    for attempt in range(opts.retries + 1):
        try:
            return call()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{redact(url)} does not exist ({what})") from e
        except Exception as e:  # classified below; anything not transient propagates at once
            if not _transient(e):
                raise RemoteError(f"{what} {redact(url)}: {type(e).__name__}: {e}") from e
            if attempt == opts.retries:
                raise RemoteError(
                    f"{what} {redact(url)}: still failing after {opts.retries} retries: {type(e).__name__}: {e}"
                ) from e
            _retries += 1
            delay = min(BACKOFF_MAX_S, BACKOFF_S * 2**attempt)
            log.warning(
                "%s %s: %s: %s; retry %d/%d in %.1f s",
                what,
                redact(url),
                type(e).__name__,
                e,
                attempt + 1,
                opts.retries,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def retry_count() -> int:
    """Transient faults retried so far in this process."""
    return _retries


def read_bytes(url: str, opts: RemoteOptions, start: int | None = None, end: int | None = None) -> bytes:
    """Bytes [start, end) of `url` (all of it by default), retried; a short answer is an error."""
    fs, path = filesystem(url, opts)
    what = "reading" if start is None else f"reading bytes {start}-{end}"
    data = with_retries(what, url, opts, lambda: fs.cat_file(path, start=start, end=end))
    if start is not None and end is not None and len(data) != end - start:
        raise RemoteError(
            f"{redact(url)}: asked for bytes {start}-{end} ({end - start}), got {len(data)}: the server "
            "ignores Range requests or the file is shorter than its manifest says"
        )
    return bytes(data)


def size(url: str, opts: RemoteOptions) -> int:
    fs, path = filesystem(url, opts)
    info = with_retries("checking", url, opts, lambda: fs.info(path))
    return int(info["size"])


def exists(url: str, opts: RemoteOptions) -> bool:
    fs, path = filesystem(url, opts)
    return bool(with_retries("checking", url, opts, lambda: fs.exists(path)))


class RangeReader:
    """Sequential reads of bytes [start, end) of a URL, fetched BLOCK_BYTES at a time; a transient fault is
    retried from the start of the interrupted block, so a reset mid-shard costs one block, not the shard."""

    def __init__(self, url: str, start: int, end: int, opts: RemoteOptions):
        self.url, self.pos, self.end, self.opts = url, start, end, opts
        self._buf, self._at = b"", 0

    def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (all that is left for n < 0); shorter only at the end of the range."""
        n = self.end - self.pos if n < 0 else min(n, self.end - self.pos)
        parts = []
        while n > 0:
            if self._at == len(self._buf):
                hi = min(self.end, self.pos + max(n, BLOCK_BYTES))
                self._buf, self._at = read_bytes(self.url, self.opts, self.pos, hi), 0
            take = self._buf[self._at : self._at + n]
            self._at += len(take)
            self.pos += len(take)
            n -= len(take)
            parts.append(take)
        return b"".join(parts)

    def read_exact(self, n: int) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise RemoteError(f"{redact(self.url)}: ended at byte {self.pos}, {n - len(data)} bytes early")
        return data


# ---------------------------------------------------------------------------------------------- cache
def cached_copy(url: str, nbytes: int, sha256: str, opts: RemoteOptions) -> str:
    """A verified local copy of the shard at `url` in data.cache_dir, downloaded when not already there."""
    assert opts.cache_dir is not None
    root = Path(opts.cache_dir)
    path = root / sha256[:2] / f"{sha256}.tar"
    if _fresh(path, nbytes):
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one filler per shard and machine; the others wait, then reuse
        try:
            if _fresh(path, nbytes):
                return str(path)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
            h, reader = hashlib.sha256(), RangeReader(url, 0, nbytes, opts)
            try:
                with open(tmp, "wb") as f:
                    while chunk := reader.read(BLOCK_BYTES):
                        h.update(chunk)
                        f.write(chunk)
                if reader.pos != nbytes or h.hexdigest() != sha256:
                    raise CorruptShard(
                        f"{redact(url)}: downloaded {reader.pos} bytes with sha256 {h.hexdigest()[:16]}..., but "
                        f"its manifest says {nbytes} bytes, sha256 {sha256[:16]}...: changed or corrupted since "
                        "conversion"
                    )
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _evict(root, int(opts.cache_max_gb * 1e9), keep=path)
    return str(path)


class CorruptShard(ValueError):
    """Bytes that do not match the manifest or the shard index."""


def _fresh(path: Path, nbytes: int) -> bool:
    try:
        if path.stat().st_size != nbytes:
            return False
        os.utime(path)  # the cache evicts by last use
        return True
    except FileNotFoundError:
        return False


def _evict(root: Path, max_bytes: int, keep: Path) -> None:
    """Delete the least recently used shards until the cache fits `max_bytes` (never `keep`, just added).
    A reader that has a deleted file open still reads it: POSIX keeps the data until it closes."""
    files = []
    for p in root.glob("*/*.tar"):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue  # another process evicted it
        files.append((st.st_mtime, st.st_size, p))
    total = sum(s for _, s, _ in files)
    for _, s, p in sorted(files):
        if total <= max_bytes:
            break
        if p == keep:
            continue
        p.unlink(missing_ok=True)
        total -= s
        log.info("cache %s: evicted %s (%d bytes) to stay under data.cache_max_gb", root, p.name, s)


# ---------------------------------------------------------------------------------------------- publishing
def publish(local_dir: Path, url: str, names: list[str], manifest_name: str, opts: RemoteOptions) -> None:
    """Upload a converted shard directory to `url`: the old manifest goes first and the new one last, so a
    reader never finds a manifest next to a half-written set of shards; shards the new set does not name
    are deleted."""
    fs, root = filesystem(url, opts)
    target = join(url, manifest_name)
    _, mpath = filesystem(target, opts)
    if with_retries("checking", target, opts, lambda: fs.exists(mpath)):
        with_retries("deleting", target, opts, lambda: fs.rm_file(mpath))
    try:
        old = [p for p in fs.ls(root, detail=False) if basename(p).startswith("shard-")]
    except (FileNotFoundError, NotImplementedError):
        old = []
    keep = set(names)
    for p in old:
        if basename(p) not in keep:
            fs.rm_file(p)
    for name in [*names, manifest_name]:
        dest = join(url, name)
        _, dpath = filesystem(dest, opts)
        with_retries("uploading to", dest, opts, lambda s=str(local_dir / name), d=dpath: fs.put_file(s, d))
