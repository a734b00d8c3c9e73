"""The shard directory's manifest.json: its name, format tag and version, how it is written and read.

The converter writes it (`write_manifest`); every reader (shard lists, `dist-seg info`) reads it through
`read_manifest`, which refuses a file that is missing, not a dist_seg manifest, or of another format version,
naming the path. Only json and pathlib here: loader workers import this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT = "dist_seg.shards"
FORMAT_VERSION = 1


def write_manifest(shard_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write SHARD_DIR/manifest.json atomically (a reader sees the old file or the new one, never half)."""
    path = Path(shard_dir) / MANIFEST_NAME
    tmp = path.with_name(MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """Load SHARD_DIR/manifest.json; ValueError naming the path when it is missing or not a dist_seg manifest."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(
            f"no {MANIFEST_NAME} in {shard_dir} (convert the dataset with `dist-seg convert` first)"
        )
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid json ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dist_seg shard manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {m.get('format_version')} but this dist_seg reads {FORMAT_VERSION}"
        )
    return m


def manifest_dir(spec: str) -> Path:
    """The directory whose manifest describes the first source of a shard spec (a directory, a comma list of
    them, or a brace pattern of tars in one directory)."""
    first = Path(spec.split(",")[0].strip())
    return first if first.is_dir() else first.parent
