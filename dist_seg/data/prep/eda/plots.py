"""Plots, gallery and report.md of `dist-seg eda` (the figures themselves are computed in dist_seg.data.prep.eda.report).

matplotlib's object API with the Agg canvas only (as in dist_seg.viz): no pyplot, so nothing here changes the
process's backend and everything works headless.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from dist_seg.data import IGNORE_INDEX
from dist_seg.data.prep.coco import (
    REASONS,
    ClassMap,
    ImageEntry,
    Report,
)
from dist_seg.data.prep.eda.totals import Totals
from dist_seg.data.prep.images import read_image as read_checked_image
from dist_seg.data.prep.raster import decode_instances, rasterise
from dist_seg.viz import class_palette, colorize

PLOT_FILES = {
    "instances_per_class": "instances_per_class.png",
    "images_per_class": "images_per_class.png",
    "pixel_share": "pixel_share_per_class.png",
    "instances_per_image": "instances_per_image.png",
    "object_areas": "object_areas.png",
    "image_sizes": "image_sizes.png",
    "overlap_matrix": "overlap_matrix.png",
}
GALLERY_FILE = "overlap_gallery.png"
POLICY_MEANING = {
    "area": "largest decoded mask painted first, smaller ones on top (ties: lower annotation id first)",
    "order": "json order, later annotations on top",
    "max-class": "the larger class index wins",
    "ignore": f"pixels claimed by >= 2 different classes become {IGNORE_INDEX} (ignored); elsewhere as `area`",
}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png")


def _hbar(
    path: Path, rows: list[dict[str, Any]], key: str, title: str, xlabel: str, scale: float = 1.0
) -> None:
    """One horizontal bar per class that has any: long class names stay readable and many classes fit."""
    shown = [r for r in rows if r[key] > 0]
    omitted = len(rows) - len(shown)
    fig = _figure(8, max(3.0, 0.25 * len(shown) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    values = [scale * r[key] for r in shown]
    ax.barh(range(len(shown)), values, color="tab:blue")
    ax.set_yticks(range(len(shown)), labels=[r["name"] for r in shown], fontsize=8)
    ax.invert_yaxis()
    if scale != 1.0 and shown:
        ax.set_xscale("log")  # shares span orders of magnitude once background is included
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.3g}%" if scale != 1.0 else f" {v:,}", va="center", fontsize=7)
    ax.set_title(title + (f" ({omitted} classes with none omitted)" if omitted else ""), fontsize=10)
    ax.set_xlabel(xlabel)
    _save(fig, path)


def _histograms(out: Path, t: Totals, object_areas: dict[str, Any]) -> None:
    fig = _figure(7, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ks = sorted(t.per_image)
    ax.bar(ks, [t.per_image[k] for k in ks], color="tab:blue")
    ax.set(xlabel="instances in the image", ylabel="images", title="instances per image")
    _save(fig, out / PLOT_FILES["instances_per_image"])

    fig = _figure(7, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    areas = t.all_areas()
    if areas.size:
        lo, hi = np.log10(max(areas.min(), 1)), np.log10(max(areas.max(), 2))
        ax.hist(np.maximum(areas, 1), bins=np.logspace(lo - 0.05, hi + 0.05, 40))
        ax.set_xscale("log")
    for x in object_areas["thresholds"]:
        ax.axvline(x, color="tab:red", linestyle="--", linewidth=1)
    small, medium, large = (f"{object_areas[k]:,}" for k in ("small", "medium", "large"))
    ax.set_title(f"object areas: small {small}, medium {medium}, large {large}", fontsize=10)
    ax.set(xlabel="decoded mask pixels (log scale; dashed: 32² and 96²)", ylabel="instances")
    _save(fig, out / PLOT_FILES["object_areas"])

    fig = _figure(5.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    sizes = list(t.sizes.items())
    if sizes:
        k = np.array([n for _, n in sizes], np.float64)
        w, h = zip(*(wh for wh, _ in sizes), strict=True)
        ax.scatter(w, h, s=20 + 300 * np.sqrt(k / k.max()), alpha=0.6)
        for (x, y), n in sizes[:12] if len(sizes) <= 12 else []:
            ax.annotate(f"{x}x{y}: {n}", (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="width (px)", ylabel="height (px)")
    ax.set_title(f"image sizes ({len(sizes)} distinct; marker area ~ number of images)", fontsize=10)
    _save(fig, out / PLOT_FILES["image_sizes"])


def _matrix_plot(out: Path, matrix: np.ndarray, names: list[str]) -> None:
    used = np.flatnonzero(matrix.sum(0) + matrix.sum(1))
    side = 0.45 * len(used)
    fig = _figure(max(5.0, side + 3), max(4.0, side + 2))
    ax = fig.add_subplot(1, 1, 1)
    if used.size == 0:
        ax.text(0.5, 0.5, "no pixel is covered by two instances", ha="center", va="center")
        ax.set_axis_off()
    else:
        m = matrix[np.ix_(used, used)].astype(np.float64)
        norm = LogNorm(vmin=1, vmax=max(m.max(), 2))
        im = ax.imshow(np.where(m > 0, m, np.nan), cmap="viridis", norm=norm)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="pixels")
        labels = [names[i] for i in used]
        ax.set_xticks(range(len(used)), labels=labels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(used)), labels=labels, fontsize=8)
        for i, j in zip(*np.nonzero(m), strict=True) if len(used) <= 20 else []:
            dark = norm(m[i, j]) < 0.6  # viridis is dark at the low end
            ax.text(j, i, f"{int(m[i, j]):,}", ha="center", va="center", fontsize=6,
                    color="white" if dark else "black")  # fmt: skip
    ax.set(xlabel="class underneath (covered)", ylabel="class on top (the smaller one; 'area' keeps it)")
    ax.set_title("overlapping pixels: class on top x class underneath", fontsize=10)
    _save(fig, out / PLOT_FILES["overlap_matrix"])


def write_plots(out: Path, summary: dict[str, Any], t: Totals) -> dict[str, str]:
    """Write the statistics plots into `out`; returns plot name -> file name."""
    rows = summary["per_class"]
    objects = [r for r in rows if r["index"] != 0 or r["instances"] > 0]
    _hbar(out / PLOT_FILES["instances_per_class"], objects, "instances", "instances per class", "instances")
    _hbar(out / PLOT_FILES["images_per_class"], objects, "images", "images containing the class", "images")
    policy = summary["overlap"]["policy"]
    _hbar(out / PLOT_FILES["pixel_share"], rows, "pixel_share", f"pixel share per class (--overlap {policy})",
          "% of labelled pixels (log scale)", scale=100.0)  # fmt: skip
    _histograms(out, t, summary["object_areas"])
    _matrix_plot(out, t.matrix, [c["name"] for c in summary["classes"]])
    return dict(PLOT_FILES)


def write_gallery(
    out: Path, items: list[tuple[ImageEntry, int]], class_map: ClassMap, images_dir: Path, report: Report,
    options: dict[str, Any],
) -> list[dict[str, Any]]:  # fmt: skip
    """image | instances outlined | label map, one row per readable image; unreadable files go to `report`."""
    rows = []
    for entry, pixels in items:
        decoded, problem = read_checked_image(images_dir / entry.file_name, entry)
        if decoded is None:
            report.problem(problem)
            continue
        rgb = np.asarray(Image.open(io.BytesIO(decoded.data)).convert("RGB"))
        inst = decode_instances(entry)
        label = rasterise(inst, entry.height, entry.width, options["overlap"], options["crowd"])
        rows.append((entry, pixels, rgb, inst, label))
    if not rows:
        return []
    palette = class_palette(class_map.num_classes)
    heights = [4.2 * e.height / e.width for e, *_ in rows]
    legend_h = 0.9
    fig = _figure(13, sum(heights) + 0.4 * len(rows) + legend_h)
    grid = fig.add_gridspec(len(rows), 3, height_ratios=heights)
    present: set[int] = set()
    for i, (entry, pixels, rgb, inst, label) in enumerate(rows):
        axes = [fig.add_subplot(grid[i, k]) for k in range(3)]
        axes[0].imshow(rgb)
        axes[0].set_title(f"{entry.file_name}: {pixels:,} px on >= 2 instances", fontsize=8)
        axes[1].imshow(rgb)
        for x in inst:
            if x.mask.any():
                colour = palette[x.cls] / 255.0
                axes[1].contour(x.mask.astype(np.uint8), levels=[0.5], colors=[colour], linewidths=1.2)
        axes[1].set_title(f"{len(inst)} instances outlined", fontsize=8)
        axes[2].imshow(colorize(label, palette), interpolation="nearest")
        axes[2].set_title(f"label map, --overlap {options['overlap']}", fontsize=8)
        for ax in axes:
            ax.set_axis_off()
        present.update(int(v) for v in np.unique(label))
        present.update(x.cls for x in inst)
    names = {**dict(enumerate(class_map.names)), IGNORE_INDEX: f"ignore ({IGNORE_INDEX})"}
    handles = [Patch(facecolor=palette[c] / 255.0, edgecolor="grey", label=names[c]) for c in sorted(present)]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_h / fig.get_figheight(), 1, 1))
    fig.savefig(out / GALLERY_FILE, format="png", dpi=80)
    return [
        {"image_id": e.image_id, "file_name": e.file_name, "pixels_multi_instance": px} for e, px, *_ in rows
    ]


def _pct(x: float) -> str:
    return "0%" if x == 0 else f"{100 * x:.2f}%" if x >= 1e-4 else f"{100 * x:.2g}%"


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}" if float(v).is_integer() else f"{v:,.1f}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]) + "\n"


def _glance(s: dict[str, Any]) -> str:
    o, per_class, n_images = s["overlap"], s["per_class"], s["counts"]["images_analysed"]
    objects = [r for r in per_class if r["index"] != 0]
    seen = [r for r in objects if r["instances"] > 0]
    text = ""
    if seen:
        most, least = max(seen, key=lambda r: r["instances"]), min(seen, key=lambda r: r["instances"])
        big, small = max(seen, key=lambda r: r["pixels"]), min(seen, key=lambda r: r["pixels"])
        text += f"""- **Class balance:** {len(seen)} of {len(objects)} object classes appear. Most instances: \
