"""The shard cache (data.cache_dir): whole shards named by their sha256, verified before they enter it.

Two datasets can never read each other's shard under a shared name; a file enters the cache only after its
size and sha256 matched the manifest, through a temporary file renamed into place under a per-shard lock
(ranks and workers on one machine fill it together safely), and the least recently used files leave it when
it grows past data.cache_max_gb. A shard is fetched with one streamed GET (dist_seg.data.format.remote), so a
server without Range fills the cache as well as one with it.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from pathlib import Path

from dist_seg.data.format.remote import BLOCK_BYTES, RemoteOptions, RemoteStream
from dist_seg.data.format.urls import redact

log = logging.getLogger(__name__)


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
            h, reader = hashlib.sha256(), RemoteStream(url, 0, nbytes, opts)
            try:
                with open(tmp, "wb") as f:
                    try:
                        while chunk := reader.read(BLOCK_BYTES):
                            h.update(chunk)
                            f.write(chunk)
                    finally:
                        reader.close()
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
