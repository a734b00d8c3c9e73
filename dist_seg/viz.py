"""Colour palettes, colourised label maps, overlays, palette PNGs and the confusion-matrix figure.

numpy, PIL and matplotlib's object API with the Agg canvas only: no pyplot, so importing this module never
changes the process's matplotlib backend and everything works headless.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

IGNORE_COLOR = (255, 255, 255)
"""Colour of label 255 (ignore / unlabelled)."""

_GOLDEN = 0.6180339887498949


def _palette_table() -> np.ndarray:
    # Hues step by the golden ratio so any prefix of classes is spread around the wheel; saturation and
    # value cycle in tiers so that far-apart indices that land on similar hues still differ.
    table = np.zeros((256, 3), dtype=np.uint8)
    for k in range(1, 255):
        hue = ((k - 1) * _GOLDEN) % 1.0
        sat = (0.85, 0.55, 1.0)[(k - 1) // 13 % 3]
        val = (0.95, 0.75, 0.55, 0.85)[(k - 1) // 39 % 4]
        table[k] = [round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val)]
    table[255] = IGNORE_COLOR
    return table


_PALETTE = _palette_table()


def class_palette(num_classes: int) -> np.ndarray:
    """A (256, 3) uint8 palette: 0 (background) black, 255 (ignore) white, every entry distinct.

    The colour of class k does not depend on `num_classes` (a class keeps its colour across datasets of
    different sizes); `num_classes` is validated so that classes never collide with the ignore colour.
    """
    if not 1 <= num_classes <= 255:
        raise ValueError(f"class_palette: num_classes={num_classes} must be in 1..255")
    return _PALETTE.copy()


def _as_labels(label: np.ndarray) -> np.ndarray:
    label = np.asarray(label)
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label map must hold integers, got dtype {label.dtype}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label values must be in 0..255, got {label.min()}..{label.max()}")
    return label.astype(np.uint8, copy=False)


def colorize(label: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """[H, W] class indices -> [H, W, 3] uint8 RGB (the default palette is `class_palette`)."""
    pal = _PALETTE if palette is None else np.asarray(palette, dtype=np.uint8)
    return pal[_as_labels(label)]


def overlay(
    image_rgb: np.ndarray,
    label: np.ndarray,
    alpha: float = 0.5,
    palette: np.ndarray | None = None,
    skip: Sequence[int] = (0, 255),
) -> np.ndarray:
    """Blend class colours into `image_rgb` ([H, W, 3] uint8) with weight `alpha`; pixels whose label is in
    `skip` (background and ignore by default) show the image unchanged."""
    image = np.asarray(image_rgb)
    label = _as_labels(label)
    if image.shape[:2] != label.shape or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"overlay: image {image.shape} and label {label.shape} do not match")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay: alpha={alpha} must be in [0, 1]")
    colour = colorize(label, palette).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colour
    keep = np.isin(label, np.asarray(skip, dtype=np.int64))
    out = np.where(keep[..., None], image.astype(np.float32), blended)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_palette_png(label: np.ndarray, path: Path, palette: np.ndarray | None = None) -> None:
    """Write a mode-"P" PNG: pixel values stay class indices, viewers show the palette colours."""
    pal = _PALETTE if palette is None else np.asarray(palette, dtype=np.uint8)
    im = Image.fromarray(np.ascontiguousarray(_as_labels(label)))
    im.putpalette(pal.reshape(-1).tolist())  # turns the "L" image into "P" without touching the values
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="PNG")


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], normalize: bool = True) -> Figure:
    """Heat map of a confusion matrix (rows = truth, columns = prediction); with `normalize`, each row is
    divided by its ground-truth count (rows without ground truth stay 0). Cells are annotated up to 25
    classes."""
    m = np.asarray(matrix, dtype=np.float64)
    c = len(class_names)
    if m.shape != (c, c):
        raise ValueError(f"confusion_figure: matrix shape {m.shape} does not match {c} class names")
    if normalize:
        rows = m.sum(1, keepdims=True)
        m = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    side = min(max(4.0, 0.55 * c + 2.0), 30.0)
    fig = Figure(figsize=(side + 1.5, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(m, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else max(float(m.max()), 1.0))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(c), labels=list(class_names), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(c), labels=list(class_names), fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion matrix" + (" (row-normalised)" if normalize else ""))
    if c <= 25:
        threshold = 0.5 * (1.0 if normalize else max(float(m.max()), 1.0))
        for i in range(c):
            for j in range(c):
                text = f"{m[i, j]:.2f}" if normalize else f"{int(m[i, j])}"
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if m[i, j] > threshold else "black",
                )
    fig.tight_layout()
    return fig


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """Render a figure to an [H, W, 3] uint8 array."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def triplet_grid(
    images: np.ndarray,
    targets: np.ndarray,
    preds: np.ndarray,
    palette: np.ndarray | None = None,
    gap: int = 4,
) -> np.ndarray:
    """One row per image: input | ground truth | prediction, separated by grey gaps. `images` is
    [N, H, W, 3] uint8; `targets` and `preds` are [N, H, W] class indices."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"triplet_grid: images must be uint8 [N,H,W,3], got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    if np.shape(targets) != (n, h, w) or np.shape(preds) != (n, h, w):
        raise ValueError(
            f"triplet_grid: targets {np.shape(targets)} / preds {np.shape(preds)} vs images {images.shape}"
        )
    grid = np.full((n * h + (n - 1) * gap, 3 * w + 2 * gap, 3), 128, dtype=np.uint8)
    for i in range(n):
        y = i * (h + gap)
        for j, panel in enumerate((images[i], colorize(targets[i], palette), colorize(preds[i], palette))):
            x = j * (w + gap)
            grid[y : y + h, x : x + w] = panel
    return grid