`{most["name"]}` ({most["instances"]:,}); fewest: `{least["name"]}` ({least["instances"]:,}), a ratio of \
{most["instances"] / least["instances"]:.1f} : 1. By pixels the object classes range from \
{_pct(big["pixel_share"])} (`{big["name"]}`) to {_pct(small["pixel_share"])} (`{small["name"]}`) of labelled \
pixels; background is {_pct(per_class[0]["pixel_share"])}.\n"""
    text += f"""- **Pixels with several labels:** {o["pixels_multi_instance"]:,} pixels \
({_pct(o["share_multi_instance_of_annotated"])} of the {o["annotated_pixels"]:,} annotated pixels) are covered by \
>= 2 instances; {o["pixels_multi_class"]:,} ({_pct(o["share_multi_class_of_annotated"])}) by >= 2 *different* \
classes. {o["images_with_overlap"]:,} of {n_images:,} images have overlapping instances, \
{o["images_with_class_overlap"]:,} between different classes.\n"""
    cross = [p for p in o["top_pairs"] if p["on_top"] != p["underneath"]][:3]
    if cross:
        pairs = "; ".join(f"`{p['on_top']}` on `{p['underneath']}` ({p['pixels']:,} px)" for p in cross)
        text += f"- **Between which classes** (the class on top lies inside the other): {pairs}.\n"
    ch = o["policy_changes_vs_area"]
    dropped = sum(s["dropped"].values())
    return (
        text
        + f"""- **What the overlap policy changes** (pixels whose label differs from `area`): `order` \
{ch["order"]:,}, `max-class` {ch["max-class"]:,}, `ignore` {ch["ignore"]:,} (set to {IGNORE_INDEX}).
- **Problems:** {dropped:,} items dropped{" (see [Problems](#problems))" if dropped else ""}.
"""
    )


def _class_section(s: dict[str, Any]) -> str:
    w = s["suggested_class_weights"]
    shown = [r for r in s["per_class"] if r["index"] == 0 or r["instances"] > 0 or r["pixels"] > 0]
    unseen = [f"`{r['name']}`" for r in s["per_class"] if r not in shown]
    rows = [
        [r["index"], f"`{r['name']}`", _num(r["category_id"]), f"{r['instances']:,}",
         f"{r['images'] if r['index'] or r['instances'] else r['images_with_pixels']:,}", f"{r['pixels']:,}",
         _pct(r["pixel_share"]), _num(r["mean_area"]), _num(r["median_area"]),
         f"{r['area_small']}/{r['area_medium']}/{r['area_large']}", "–" if w is None else f"{w[r['index']]:.3f}"]
        for r in shown
    ]  # fmt: skip
    header = [
        "#",
        "class",
        "COCO id",
        "instances",
        "images",
        "pixels",
        "pixel share",
        "mean area",
        "median area",
    ]
    table = _table(header + ["S/M/L", "weight"], rows)
    absent = f"\nNever seen in the analysed images (weight 0): {', '.join(unseen)}.\n" if unseen else ""
    return f"""## Classes

