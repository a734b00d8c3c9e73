"""The shard directory's manifest.json: its name, format tag and version, how it is written and read.

The converter writes it (`write_manifest`); every reader (shard lists, `dist-seg info`) reads it through
`read_manifest`, which refuses a file that is missing, not a dist_seg manifest, or of another format version,
naming the path. Only json, pathlib and the URL helpers here: loader workers import this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dist_seg.data.format.remote import RemoteOptions, read_bytes
from dist_seg.data.format.urls import is_url, join, local_path, parent, redact

MANIFEST_NAME = "manifest.json"
FORMAT = "dist_seg.shards"
FORMAT_VERSION = 2  # 2: every shard has an index (sample byte offsets and digests) for ranged reads
READABLE_VERSIONS = (1, 2)  # version 1 directories read as before; over a URL they are streamed from byte 0


def write_manifest(shard_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write SHARD_DIR/manifest.json atomically (a reader sees the old file or the new one, never half)."""
    path = Path(shard_dir) / MANIFEST_NAME
    tmp = path.with_name(MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(shard_dir: str | Path, remote: RemoteOptions | None = None) -> dict[str, Any]:
    """Load SHARD_DIR/manifest.json (SHARD_DIR a local directory or a URL); ValueError naming the path when it
    is missing or not a dist_seg manifest of a version this code reads."""
    where = str(shard_dir)
    if is_url(where):
        path = join(where, MANIFEST_NAME)
        try:
            text = read_bytes(path, remote or RemoteOptions()).decode()
        except FileNotFoundError:
            raise ValueError(
                f"no {MANIFEST_NAME} at {redact(path)} (upload the dataset with `dist-seg convert --out URL`)"
            ) from None
        shown = redact(path)
    else:
        local = Path(shard_dir) / MANIFEST_NAME
        if not local.is_file():
            raise ValueError(
                f"no {MANIFEST_NAME} in {shard_dir} (convert the dataset with `dist-seg convert` first)"
            )
        text, shown = local.read_text(), str(local)
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{shown} is not valid json ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{shown} is not a dist_seg shard manifest")
    if m.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{shown}: format_version {m.get('format_version')} but this dist_seg reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    return m


def manifest_dir(spec: str) -> str:
    """The directory (or URL) whose manifest describes the first source of a shard spec (a directory, a comma
    list of them, or a brace pattern of tars in one directory)."""
    first = spec.split(",")[0].strip()
    if is_url(first):
        return parent(first) if first.endswith(".tar") or "{" in first else first.rstrip("/")
    first = local_path(first)
    return first if os.path.isdir(first) else os.path.dirname(first) or "."
