"""Shard lists: resolve shard specs (local directories, URLs, brace patterns, comma lists of them) against
their manifests. `braceexpand` (webdataset's pattern syntax) expands shard patterns; reading is
dist_seg.data.format.reader.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from braceexpand import braceexpand

from dist_seg.data import IGNORE_INDEX
from dist_seg.data.format.manifest import MANIFEST_NAME, read_manifest
from dist_seg.data.format.remote import RemoteOptions, size, supports_ranges
from dist_seg.data.format.urls import basename, check_url, is_url, join, local_path, parent, redact, server

log = logging.getLogger(__name__)


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


def _one_source(part: str, remote: RemoteOptions) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]]:
    """(directory, manifest, {shard path: its manifest entry}) of one directory or brace pattern."""
    if is_url(part):
        return _one_url_source(part, remote)
    part = local_path(part)
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
    entries = _listed(directory, manifest, names)
    for path, entry in entries.items():
        if not os.path.isfile(path):
            raise ValueError(f"shard {path} is listed in its manifest but does not exist")
        if os.path.getsize(path) != entry["bytes"]:
            log.warning(
                "shard %s is %d bytes, its manifest says %d", path, os.path.getsize(path), entry["bytes"]
            )
    return directory, manifest, entries


def _one_url_source(
    part: str, remote: RemoteOptions
) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]]:
    """As `_one_source`, for a URL: the manifest comes from the URL's directory, and every shard named must
    exist there with its manifest's size (checked now, so a missing shard stops the run before its first step)."""
    check_url(part, "shard spec")
    if "{" in part or part.endswith(".tar"):
        urls = list(braceexpand(part))
        dirs = {parent(u) for u in urls}
        if len(dirs) != 1:
            shown = sorted(redact(d) for d in dirs)
            raise ValueError(
                f"shard pattern {redact(part)!r} spans directories {shown}; give one per directory"
            )
        directory = dirs.pop()
        manifest, names = read_manifest(directory, remote), [basename(u) for u in urls]
    else:
        directory = part.rstrip("/")
        manifest = read_manifest(directory, remote)
        names = [s["name"] for s in manifest["shards"]]
    entries = _listed(directory, manifest, names)
    with ThreadPoolExecutor(max_workers=16) as pool:  # one request per shard: overlap their latencies
        sizes = dict(zip(entries, pool.map(lambda u: _remote_size(u, remote), entries), strict=True))
    for url, entry in entries.items():
        if sizes[url] != entry["bytes"]:
            raise ValueError(
                f"shard {redact(url)} is {sizes[url]} bytes, its manifest says {entry['bytes']}: changed or "
                "replaced since conversion"
            )
    return directory, manifest, entries


def _servers_without_range(urls: list[str], remote: RemoteOptions) -> frozenset[str]:
    """The servers of `urls` that ignore Range requests: one probe per server (remote.supports_ranges)."""
    first = {server(u): u for u in reversed(urls) if is_url(u)}
    try:
        return frozenset(s for s, u in first.items() if not supports_ranges(u, remote))
    except OSError as e:
        raise ValueError(f"cannot read the shards: {e}") from None


def _remote_size(url: str, remote: RemoteOptions) -> int:
    try:
        return size(url, remote)
    except FileNotFoundError:
        raise ValueError(f"shard {redact(url)} is listed in its manifest but does not exist") from None
    except OSError as e:
        raise ValueError(f"shard {redact(url)}: {e}") from e


def _listed(directory: str, manifest: dict[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    """{shard path: manifest entry} for `names`; ValueError for a name the manifest does not list."""
    where = join(directory, MANIFEST_NAME)
    if manifest.get("ignore_index", IGNORE_INDEX) != IGNORE_INDEX:
        raise ValueError(
            f"{redact(where)}: ignore_index {manifest['ignore_index']}, but label maps mark unlabelled pixels "
            f"with {IGNORE_INDEX}"
        )
    listed = {s["name"]: s for s in manifest["shards"]}
    entries = {}
    for name in names:
        if name not in listed:
            raise ValueError(f"shard {redact(join(directory, name))} is not listed in {redact(where)}")
        entries[join(directory, name)] = listed[name]
    return entries


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
    shard_entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> its manifest entry
    no_range: frozenset[str] = frozenset()  # servers (scheme://host:port) that ignore HTTP Range requests

    @property
    def paths(self) -> list[str]:
        return list(self.shard_samples)

    @property
    def total_samples(self) -> int:
        return sum(self.shard_samples.values())

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.classes]


def resolve_shards(spec: str, remote: RemoteOptions | None = None) -> ShardSet:
    """The shards of a directory, comma-joined directories or a brace pattern (local, or URLs read as
    `remote` says), checked against their manifests (every shard listed and present; every directory with the
    same classes and label kind)."""
    remote = remote or RemoteOptions()
    parts = _split_top_level(spec or "")
    if not parts:
        raise ValueError(f"empty shard spec {spec!r}: give a shard directory or a brace pattern")
    entries: dict[str, dict[str, Any]] = {}
    first: tuple[str, dict[str, Any]] | None = None
    stats: list[dict[str, Any]] | None = None
    dirs = []
    for part in parts:
        directory, m, c = _one_source(part, remote)
        if first is None:
            first = (directory, m)
            stats = [dict(s) for s in m["class_stats"]] if m.get("class_stats") else None
        else:
            d0, m0 = first
            a, b = redact(d0), redact(directory)
            if m["classes"] != m0["classes"]:
                n0, n1 = [x["name"] for x in m0["classes"]], [x["name"] for x in m["classes"]]
                raise ValueError(f"shard directories {a} and {b} have different classes: {n0} vs {n1}")
            if m["has_labels"] != m0["has_labels"]:
                raise ValueError(f"shard directories {a} and {b}: one has label maps, the other not")
            if stats is not None and m.get("class_stats"):
                for s, t in zip(stats, m["class_stats"], strict=True):
                    for k in ("pixels", "images", "image_pixels", "instances"):
                        s[k] += t[k]
            else:
                stats = None
        twice = sorted(entries.keys() & c.keys())
        if twice:
            raise ValueError(f"shard {redact(twice[0])} is named twice in {redact(spec)!r}")
        entries.update(c)
        dirs.append(directory)
    assert first is not None
    m0 = first[1]
    return ShardSet(
        spec=spec,
        shard_samples={p: int(entries[p]["samples"]) for p in sorted(entries)},
        num_classes=int(m0["num_classes"]),
        classes=list(m0["classes"]),
        has_labels=bool(m0["has_labels"]),
        class_stats=stats,
        directories=dirs,
        shard_entries={p: entries[p] for p in sorted(entries)},
        no_range=_servers_without_range(sorted(entries), remote),
    )


def dataset_classes(spec: str, num_classes: int | None, remote: RemoteOptions | None = None) -> ShardSet:
    """The shards `spec`, resolved; the one place a dataset's classes are checked against the config.
    `num_classes` is config key model.num_classes: when set it must agree with the shards."""
    shard_set = resolve_shards(spec, remote)
    if num_classes is not None and num_classes != shard_set.num_classes:
        raise ValueError(
            f"config key model.num_classes={num_classes} but the shards {redact(spec)} have "
            f"{shard_set.num_classes} classes"
        )
    return shard_set
