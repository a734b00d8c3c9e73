"""Exploratory report of a COCO instances dataset: class balance and, above all, pixels with several labels.

    dist-seg eda --coco ann.json --images DIR --out eda/ [--overlap area] [--crowd include] [--workers 4]
    python -m dist_seg.data.prep.eda.report --coco ann.json --images DIR --out eda/

Writes OUT/summary.json (every figure, machine-readable; `suggested_class_weights` is what `loss.class_weights`
can point at), OUT/report.md (tables with the plots embedded) and the PNG plots.

Reading, validation and rasterisation are the converter's (dist_seg.data.prep.coco): bad items are reported with the
same reasons and wording, and label maps are exactly what `dist-seg convert --overlap POLICY` would write.
Statistics need only the json; image files are read for the gallery alone. Memory stays flat with dataset size:
images are streamed, only counts are accumulated (plus one integer area per annotation for the medians), and the
gallery keeps the positions of the top-k overlap images and re-renders them at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dist_seg.data import IGNORE_INDEX
from dist_seg.data.class_weights import median_frequency_weights
from dist_seg.data.prep.coco import (
    CROWD_POLICIES,
    OVERLAP_POLICIES,
    ClassMap,
    ImageEntry,
    Report,
    build_class_map,
    index_dataset,
    load_coco,
)
from dist_seg.data.prep.eda.totals import ImageStats, Totals
from dist_seg.data.prep.pool import ordered_map
from dist_seg.data.prep.raster import (
    Instance,
    class_count,
    decode_instances,
    instance_count,
    paint_order,
    rasterise,
)
from dist_seg.runtime.progress_lines import progress as progress_lines

SUMMARY_NAME = "summary.json"
SMALL_AREA, LARGE_AREA = 32**2, 96**2  # COCO's small / medium / large thresholds (decoded mask pixels)

MATRIX_DEFINITION = (
    "matrix[a][b] = number of pixels that the 'area' rule labels a (the smallest instance covering the pixel "
    "is of class a and is painted on top) while an instance of class b lies underneath; a pixel counts once "
    "per distinct class underneath. Rows: class on top (inside); columns: class underneath. The diagonal counts "
    "an instance lying on another instance of the same class."
)
WEIGHTS_FORMULA = (
    "weight_c = median(freq) / freq_c with freq_c = pixels_c / image_pixels_c, where pixels_c counts the "
    "pixels labelled c under the chosen overlap policy and image_pixels_c counts all labelled (non-ignore) "
    "pixels of the images in which c appears; the median runs over classes with freq > 0; classes that never "
    "appear get weight 0 (median-frequency balancing, Eigen & Fergus 2015)."
)


def overlap_pairs(instances: list[Instance], height: int, width: int) -> dict[tuple[int, int], int]:
    """(class on top under the 'area' rule, distinct class underneath) -> pixels; see MATRIX_DEFINITION."""
    order = paint_order(instances, "area")
    top = np.full((height, width), -1, np.int32)
    for k, inst in enumerate(order):
        top[inst.mask] = k
    top_cls = np.array([inst.cls for inst in order], np.int64)
    # union per class of the pixels where an instance of that class is covered by another instance
    under: dict[int, np.ndarray] = {}
    for k, inst in enumerate(order):
        hidden = inst.mask & (top != k)
        if hidden.any():
            under[inst.cls] = under[inst.cls] | hidden if inst.cls in under else hidden
    pairs: dict[tuple[int, int], int] = {}
    for b, hidden in under.items():
        counts = np.bincount(top_cls[top[hidden]])
        for a in np.flatnonzero(counts):
            pairs[(int(a), b)] = int(counts[a])
    return pairs


def image_stats(entry: ImageEntry, overlap: str, crowd: str) -> ImageStats:
    """Every per-image figure of the report, from the entry's annotations alone (no image file is read)."""
    inst = decode_instances(entry)
    h, w = entry.height, entry.width
    n_inst = instance_count(inst, h, w)
    multi = int((n_inst >= 2).sum())
    label = rasterise(inst, h, w, overlap, crowd)
    changed = dict.fromkeys(OVERLAP_POLICIES, 0)
    multi_class, pairs = 0, {}
    if multi:
        # the policies differ only where instances overlap, so the extra label maps are paid for only here
        area_label = label if overlap == "area" else rasterise(inst, h, w, "area", crowd)
        for p in OVERLAP_POLICIES:
            if p != "area":
                other = label if p == overlap else rasterise(inst, h, w, p, crowd)
                changed[p] = int((other != area_label).sum())
        multi_class = int((class_count(inst, h, w) >= 2).sum())
        pairs = overlap_pairs(inst, h, w)
    label_pixels = np.bincount(label.ravel(), minlength=256).astype(np.int64)
    annotated = int((n_inst > 0).sum())
    classes, areas = [i.cls for i in inst], [i.area for i in inst]
    return ImageStats(label_pixels, classes, areas, annotated, multi, multi_class, pairs, changed)


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _area_groups(areas: np.ndarray) -> dict[str, int]:
    """Instances per COCO size group (small < 32², medium, large >= 96²)."""
    small, large = int((areas < SMALL_AREA).sum()), int((areas >= LARGE_AREA).sum())
    return {"small": small, "medium": areas.size - small - large, "large": large}


