"""`dist-seg synth`: a procedurally drawn COCO dataset with the trash competition's 10 object classes.

    dist-seg synth --out data/synth --images 200 --val-images 50 --size 512 --seed 0
    dist-seg convert --coco data/synth/train.json --images data/synth/images --out shards/train

Each class has its own hue (small jitter), shape and texture, drawn on low-saturation textured floors, so a
small network can learn it in minutes. Scenes overlap on purpose (a bottle inside a plastic bag, paper on
paper, items lying on clothing) so the converter's overlap policies change the label maps. Objects are
painted from the largest mask area to the smallest (ties: lower annotation id first), which is exactly the
converter's `area` policy, and annotations are written in that order, so `order` reproduces it too.
Each instance is painted through the mask pycocotools decodes from its own annotation, so labels and pixels
agree to the pixel. Every image has its own random stream (seed, split, index): the same seed gives the same
bytes, and the first k images do not depend on how many are asked for.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
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
class _Obj:
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


def _make_obj(
    cat: int, rng: np.random.Generator, size: int, centre: tuple[float, float], scale: float = 1.0
) -> _Obj | None:
    """An instance of `cat` centred at `centre`, or None when its outline degenerates."""
    outlines, length, width, style = _shape(cat, rng)
    frame = (*centre, rng.uniform(0, 2 * np.pi), length * size * scale, width * size * scale)
    if cat == GENERAL and rng.random() < 0.2:  # tape roll: a hole needs RLE
        cx, cy = centre
        yy, xx = np.ogrid[:size, :size]
        d2 = (xx - cx) ** 2 + (yy - cy) ** 2
        outer = frame[4] * 0.5
        mask = (d2 <= outer**2) & (d2 >= (outer * rng.uniform(0.45, 0.6)) ** 2)
        return _Obj(cat, mask, None, frame, "ring") if mask.sum() >= 16 else None
    # Outlines squashed against the frame's edge to (almost) nothing are left out rather than annotated.
    polys = [p for p in (_to_image(o, frame, size) for o in outlines) if _shoelace(p) >= 4.0]
    if not polys:
        return None
    rle = mask_utils.merge(mask_utils.frPyObjects(polys, size, size))
    mask = mask_utils.decode(rle).astype(bool)
    if mask.sum() < 16:
        return None
    return _Obj(cat, mask, polys, frame, style)


# ---------------------------------------------------------------- textures


def _noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth value noise in [0, 1]: random grid of ~cell px upsampled bilinearly (fast, no pixel loops)."""
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    grid = Image.fromarray(rng.random((gh, gw), dtype=np.float32), mode="F")
    return np.asarray(grid.resize((w, h), Image.BILINEAR), dtype=np.float32)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h % 360) / 360, min(max(s, 0), 1), min(max(v, 0), 1)), np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
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


def _brightness(obj: _Obj, rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
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


def _paint(img: np.ndarray, obj: _Obj, rng: np.random.Generator) -> None:
    y0, y1, x0, x1 = obj.box
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    h, s, v = CLASSES[obj.cat - 1][1]
    colour = _hsv(h + rng.uniform(-6, 6), s + rng.uniform(-0.08, 0.08), v + rng.uniform(-0.08, 0.06))
    tex = colour[None, None, :] * _brightness(obj, rng, ys, xs)[:, :, None]
    region = img[y0:y1, x0:x1]
    if obj.style == "wrinkles":  # a bag lets a little of the floor through
        tex = 0.85 * tex + 0.15 * region
    region[:] = np.where(obj.mask[y0:y1, x0:x1, None], tex, region)


# ---------------------------------------------------------------- scenes


def _overlap_ok(new: _Obj, objs: list[_Obj]) -> bool:
    """Whatever ends up underneath (the larger mask) must stay mostly visible."""
    under = np.zeros_like(new.mask)
    for o in objs:
        inter = np.count_nonzero(o.mask & new.mask)
        if (o.crowd and inter) or (o.area >= new.area and inter > 0.5 * o.area):
            return False
        if o.area < new.area:
            under |= o.mask
    return np.count_nonzero(under & new.mask) <= 0.4 * new.area


def _scene(rng: np.random.Generator, size: int) -> list[_Obj]:
    objs: list[_Obj] = []
    target = int(rng.integers(2, 9))
    if rng.random() < 0.35:  # bag with one or two things inside it
        bag = _make_obj(BAG, rng, size, tuple(rng.uniform(0.3, 0.7, 2) * size))
        if bag is not None:
            objs.append(bag)
            for _ in range(int(rng.integers(1, 3))):
                for _try in range(8):
                    off = rng.normal(0, 0.06, 2) * size
                    item = _make_obj(
                        int(rng.choice(BAG_CONTENTS)), rng, size, tuple(bag.frame[:2] + off), 0.6
                    )
                    inside = item is not None and not np.any(item.mask & ~bag.mask)
                    if inside and not any(np.any(item.mask & o.mask) for o in objs[1:]):
                        objs.append(item)
                        break
    if rng.random() < 0.25:  # a pile of paper: sheets partly on each other
        centre, others = rng.uniform(0.25, 0.75, 2) * size, list(objs)
        for _ in range(int(rng.integers(2, 4))):
            sheet = _make_obj(PAPER, rng, size, tuple(centre + rng.normal(0, 0.08, 2) * size))
            if sheet is not None and _overlap_ok(sheet, others):
                objs.append(sheet)
    for _try in range(40):
        if len(objs) >= target:
            break
        obj = _make_obj(int(rng.integers(1, 11)), rng, size, tuple(rng.uniform(0.12, 0.88, 2) * size))
        if obj is not None and _overlap_ok(obj, objs):
            objs.append(obj)
    if rng.random() < 0.15:  # crowds go on free floor: how they are painted is the crowd policy's business
        for _try in range(5):
            crowd = _crowd(rng, size)
            if crowd is not None and not any(np.any(crowd.mask & o.mask) for o in objs):
                objs.append(crowd)
                break
    # The converter's `area` policy: largest first; a stable sort keeps ties in creation (= id) order.
    return sorted(objs, key=lambda o: -o.area)


def _crowd(rng: np.random.Generator, size: int) -> _Obj | None:
    """A scatter of small pieces (shreds, beads, crumbs) labelled once with iscrowd=1."""
    cat = int(rng.choice(CROWD_CLASSES))
    cx, cy = rng.uniform(0.15, 0.85, 2) * size
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(10, 25))):
        px, py = rng.normal((cx, cy), size * 0.06)
        r = size * rng.uniform(0.008, 0.02)
        draw.ellipse([px - r, py - r, px + r, py + r], fill=1)
    mask = np.asarray(canvas, dtype=bool)
    if mask.sum() < 16:
        return None
    return _Obj(cat, mask, None, (cx, cy, 0.0, size * 0.2, size * 0.2), "pieces", crowd=True)


