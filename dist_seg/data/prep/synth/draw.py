"""Drawing for `dist-seg synth`: the classes' colours, shapes and textures, and the floors they lie on."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# COCO id = position + 1. (hue degrees, saturation, value): hues at least 25 degrees apart; Styrofoam is the
# only near-white class and Paper the only pale one, while floors stay darker and grey (saturation <= 0.15).
CLASSES: list[tuple[str, tuple[float, float, float]]] = [
    ("General trash", (28.0, 0.80, 0.78)),
    ("Paper", (55.0, 0.32, 0.96)),
    ("Paper pack", (100.0, 0.70, 0.75)),
    ("Metal", (190.0, 0.60, 0.82)),
    ("Glass", (150.0, 0.75, 0.62)),
    ("Plastic", (222.0, 0.72, 0.88)),
    ("Styrofoam", (0.0, 0.0, 0.94)),
    ("Plastic bag", (280.0, 0.55, 0.78)),
    ("Battery", (0.0, 0.82, 0.80)),
    ("Clothing", (322.0, 0.62, 0.78)),
]
GENERAL, PAPER, PACK, METAL, GLASS, PLASTIC, STYRO, BAG, BATTERY, CLOTHING = range(1, 11)
BAG_CONTENTS = (PLASTIC, GLASS, METAL, BATTERY, PACK)
CROWD_CLASSES = (PAPER, STYRO, GENERAL)
JPEG_QUALITY = 90


@dataclass
class Obj:
    cat: int
    mask: np.ndarray  # full-image bool mask, exactly what the annotation decodes to
    polys: list[list[float]] | None  # None: the annotation is RLE
    frame: tuple[float, float, float, float, float]  # centre x, centre y, angle, length, width
    style: str = ""
    crowd: bool = False

    def __post_init__(self) -> None:
        rows, cols = np.flatnonzero(self.mask.any(1)), np.flatnonzero(self.mask.any(0))
        self.area = int(np.count_nonzero(self.mask))
        self.box = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)  # y0, y1, x0, x1


# ---------------------------------------------------------------- shapes (local frame: u along, v across)


def _blob(rng: np.random.Generator, n: int, jag: float) -> np.ndarray:
    """Star-convex outline in the unit box: low harmonics for lumpiness, `jag` for crumpled edges."""
    a = np.sort(np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(-0.4, 0.4, n) * np.pi / n)
    r = np.ones(n)
    for k in (2, 3):
        r += rng.uniform(0, 0.12) * np.cos(k * a + rng.uniform(0, 2 * np.pi))
    r *= 1 + rng.uniform(-jag, jag, n)
    return np.stack([np.cos(a), np.sin(a)], 1) * r[:, None] * 0.5


def _capsule(w_over_l: float, n_end: int = 8) -> np.ndarray:
    """Rectangle with semicircular ends (cans, batteries) filling the unit box once scaled by (L, W)."""
    rad_u = 0.5 * w_over_l  # the end cap's radius W/2, in units of the length
    t = np.linspace(-np.pi / 2, np.pi / 2, n_end)
    right = np.stack([0.5 - rad_u + rad_u * np.cos(t), 0.5 * np.sin(t)], 1)
    return np.concatenate([right, -right])


def _bottle(neck: float, neck_w: float, cap: bool) -> np.ndarray:
    """Side view of a bottle lying along u, mouth at u=+0.5: neck, shoulders, rounded bottom (and a cap)."""
    s = neck_w
    top = [(0.5, -1.3 * s), (0.43, -1.3 * s), (0.43, -s)] if cap else [(0.5, -s)]
    side = top + [(0.5 - neck, -s), (0.38 - neck, -0.5), (-0.46, -0.5), (-0.5, -0.42)]
    return np.array(side + [(x, -y) for x, y in reversed(side)])


def _shape(cat: int, rng: np.random.Generator) -> tuple[list[np.ndarray], float, float, str]:
    """Unit outlines for a class, the (length, width) scale as a fraction of the image, and a style tag."""
    u = rng.uniform
    if cat == GENERAL:
        return [_blob(rng, 14, 0.12)], u(0.22, 0.36), u(0.18, 0.3), "lump"
    if cat == PAPER:
        if rng.random() < 0.25:  # torn in two: one annotation, two polygons
            a, b = _blob(rng, 12, 0.3) * 0.6, _blob(rng, 12, 0.3) * 0.55
            return [a + (-0.2, 0.0), b + (0.25, 0.05)], u(0.3, 0.42), u(0.24, 0.34), "facets"
        return [_blob(rng, int(rng.integers(12, 20)), 0.3)], u(0.24, 0.36), u(0.22, 0.32), "facets"
    if cat == PACK:
        g = u(0.1, 0.18)  # carton body and its sealed top fin, annotated as two touching polygons
        body = np.array([(-0.5, -0.5), (0.5 - g, -0.5), (0.5 - g, 0.5), (-0.5, 0.5)])
        fin = np.array([(0.48 - g, -0.4), (0.5, -0.4), (0.5, 0.4), (0.48 - g, 0.4)])
        return [body, fin] if rng.random() < 0.5 else [body], u(0.3, 0.42), u(0.18, 0.25), "band"
    if cat == METAL:
        if rng.random() < 0.35:  # can seen from above
            return [_circle(24)], (d := u(0.2, 0.28)), d, "rings"
        length, width = u(0.28, 0.38), u(0.14, 0.19)
        return [_capsule(width / length)], length, width, "cylinder"
    if cat == GLASS:
        if rng.random() < 0.25:  # broken glass: a few shards in one annotation
            shards = [_blob(rng, 3, 0.2) * 0.45 + rng.uniform(-0.25, 0.25, 2) for _ in range(3)]
            return shards, u(0.32, 0.44), u(0.32, 0.44), "shards"
        return [_bottle(u(0.22, 0.3), u(0.12, 0.16), False)], u(0.38, 0.5), u(0.13, 0.18), "highlight"
    if cat == PLASTIC:
        return [_bottle(u(0.1, 0.16), u(0.16, 0.22), True)], u(0.36, 0.48), u(0.15, 0.21), "ribs"
    if cat == STYRO:
        c = u(0.06, 0.15)
        box = [(-0.5, -0.5 + c), (-0.5 + c, -0.5), (0.5 - c, -0.5), (0.5, -0.5 + c)]
        return [np.array(box + [(x, -y) for x, y in reversed(box)])], u(0.26, 0.4), u(0.2, 0.32), "beads"
    if cat == BAG:
        body = _blob(rng, 20, 0.06) * (0.9, 0.9) - (0.05, 0)
        handles = [_blob(rng, 10, 0.05) * 0.25 + (0.38, side * 0.22) for side in (-1, 1)]
        return [body, *handles] if rng.random() < 0.5 else [body], u(0.42, 0.54), u(0.4, 0.5), "wrinkles"
    if cat == BATTERY:
        length, width = u(0.22, 0.3), u(0.085, 0.11)
        return [_capsule(width / length)], length, width, "battery"
    if rng.random() < 0.5:  # T-shirt as one outline, or torso and sleeves annotated separately
        shirt = [(0.5, -0.12), (0.5, 0.12), (0.42, 0.2), (0.42, 0.5), (0.18, 0.5), (0.3, 0.3), (-0.5, 0.3)]
        return [np.array(shirt + [(x, -y) for x, y in reversed(shirt)])], u(0.4, 0.52), u(0.44, 0.56), "knit"
    torso = np.array([(0.5, -0.12), (0.5, 0.12), (0.42, 0.3), (-0.5, 0.3), (-0.5, -0.3), (0.42, -0.3)])
    sleeve = np.array([(0.44, 0.22), (0.42, 0.5), (0.18, 0.5), (0.3, 0.26)])
    return [torso, sleeve, sleeve * (1, -1)], u(0.4, 0.52), u(0.44, 0.56), "knit"


def _circle(n: int) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(a), np.sin(a)], 1) * 0.5


def _to_image(pts: np.ndarray, frame: tuple[float, ...], size: int) -> list[float]:
    cx, cy, ang, length, width = frame
    x, y = pts[:, 0] * length, pts[:, 1] * width
    c, s = np.cos(ang), np.sin(ang)
    xy = np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)
    return np.round(np.clip(xy, 0, size - 1), 2).ravel().tolist()


def _shoelace(poly: list[float]) -> float:
    x, y = np.asarray(poly[0::2]), np.asarray(poly[1::2])
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def make_obj(
    cat: int, rng: np.random.Generator, size: int, centre: tuple[float, float], scale: float = 1.0
) -> Obj | None:
    """An instance of `cat` centred at `centre`, or None when its outline degenerates."""
    outlines, length, width, style = _shape(cat, rng)
    frame = (*centre, rng.uniform(0, 2 * np.pi), length * size * scale, width * size * scale)
    if cat == GENERAL and rng.random() < 0.2:  # tape roll: a hole needs RLE
        cx, cy = centre
        yy, xx = np.ogrid[:size, :size]
        d2 = (xx - cx) ** 2 + (yy - cy) ** 2
        outer = frame[4] * 0.5
        mask = (d2 <= outer**2) & (d2 >= (outer * rng.uniform(0.45, 0.6)) ** 2)
        return Obj(cat, mask, None, frame, "ring") if mask.sum() >= 16 else None
    # Outlines squashed against the frame's edge to (almost) nothing are left out rather than annotated.
    polys = [p for p in (_to_image(o, frame, size) for o in outlines) if _shoelace(p) >= 4.0]
    if not polys:
        return None
    rle = mask_utils.merge(mask_utils.frPyObjects(polys, size, size))
    mask = mask_utils.decode(rle).astype(bool)
    if mask.sum() < 16:
        return None
    return Obj(cat, mask, polys, frame, style)


# ---------------------------------------------------------------- textures


def _noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth value noise in [0, 1]: random grid of ~cell px upsampled bilinearly (fast, no pixel loops)."""
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    grid = Image.fromarray(rng.random((gh, gw), dtype=np.float32), mode="F")
    return np.asarray(grid.resize((w, h), Image.BILINEAR), dtype=np.float32)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h % 360) / 360, min(max(s, 0), 1), min(max(v, 0), 1)), np.float32)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A floor: concrete, tiles, planks or asphalt, all grey-ish (saturation <= 0.15) and value <= 0.6."""
    kind = int(rng.integers(4))
    base = _hsv(rng.uniform(0, 360), rng.uniform(0, 0.1), rng.uniform(0.32, 0.5))
    yy = np.arange(size, dtype=np.float32)[:, None] / size
    xx = np.arange(size, dtype=np.float32)[None, :] / size
    b = 0.85 + 0.25 * _noise(rng, size, size, size / 4) + 0.12 * _noise(rng, size, size, 3)
    if kind == 1:  # tiles with darker grout
        n = int(rng.integers(3, 7))
        grout = (np.minimum((xx * n) % 1, (yy * n) % 1) < 0.04).astype(np.float32)
        b = b * (1 - 0.35 * grout)
    elif kind == 2:  # planks with grain
        base = _hsv(30 + rng.uniform(-10, 10), rng.uniform(0.08, 0.15), rng.uniform(0.35, 0.5))
        n = int(rng.integers(4, 8))
        b = b * (1 - 0.3 * ((yy * n) % 1 < 0.03)) + 0.08 * np.sin(xx * 60 + 8 * _noise(rng, size, size, 24))
    elif kind == 3:  # asphalt speckle
        b = 0.8 + 0.4 * _noise(rng, size, size, 1.5)
    light = 1 + rng.uniform(-0.15, 0.15) * (xx - 0.5) + rng.uniform(-0.15, 0.15) * (yy - 0.5)
    return base[None, None, :] * (b * light)[:, :, None]


def _brightness(obj: Obj, rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Per-pixel brightness of the class texture, in the object's own frame (u along, v across, unit box)."""
    cx, cy, ang, length, width = obj.frame
    dx, dy = xs - cx, ys - cy
    u = (np.cos(ang) * dx + np.sin(ang) * dy) / max(length, 1)
    v = (-np.sin(ang) * dx + np.cos(ang) * dy) / max(width, 1)
    h, w = u.shape
    style = obj.style
    if style == "lump":
        return 0.75 + 0.4 * _noise(rng, h, w, 6)
    if style == "facets":  # crumpled: flat facets fanning out from a crease point
        sector = ((np.arctan2(v - rng.uniform(-0.1, 0.1), u) + np.pi) / (2 * np.pi) * 9).astype(int) % 9
        return rng.uniform(0.84, 1.04, 9).astype(np.float32)[sector] + 0.04 * _noise(rng, h, w, 3)
    if style == "band":  # printed carton: a light band and a darker top fin
        return np.where(np.abs(u + 0.1) < 0.12, 1.25, 1.0) * np.where(u > 0.35, 0.8, 1.0)
    if style == "rings":
        return 0.85 + 0.2 * np.cos(np.hypot(u, v) * 2 * np.pi * 4)
    if style in ("cylinder", "battery", "highlight", "ribs"):
        spec = np.exp(-(((v - 0.18) / 0.1) ** 2))
        b = 0.7 + 0.2 * np.cos(np.pi * v) + 0.45 * spec
        if style == "battery":
            b = b * np.where(u > 0.3, 0.6, 1.0)
        if style == "ribs":
            b = b * (0.92 + 0.1 * np.sin(u * 2 * np.pi * 9))
        return b
    if style == "shards":
        return 0.8 + 0.35 * _noise(rng, h, w, 10)
    if style == "beads":
        return 0.9 + 0.12 * _noise(rng, h, w, 2.5)
    if style == "wrinkles":
        return 0.85 + 0.15 * np.sin((u * 7 + v * 3) * np.pi + 5 * _noise(rng, h, w, 20))
    if style == "knit":
        return (0.88 + 0.08 * np.sin((u + v) * width * 1.2)) * (0.8 + 0.3 * _noise(rng, h, w, 25))
    return 0.8 + 0.3 * _noise(rng, h, w, 8)  # rings of tape, crowd pieces


def paint(img: np.ndarray, obj: Obj, rng: np.random.Generator) -> None:
    y0, y1, x0, x1 = obj.box
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    h, s, v = CLASSES[obj.cat - 1][1]
    colour = _hsv(h + rng.uniform(-6, 6), s + rng.uniform(-0.08, 0.08), v + rng.uniform(-0.08, 0.06))
    tex = colour[None, None, :] * _brightness(obj, rng, ys, xs)[:, :, None]
    region = img[y0:y1, x0:x1]
    if obj.style == "wrinkles":  # a bag lets a little of the floor through
        tex = 0.85 * tex + 0.15 * region
    region[:] = np.where(obj.mask[y0:y1, x0:x1, None], tex, region)