def _per_class(t: Totals, class_map: ClassMap) -> list[dict[str, Any]]:
    labelled = int(t.label_pixels[: class_map.num_classes].sum())
    rows = []
    for c in range(class_map.num_classes):
        areas = np.frombuffer(t.areas[c], np.int64)
        rows.append(
            {
                "index": c,
                "name": class_map.names[c],
                "category_id": class_map.category_ids[c],
                "instances": int(t.instances[c]),
                "images": int(t.images[c]),
                "pixels": int(t.label_pixels[c]),
                "pixel_share": _share(int(t.label_pixels[c]), labelled),
                "images_with_pixels": int(t.images_with_pixels[c]),
                "image_pixels": int(t.image_pixels[c]),
                "mean_area": float(areas.mean()) if areas.size else None,
                "median_area": float(np.median(areas)) if areas.size else None,
                **{f"area_{k}": v for k, v in _area_groups(areas).items()},
            }
        )
    return rows


def _overlap(t: Totals, class_map: ClassMap, policy: str) -> dict[str, Any]:
    names = class_map.names
    pairs = [
        {"on_top": names[a], "underneath": names[b], "pixels": int(t.matrix[a, b])}
        for a, b in zip(*np.nonzero(t.matrix), strict=True)
    ]
    pairs.sort(key=lambda p: -p["pixels"])
    return {
        "policy": policy,
        "total_pixels": t.total_pixels,
        "labelled_pixels": int(t.label_pixels[: class_map.num_classes].sum()),
        "annotated_pixels": t.annotated,
        "pixels_multi_instance": t.multi_instance,
        "share_multi_instance_of_annotated": _share(t.multi_instance, t.annotated),
        "share_multi_instance_of_all": _share(t.multi_instance, t.total_pixels),
        "pixels_multi_class": t.multi_class,
        "share_multi_class_of_annotated": _share(t.multi_class, t.annotated),
        "share_multi_class_of_all": _share(t.multi_class, t.total_pixels),
        "images_with_overlap": t.images_with_overlap,
        "images_with_class_overlap": t.images_with_class_overlap,
        "policy_changes_vs_area": {p: int(t.changed[p]) for p in OVERLAP_POLICIES},
        "matrix_definition": MATRIX_DEFINITION,
        "matrix": t.matrix.tolist(),
        "top_pairs": pairs,
    }


def build_summary(
    coco: dict[str, Any], class_map: ClassMap, report: Report, t: Totals, options: dict[str, Any]
) -> dict[str, Any]:  # fmt: skip
    """Every figure of the report as plain json types."""
    anns = coco.get("annotations") or []
    per_class = _per_class(t, class_map)
    n = class_map.num_classes
    try:
        weights = median_frequency_weights(t.label_pixels[:n].tolist(), t.image_pixels.tolist())
    except ValueError:
        weights = None  # no labelled pixel at all (nothing analysed): there is nothing to balance
    return {
        "options": options,
        "num_classes": n,
        "ignore_index": IGNORE_INDEX,
        "classes": class_map.to_json(),
        "counts": {
            "images_in_json": len(coco["images"]),
            "annotations_in_json": len(anns),
            "categories": len(coco["categories"]),
            "crowd_annotations_in_json": sum(bool(isinstance(a, dict) and a.get("iscrowd")) for a in anns),
            "images_analysed": t.analysed,
            "annotations_used": int(t.instances.sum()),
            "crowd_annotations_used": t.crowd,
            "images_without_annotations": t.per_image.get(0, 0),
        },
        "per_class": per_class,
        "ignore_pixels": int(t.label_pixels[IGNORE_INDEX]),
        "overlap": _overlap(t, class_map, options["overlap"]),
        "instances_per_image": {str(k): v for k, v in sorted(t.per_image.items())},
        "object_areas": {**_area_groups(t.all_areas()), "thresholds": [SMALL_AREA, LARGE_AREA]},
        "image_sizes": [
            {"width": w, "height": h, "images": k}
            for (w, h), k in sorted(t.sizes.items(), key=lambda x: -x[1])
        ],
        "suggested_class_weights": weights,
        "class_weights_method": {
            "name": "median_frequency",
            "policy": options["overlap"],
            "formula": WEIGHTS_FORMULA,
        },  # fmt: skip
        **problem_counts(report),
    }