# ---------------------------------------------------------------- COCO records


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format: column-major run lengths, starting with a (possibly empty) run of zeros."""
    flat = mask.ravel(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"counts": ([0] if flat[0] else []) + counts, "size": list(mask.shape)}


def _annotation(obj: _Obj, ann_id: int, image_id: int, rng: np.random.Generator) -> dict:
    y0, y1, x0, x1 = obj.box
    bbox = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
    if obj.crowd:
        seg = _uncompressed_rle(obj.mask)
    elif obj.polys is None or rng.random() < 0.06:  # holes need RLE; a few others use it to exercise it
        rle = mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
        seg = {"size": [int(x) for x in rle["size"]], "counts": rle["counts"].decode("ascii")}
    else:
        seg = obj.polys
    ann = dict(id=ann_id, image_id=image_id, category_id=obj.cat, segmentation=seg)
    return ann | dict(area=float(obj.area), bbox=bbox, iscrowd=int(obj.crowd))


def _render(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[_Obj]]:
    img = _background(rng, size)
    objs = _scene(rng, size)
    for obj in objs:
        _paint(img, obj, rng)
    return Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB"), objs


def _write_split(
    out: Path, split: int, name: str, count: int, first_ids: tuple[int, int], size: int, seed: int
) -> tuple[Path, tuple[int, int], int]:
    """One split's images and json; returns the json path, the next free (image id, annotation id), and
    the number of annotations."""
    images, annotations = [], []
    image_id, ann_id = first_ids
    (out / "images" / name).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        rng = np.random.default_rng([seed, split, index])
        img, objs = _render(rng, size)
        file_name = f"{name}/{index + 1:06d}.jpg"
        img.save(out / "images" / file_name, "JPEG", quality=JPEG_QUALITY)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for obj in objs:
            annotations.append(_annotation(obj, ann_id, image_id, rng))
            ann_id += 1
        image_id += 1
    categories = [{"id": i + 1, "name": n, "supercategory": n} for i, (n, _) in enumerate(CLASSES)]
    info = {"description": f"dist-seg synthetic trash scenes, split {name}, seed {seed}", "version": "1"}
    coco = dict(info=info, licenses=[], images=images, annotations=annotations, categories=categories)
    # Written after the images, through a rename, so a json on disk always means a complete split.
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(coco))
    os.replace(tmp, path)
    return path, (image_id, ann_id), len(annotations)


def generate(out: Path, images: int = 200, val_images: int = 50, size: int = 512, seed: int = 0) -> dict:
    """Write OUT/train.json, OUT/val.json and OUT/images/{train,val}/NNNNNN.jpg; return paths and counts."""
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    if val_images < 0:
        raise ValueError(f"val_images must be >= 0, got {val_images}")
    if size < 64:
        raise ValueError(f"size must be >= 64 pixels, got {size}")
    out = Path(out)
    train_json, next_ids, train_anns = _write_split(out, 0, "train", images, (1, 1), size, seed)
    val_json, _, val_anns = _write_split(out, 1, "val", val_images, next_ids, size, seed)
    counts = {"train_images": images, "val_images": val_images}
    counts |= {"train_annotations": train_anns, "val_annotations": val_anns}
    return {"train_json": train_json, "val_json": val_json, "images_dir": out / "images", **counts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dist-seg synth", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--images", type=int, default=200, help="training images (default 200)")
    parser.add_argument("--val-images", type=int, default=50, help="validation images (default 50)")
    parser.add_argument("--size", type=int, default=512, help="square image size in pixels (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    try:
        info = generate(args.out, args.images, args.val_images, args.size, args.seed)
    except ValueError as err:
        parser.error(str(err))
    print(
        f"wrote {info['train_images']} train images ({info['train_annotations']} annotations) -> "
        f"{info['train_json']}\nwrote {info['val_images']} val images ({info['val_annotations']} annotations) "
        f"-> {info['val_json']}\nconvert: dist-seg convert --coco {info['train_json']} --images "
        f"{info['images_dir']} --out SHARDS/train"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
