"""COCO instances dataset -> webdataset tar shards + manifest.json (the data contract, docs/design.md §1).

    dist-seg convert --coco ann.json --images DIR --out shards/train [--overlap area] [--workers 4]
    python -m dist_seg.data.prep.convert --coco ann.json --images DIR --out shards/train

Samples are written in json order to a staging tar first; once the number of good samples is known, the staging
tar is split into shards of near-equal sample counts. That keeps memory flat (one image per worker in flight)
and makes shard contents independent of --workers, so re-runs are byte-identical.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dist_seg.data import IGNORE_INDEX
from dist_seg.data.format.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, write_manifest
from dist_seg.data.format.remote import RemoteOptions, publish
from dist_seg.data.format.urls import check_url, is_url, local_path
from dist_seg.data.format.writer import fixed_tarinfo, plan_shard_counts, split_staging
from dist_seg.data.prep.coco import (
    CROWD_POLICIES,
    OVERLAP_POLICIES,
    ClassMap,
    ImageEntry,
    Problem,
    Report,
    build_class_map,
    index_dataset,
    load_coco,
)
from dist_seg.data.prep.images import read_image
from dist_seg.data.prep.pool import ordered_map
from dist_seg.data.prep.raster import class_count, decode_instances, instance_count, rasterise
from dist_seg.runtime.progress_lines import progress

DEFAULT_SAMPLES_PER_SHARD = 1000
_STAGING = ".staging.tar"


@dataclass
class ConvertOptions:
    coco: str
    images: str
    out: str
    overlap: str = "area"
    crowd: str = "include"
    classes: list[str] | None = None
    samples_per_shard: int | None = None
    shard_size_mb: float | None = None
    min_shards: int = 1
    workers: int = 1
    strict: bool = False
    no_labels: bool = False
    progress: bool = True


@dataclass
class SampleResult:
    key: str
    members: list[tuple[str, bytes]]
    class_pixels: np.ndarray | None  # int64 [256] pixel count per label value
    instances_per_class: np.ndarray | None  # int64 [num_classes]
    multi_instance: int
    multi_class: int
    actions: list[str]


def _png_bytes(label: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(label, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _process(
    entry: ImageEntry, images_dir: str, class_map: ClassMap, overlap: str, crowd: str, labels: bool
) -> tuple[SampleResult | None, Problem | None]:
    decoded, problem = read_image(Path(images_dir) / entry.file_name, entry)
    if decoded is None:
        return None, problem
    meta: dict[str, Any] = {
        "key": entry.key,
        "image_id": entry.image_id,
        "file_name": entry.file_name,
        "width": decoded.width,
        "height": decoded.height,
        "image_format": decoded.ext,
        "actions": decoded.actions,
    }
    members = [(f"{entry.key}.{decoded.ext}", decoded.data)]
    result = SampleResult(entry.key, members, None, None, 0, 0, decoded.actions)
    if labels:
        inst = decode_instances(entry)
        label = rasterise(inst, entry.height, entry.width, overlap, crowd)
        meta.update(instances=len(inst), dropped_annotations=entry.dropped_anns, overlap_policy=overlap)
        members.append((f"{entry.key}.seg.png", _png_bytes(label)))
        result.class_pixels = np.bincount(label.ravel(), minlength=256).astype(np.int64)
        result.instances_per_class = np.bincount(
            [i.cls for i in inst], minlength=class_map.num_classes
        ).astype(np.int64)
        result.multi_instance = int((instance_count(inst, entry.height, entry.width) >= 2).sum())
        result.multi_class = int((class_count(inst, entry.height, entry.width) >= 2).sum())
    members.insert(1, (f"{entry.key}.json", json.dumps(meta, sort_keys=True).encode()))
    return result, None


class _Stats:
    def __init__(self, num_classes: int):
        self.pixels = np.zeros(256, np.int64)
        self.images = np.zeros(num_classes, np.int64)
        self.image_pixels = np.zeros(num_classes, np.int64)
        self.instances = np.zeros(num_classes, np.int64)
        self.multi_instance = self.multi_class = self.images_with_overlap = self.annotations = 0

    def add(self, r: SampleResult) -> None:
        assert r.class_pixels is not None and r.instances_per_class is not None
        n = len(self.images)
        self.pixels += r.class_pixels
        present = r.class_pixels[:n] > 0
        self.images += present
        self.image_pixels += present * int(r.class_pixels[:n].sum())
        self.instances += r.instances_per_class
        self.annotations += int(r.instances_per_class.sum())
        self.multi_instance += r.multi_instance
        self.multi_class += r.multi_class
        self.images_with_overlap += r.multi_instance > 0


def convert(opts: ConvertOptions) -> dict[str, Any]:
    """Convert and return the manifest (also written to OUT/manifest.json). An fsspec URL as OUT
    (`s3://bucket/prefix`, ...) is written locally first, then uploaded with its manifest last."""
    if is_url(opts.out):
        check_url(opts.out, "--out")
        with tempfile.TemporaryDirectory(prefix="dist-seg-convert-") as tmp:
            manifest = convert(replace(opts, out=tmp))
            names = [n for s in manifest["shards"] for n in (s["name"], s["index"])]
            publish(Path(tmp), opts.out, names, MANIFEST_NAME, RemoteOptions())
        return manifest
    opts = replace(opts, out=local_path(opts.out))
    if opts.overlap not in OVERLAP_POLICIES:
        raise ValueError(f"--overlap {opts.overlap!r}: choose from {', '.join(OVERLAP_POLICIES)}")
    if opts.crowd not in CROWD_POLICIES:
        raise ValueError(f"--crowd {opts.crowd!r}: choose from {', '.join(CROWD_POLICIES)}")
    if not Path(opts.images).is_dir():
        raise ValueError(f"--images {opts.images}: not a directory")
    coco = load_coco(opts.coco)
    labels = "annotations" in coco and not opts.no_labels
    class_map = build_class_map(coco["categories"], opts.classes)
    # warnings go through the progress bar once there is one (the total is known after indexing)
    bar = progress(0, "convert", enabled=False)
    report = Report(strict=opts.strict, warn=lambda m: bar.write(m))
    entries = index_dataset(coco, class_map, report, opts.crowd)

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("shard-*.tar"), *out.glob("shard-*.idx.json")]:
        old.unlink()  # a previous conversion with more shards must not leave stale ones behind
    staging = out / _STAGING
    stats = _Stats(class_map.num_classes)
    written = total_bytes = 0
    try:
        with tarfile.open(staging, "w", format=tarfile.GNU_FORMAT) as tar:
            bar = progress(len(entries), "convert", enabled=opts.progress)
            args = (opts.images, class_map, opts.overlap, opts.crowd, labels)
            for result, problem in ordered_map(_process, entries, opts.workers, args):
                bar.update(1)
                if result is None:
                    report.problem(problem)
                    continue
                for name, data in result.members:
                    tar.addfile(fixed_tarinfo(name, len(data)), io.BytesIO(data))
                    total_bytes += len(data)
                for action in result.actions:
                    if action != "kept_original":
                        report.repaired[action] += 1
                if labels:
                    stats.add(result)
                written += 1
            bar.close()
        spp = opts.samples_per_shard
        if spp is None and opts.shard_size_mb is None:
            spp = DEFAULT_SAMPLES_PER_SHARD
        counts = plan_shard_counts(written, total_bytes, spp, opts.shard_size_mb, opts.min_shards)
        shards = split_staging(staging, out, counts)
    finally:
        staging.unlink(missing_ok=True)

    manifest = _manifest(opts, coco, class_map, report, stats if labels else None, shards, written)
    write_manifest(out, manifest)
    return manifest


def _manifest(
    opts: ConvertOptions,
    coco: dict[str, Any],
    class_map: ClassMap,
    report: Report,
    stats: _Stats | None,
    shards: list[dict[str, Any]],
    written: int,
) -> dict[str, Any]:
    m: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "has_labels": stats is not None,
        "num_classes": class_map.num_classes,
        "ignore_index": IGNORE_INDEX,
        "classes": class_map.to_json(),
        "total_samples": written,
        "shards": shards,
        "source": {"coco": str(opts.coco), "images": str(opts.images)},
        "counts": {
            "images_in_json": len(coco["images"]),
            "annotations_in_json": len(coco.get("annotations") or []),
            "images_written": written,
        },
    }
    if stats is not None:
        n = class_map.num_classes
        m["counts"]["annotations_used"] = stats.annotations
        m["class_stats"] = [
            {
                "index": i,
                "name": class_map.names[i],
                "pixels": int(stats.pixels[i]),
                "images": int(stats.images[i]),
                "image_pixels": int(stats.image_pixels[i]),
                "instances": int(stats.instances[i]),
            }
            for i in range(n)
        ]
        labelled = int(stats.pixels[:n].sum())
        m["ignore_pixels"] = int(stats.pixels[IGNORE_INDEX])
        m["overlap"] = {
            "policy": opts.overlap,
            "labelled_pixels": labelled,
            "pixels_multi_instance": stats.multi_instance,
            "pixels_multi_class": stats.multi_class,
            "images_with_overlap": stats.images_with_overlap,
        }
    options = asdict(opts)
    for k in ("coco", "images", "out", "workers", "progress"):
        options.pop(k)  # where and how fast do not change the output
    m["options"] = options
    m["dropped"] = dict(sorted(report.dropped.items()))
    m["repaired"] = dict(sorted(report.repaired.items()))
    m["remapped"] = dict(sorted(report.remapped.items()))
    return m


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-seg convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--coco", required=True, help="COCO instances json")
    p.add_argument("--images", required=True, help="directory the json's file_name entries are relative to")
    p.add_argument(
        "--out",
        required=True,
        help="output directory for shard-NNNNNN.tar, their indexes and manifest.json; or an fsspec URL "
        "(s3://bucket/prefix, gs://..., with credentials from the protocol's usual sources) to upload them to",
    )
    p.add_argument(
        "--overlap", default="area", choices=OVERLAP_POLICIES, help="how overlapping instances are resolved"
    )
    p.add_argument(
        "--crowd", default="include", choices=CROWD_POLICIES, help="crowd regions: paint, 255, or drop"
    )
    p.add_argument("--classes", default=None, help="comma-separated class names to keep, in this order")
    p.add_argument("--samples-per-shard", type=int, default=None, help=f"default {DEFAULT_SAMPLES_PER_SHARD}")
    p.add_argument("--shard-size-mb", type=float, default=None, help="target shard size in MB")
    p.add_argument(
        "--min-shards", type=int, default=1, help="at least this many shards (ranks x loader workers)"
    )
    p.add_argument("--workers", type=int, default=1, help="parallel conversion processes")
    p.add_argument("--strict", action="store_true", help="stop at the first bad item instead of skipping it")
    p.add_argument(
        "--no-labels", action="store_true", help="image-only shards (test split) even if annotated"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    classes = [c.strip() for c in a.classes.split(",") if c.strip()] if a.classes else None
    for flag, v in (
        ("--samples-per-shard", a.samples_per_shard),
        ("--min-shards", a.min_shards),
        ("--workers", a.workers),
    ):
        if v is not None and v < 1:
            print(f"dist-seg convert: {flag} must be >= 1", file=sys.stderr)
            return 2
    opts = ConvertOptions(
        a.coco,
        a.images,
        a.out,
        a.overlap,
        a.crowd,
        classes,
        a.samples_per_shard,
        a.shard_size_mb,
        a.min_shards,
        a.workers,
        a.strict,
        a.no_labels,
        not a.quiet,
    )
    try:
        m = convert(opts)
    except (ValueError, OSError) as e:  # OSError: an upload that failed after its retries
        print(f"dist-seg convert: error: {e}", file=sys.stderr)
        return 1
    size = sum(s["bytes"] for s in m["shards"]) / 1e6
    problems = "; ".join(
        f"{t}: " + ", ".join(f"{k}={v}" for k, v in m[t].items())
        for t in ("dropped", "repaired", "remapped")
        if m[t]
    )
    print(
        f"converted {m['total_samples']} of {m['counts']['images_in_json']} images into {len(m['shards'])} shards "
        f"({size:.1f} MB) in {a.out}; {problems or 'no problems found'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