Pixels and shares are counted on the label maps under `--overlap {s["overlap"]["policy"]}`, as shares of the \
labelled (non-ignore) pixels. *images*: images with at least one instance of the class (background: images with \
background pixels left). Areas are decoded mask pixels; S/M/L count instances by COCO's thresholds (< 32², \
32²..96², >= 96²). *weight*: the suggested class weight (see below).

{table}{absent}
![instances per class]({PLOT_FILES["instances_per_class"]})

![images per class]({PLOT_FILES["images_per_class"]})

![pixel share per class]({PLOT_FILES["pixel_share"]})
"""


def _overlap_section(s: dict[str, Any]) -> str:
    o, crowd = s["overlap"], s["options"]["crowd"]
    annotated, total = o["annotated_pixels"], o["total_pixels"]
    figures = [
        ["pixels analysed (all images)", f"{total:,}", "100%"],
        ["annotated pixels (>= 1 instance)", f"{annotated:,}", _pct(annotated / max(total, 1))],
    ]
    for key, what in (("instance", "instances"), ("class", "different classes")):
        shares = f"{_pct(o[f'share_multi_{key}_of_annotated'])} of annotated, {_pct(o[f'share_multi_{key}_of_all'])} of all"
        figures.append([f"pixels on >= 2 {what}", f"{o[f'pixels_multi_{key}']:,}", shares])
    figures += [
        ["images with overlapping instances", f"{o['images_with_overlap']:,}", ""],
        ["images with overlapping classes", f"{o['images_with_class_overlap']:,}", ""],
    ]
    ch = o["policy_changes_vs_area"]
    policies = [
        [
            f"`{p}`" + (" (chosen)" if p == o["policy"] else ""),
            rule,
            f"{ch[p]:,}",
            _pct(ch[p] / annotated) if annotated else "0%",
        ]
        for p, rule in POLICY_MEANING.items()
    ]
    pairs = [[f"`{p['on_top']}`", f"`{p['underneath']}`", f"{p['pixels']:,}"] for p in o["top_pairs"][:15]]
    pair_table = (
        _table(["on top (inside)", "underneath", "pixels"], pairs) if pairs else "No overlapping instances.\n"
    )
    if s["gallery"]:
        gallery = f"""Image | instances outlined in their class colour | label map under `--overlap {o["policy"]}` \