def problem_counts(report: Report) -> dict[str, dict[str, int]]:
    return {k: dict(sorted(getattr(report, k).items())) for k in ("dropped", "repaired", "remapped")}


def run_eda(
    coco: str | Path,
    images: str | Path,
    out: str | Path,
    overlap: str = "area",
    crowd: str = "include",
    max_images: int | None = None,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Analyse the dataset, write OUT/summary.json, OUT/report.md and the plots; return the summary."""
    from dist_seg.data.prep.eda import (
        plots as eda_plots,  # matplotlib is loaded only when a report is written
    )

    if overlap not in OVERLAP_POLICIES:
        raise ValueError(f"--overlap {overlap!r}: choose from {', '.join(OVERLAP_POLICIES)}")
    if crowd not in CROWD_POLICIES:
        raise ValueError(f"--crowd {crowd!r}: choose from {', '.join(CROWD_POLICIES)}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"--max-images {max_images}: must be >= 1")
    if workers < 1:
        raise ValueError(f"--workers {workers}: must be >= 1")
    if not Path(images).is_dir():
        raise ValueError(f"--images {images}: not a directory")
    data = load_coco(coco)
    if "annotations" not in data:
        raise ValueError(f"{coco} has no 'annotations' list: nothing to analyse (is it a test split?)")
    class_map = build_class_map(data["categories"])
    bar = progress_lines(0, "eda", enabled=False)  # warnings go through the bar once there is one
    report = Report(warn=lambda m: bar.write(m))
    entries = index_dataset(data, class_map, report, crowd)
    if max_images is not None:
        entries = entries[:max_images]

    totals = Totals(class_map.num_classes)
    bar = progress_lines(len(entries), "eda", enabled=progress)
    for pos, stats in enumerate(ordered_map(image_stats, entries, workers, (overlap, crowd))):
        totals.add(pos, entries[pos], stats)
        bar.update(1)
    bar.close()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options = {"overlap": overlap, "crowd": crowd, "max_images": max_images}
    summary = build_summary(data, class_map, report, totals, options)
    summary["source"] = {"coco": str(coco), "images": str(images)}
    summary["plots"] = eda_plots.write_plots(out, summary, totals)
    items = [(entries[p], px) for p, px in totals.gallery_items()]
    summary["gallery"] = eda_plots.write_gallery(out, items, class_map, Path(images), report, options)
    if summary["gallery"]:
        summary["plots"]["gallery"] = eda_plots.GALLERY_FILE
    summary.update(problem_counts(report))  # the gallery reads image files and may have found bad ones
    tmp = out / (SUMMARY_NAME + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / SUMMARY_NAME)
    eda_plots.write_report(out, summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-seg eda", description=__doc__.split("\n\n")[0])
    p.add_argument("--coco", required=True, help="COCO instances json")
    p.add_argument("--images", required=True, help="directory the json's file_name entries are relative to")
    p.add_argument("--out", required=True, help="output directory for report.md, summary.json and the plots")
    p.add_argument("--overlap", default="area", choices=OVERLAP_POLICIES, help="policy for the label maps")
    p.add_argument("--crowd", default="include", choices=CROWD_POLICIES, help="crowd: paint, 255 or drop")
    p.add_argument("--max-images", type=int, default=None, help="analyse only the first N valid images")
    p.add_argument("--workers", type=int, default=1, help="parallel analysis processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        s = run_eda(a.coco, a.images, a.out, a.overlap, a.crowd, a.max_images, a.workers, not a.quiet)
    except ValueError as e:
        print(f"dist-seg eda: error: {e}", file=sys.stderr)
        return 1
    o = s["overlap"]
    kinds = [t for t in ("dropped", "repaired", "remapped") if s[t]]
    problems = "; ".join(f"{t}: " + ", ".join(f"{k}={v}" for k, v in s[t].items()) for t in kinds)
    print(
        f"analysed {s['counts']['images_analysed']} images: {o['pixels_multi_instance']} pixels "
        f"({100 * o['share_multi_instance_of_annotated']:.2f}% of annotated) carry >= 2 instances, "
        f"{o['pixels_multi_class']} carry >= 2 classes; report in {Path(a.out) / 'report.md'}; "
        f"{problems or 'no problems found'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
