"""Shards at URLs: fsspec filesystems, streamed and ranged reads with bounded retries, servers without Range.

Any fsspec URL names shards (`https://`, `s3://` with the `s3` extra, `gs://` with `gcs`, ...); a path
without a scheme, or `file://`, stays a local path and is read as before. Credentials come from each
protocol's own sources (AWS_* variables and profiles for s3, ~/.netrc or an fsspec config for HTTP, ...) or
from a URL's user info or token parameter, which are never written or printed (dist_seg.data.format.urls
owns the names and their redaction; its functions are re-exported here).

Reads are streams (`RemoteStream`): one request per run of bytes a reader needs, read as it goes. Over HTTP a
run is one GET with a Range header; a server that ignores Range (it answers 200 with the whole file, as
`python -m http.server` and some proxies and gateways do) is detected at its first answer and from then on
read as one stream per shard from its first byte, which the shard reader continues window after window
instead of asking again (`supports_ranges` probes a server up front, so rank 0 can warn once). Other
protocols read in ranged blocks of `BLOCK_BYTES`. A transient fault (connection reset, timeout, HTTP
5xx/408/429, a body cut short) is retried from the byte it interrupted (without Range: the stream is
reopened and read up to that byte again), with exponential backoff, data.remote_retries times; then, like a
missing file or a 4xx answer at once, it is a ShardError naming the URL. Retries are logged and counted per
process (`retry_count`).

The cache of whole shards (data.cache_dir) is dist_seg.data.format.cache, which downloads through here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dist_seg.data.format.urls import basename, join, redact, server

log = logging.getLogger(__name__)

BLOCK_BYTES = 4 << 20  # one ranged request; large enough that per-request latency is noise on a LAN
BACKOFF_S, BACKOFF_MAX_S = 0.5, 8.0
_retries = 0  # transient faults retried in this process
_received = 0  # body bytes RemoteStreams received in this process

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

    protocol = url.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(url, **_storage_options(protocol, opts))
    except (ImportError, ValueError) as e:
        extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol)
        hint = f" (pip install 'dist-seg[{extra}]')" if extra else ""
        raise RemoteError(f"cannot open {redact(url)}: {e}{hint}") from e


def _transient(e: BaseException) -> bool:
    """A fault worth retrying: connection-level errors, timeouts, and server-side HTTP statuses."""
    if isinstance(
        e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, RemoteError)
    ):
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
        except FileNotFoundError:
            raise FileNotFoundError(f"{redact(url)} does not exist ({what})") from None
        except RemoteError:  # ours, already naming the URL: not transient
            raise
        except Exception as e:  # classified below; anything not transient propagates at once
            # the cause is shown redacted, and not chained: its own text may quote the URL with its credential
            cause = redact(f"{type(e).__name__}: {e}")
            if not _transient(e):
                raise RemoteError(f"{what} {redact(url)}: {cause}") from None
            if attempt == opts.retries:
                raise RemoteError(
                    f"{what} {redact(url)}: still failing after {opts.retries} retries: {cause}"
                ) from None
            _retries += 1
            delay = min(BACKOFF_MAX_S, BACKOFF_S * 2**attempt)
            log.warning(
                "%s %s: %s; retry %d/%d in %.1f s", what, redact(url), cause, attempt + 1, opts.retries, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def retry_count() -> int:
    """Transient faults retried so far in this process."""
    return _retries


def bytes_received() -> int:
    """Body bytes the shard streams of this process have received so far, dropped ones included (a server
    without Range sends what lies before a reader's first sample too)."""
    return _received


def read_bytes(url: str, opts: RemoteOptions) -> bytes:
    """All of `url` (a manifest, an index), retried; any server serves it, with or without Range."""
    fs, path = filesystem(url, opts)
    return bytes(with_retries("reading", url, opts, lambda: fs.cat_file(path)))


def size(url: str, opts: RemoteOptions) -> int:
    fs, path = filesystem(url, opts)
    info = with_retries("checking", url, opts, lambda: fs.info(path))
    return int(info["size"])


def exists(url: str, opts: RemoteOptions) -> bool:
    fs, path = filesystem(url, opts)
    return bool(with_retries("checking", url, opts, lambda: fs.exists(path)))


# ---------------------------------------------------------------------------------------------- streams
_no_range: set[str] = set()  # servers (scheme://host:port) seen answering a Range request with the whole file
_probed: dict[str, bool] = {}  # server -> supports_ranges' answer, once per process


def _http(url: str) -> bool:
    return url.split("://", 1)[0].lower() in ("http", "https")


def ranges_ignored(url: str) -> bool:
    """True once this process has seen `url`'s server ignore a Range request (or was told so)."""
    return server(url) in _no_range


def note_ranges_ignored(servers: frozenset[str] | set[str]) -> None:
    """Record servers known to ignore Range (ShardSet.no_range, probed by the rank): read them as streams."""
    _no_range.update(servers)


def supports_ranges(url: str, opts: RemoteOptions) -> bool:
    """Whether `url`'s server honours Range requests: one GET of its first byte, answered 206 or, by a server
    that ignores Range, 200 with the whole file (closed unread). Only HTTP can ignore them; other protocols
    (s3, gs, ...) always read ranges."""
    if not _http(url):
        return True
    if server(url) not in _probed:
        stream = RemoteStream(url, 0, 1, opts, probe=True)
        try:
            stream.read(1)
        finally:
            stream.close()
        _probed[server(url)] = not ranges_ignored(url)
    return _probed[server(url)]


class RemoteStream:
    """Sequential reads of bytes [start, end) of a URL. Over HTTP one GET with a Range header, read as it goes
    (a server that answers it with the whole file, 200, is recorded as ignoring Range, warned about once per
    process, and read from byte 0 with the bytes before `start` dropped); over other protocols ranged blocks
    of BLOCK_BYTES. A transient fault closes the request and opens a new one at the byte reached (without
    Range that means from byte 0 again), retried and counted by `with_retries`; an answer that ends early is
    such a fault. `received` counts the body bytes this stream received, dropped ones included (and
    `bytes_received` those of every stream of the process)."""

    def __init__(self, url: str, start: int, end: int, opts: RemoteOptions, probe: bool = False):
        self.url, self.pos, self.end, self.opts = url, start, end, opts
        self.received = 0  # body bytes received, those dropped to reach `start` without Range included
        self._probe = probe
        self._f: Any = None  # the open HTTP response (fsspec's streaming file)
        self._buf, self._at = b"", 0  # the current block, for protocols read in blocks

    def _open_http(self) -> None:
        fs, path = filesystem(self.url, self.opts)
        headers = dict(fs.kwargs.get("headers") or {})  # keep an fsspec config's headers (Authorization...)
        whole = ranges_ignored(self.url)
        if not whole:
            headers["Range"] = f"bytes={self.pos}-{self.end - 1}"
        # block_size=0: fsspec's streaming file, one GET read as it goes; `r` is its aiohttp response
        f = fs.open(path, "rb", block_size=0, size=max(1, self.end), headers=headers)
        status = f.r.status
        if "Range" in headers and status == 200:
            if server(self.url) not in _no_range and not self._probe:  # a probe's caller warns
                log.warning(
                    "%s ignores HTTP Range requests (it answered a ranged GET of %s with the whole file): "
                    "its shards are read as streams from their first byte from now on",
                    server(self.url),
                    redact(self.url),
                )
            _no_range.add(server(self.url))
            whole = True
        elif "Range" in headers and status != 206:
            f.close()
            raise RemoteError(f"{redact(self.url)}: a ranged GET was answered with HTTP {status}")
        elif status == 206:
            got = f.r.headers.get("Content-Range", "")
            if not got.startswith(f"bytes {self.pos}-"):
                f.close()
                raise RemoteError(f"{redact(self.url)}: asked for bytes from {self.pos}, got {got!r}")
        self._f = f
        if whole and self.pos > 0 and not self._probe:  # from byte 0: drop what comes before `pos`
            left = self.pos
            while left:
                chunk = f.read(min(left, BLOCK_BYTES))
                if not chunk:
                    raise ConnectionError(f"the answer ended at byte {self.pos - left} of {self.end}")
                self._count(len(chunk))
                left -= len(chunk)

    def _read_http(self, n: int) -> bytes:
        if self._f is None:
            self._open_http()
        data = self._f.read(n)
        if not data:
            raise ConnectionError(f"the answer ended at byte {self.pos}, before byte {self.end}")
        self._count(len(data))
        return data

    def _count(self, n: int) -> None:
        global _received
        self.received += n
        _received += n

    def _read_block(self, n: int) -> bytes:
        if self._at == len(self._buf):
            fs, path = filesystem(self.url, self.opts)
            hi = min(self.end, self.pos + max(n, BLOCK_BYTES))
            data = fs.cat_file(path, start=self.pos, end=hi)
            if len(data) != hi - self.pos:
                raise RemoteError(
                    f"{redact(self.url)}: asked for bytes {self.pos}-{hi} ({hi - self.pos}), got "
                    f"{len(data)}: the file is shorter than its manifest says"
                )
            self._count(len(data))
            self._buf, self._at = data, 0
        take = self._buf[self._at : self._at + n]
        self._at += len(take)
        return take

    def _read_some(self, n: int) -> bytes:
        try:
            return self._read_http(n) if _http(self.url) else self._read_block(n)
        except BaseException:
            self.close()  # the next attempt opens a new request at self.pos
            raise

    def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (all that is left for n < 0); shorter only at the end of the range."""
        n = self.end - self.pos if n < 0 else min(n, self.end - self.pos)
        parts = []
        while n > 0:
            what = f"reading bytes {self.pos}-{self.end}"
            data = with_retries(what, self.url, self.opts, lambda n=n: self._read_some(n))
            self.pos += len(data)
            n -= len(data)
            parts.append(data)
        return b"".join(parts)

    def read_exact(self, n: int) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise RemoteError(f"{redact(self.url)}: ended at byte {self.pos}, {n - len(data)} bytes early")
        return data

    def skip_to(self, pos: int) -> None:
        """Move forward to byte `pos`, reading and dropping what lies between (a stream cannot seek)."""
        if pos < self.pos:
            raise ValueError(f"{redact(self.url)}: cannot move back from byte {self.pos} to {pos}")
        while self.pos < pos:
            self.read(min(pos - self.pos, BLOCK_BYTES))

    def close(self) -> None:
        if self._f is not None:
            f, self._f = self._f, None
            try:
                f.close()
            except Exception:  # closing a broken connection: nothing left to release
                pass
        self._buf, self._at = b"", 0


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