(class colours in the legend at the bottom).\n\n![overlap gallery]({GALLERY_FILE})\n"""
    else:
        why = "none of the top overlap images could be read (see Problems)" if o["images_with_overlap"] else \
            "no image has overlapping instances"  # fmt: skip
        gallery = f"No gallery: {why}.\n"
    return f"""## Overlap: pixels with several labels

Every instance the converter keeps counts here (crowd regions too, unless `--crowd skip`); the overlap policy only \
decides which label such a pixel gets.

{_table(["figure", "pixels / images", "share"], figures)}
### What each overlap policy changes

Pixels whose label differs from the `area` label (crowd regions handled as `--crowd {crowd}`):

{_table(["policy", "rule", "pixels changed", "share of annotated"], policies)}
### Between which classes

{o['matrix_definition']} The {min(15, len(pairs))} largest entries:

{pair_table}
![class x class overlap]({PLOT_FILES['overlap_matrix']})

### Images with the most overlap

{gallery}"""  # fmt: skip


def write_report(out: Path, s: dict[str, Any]) -> Path:
    """OUT/report.md: the summary as tables with the plots embedded by relative links."""
    opts, src = s["options"], s["source"]
    counts = _table(["", "count"], [[k.replace("_", " "), f"{v:,}"] for k, v in s["counts"].items()])
    limit = f" --max-images {opts['max_images']}" if opts["max_images"] else ""
    problems = [[f"`{k}`", v, REASONS.get(k, "")] for k, v in s["dropped"].items()]
    problems += [
        [f"`{k}`", v, f"{kind}, not dropped"] for kind in ("repaired", "remapped") for k, v in s[kind].items()
    ]
    text = f"""# Dataset report: `{Path(src['coco']).name}`

`dist-seg eda --coco {src['coco']} --images {src['images']} --overlap {opts['overlap']} --crowd \
{opts['crowd']}{limit}`. Label maps are exactly what `dist-seg convert --overlap {opts['overlap']} --crowd \
{opts['crowd']}` writes. Every figure is also in [summary.json](summary.json).

## At a glance

{_glance(s)}
## Counts

{counts}
{_class_section(s)}
{_overlap_section(s)}
## Objects and images

![instances per image]({PLOT_FILES['instances_per_image']})

![object areas]({PLOT_FILES['object_areas']})

![image sizes]({PLOT_FILES['image_sizes']})

## Suggested class weights

{s['class_weights_method']['formula']}

They are the *weight* column above and `suggested_class_weights` in summary.json (one weight per class index); \
a training config uses them with `loss.class_weights: <this folder>/summary.json`.

## Problems

Same reasons and wording as `dist-seg convert`. Statistics need the json alone; image files are read only for \
the gallery, so `dist-seg convert` is what checks every file.

{_table(["reason", "count", "meaning"], problems) if problems else "No problems found."}
"""  # fmt: skip
    path = out / "report.md"
    path.write_text(text)
    return path
