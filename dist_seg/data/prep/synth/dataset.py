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
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from dist_seg.data.prep.synth.draw import (
    BAG,
    BAG_CONTENTS,
    CLASSES,
    CROWD_CLASSES,
    JPEG_QUALITY,
    PAPER,
    Obj,
    background,
    make_obj,
    paint,
)

# ---------------------------------------------------------------- scenes


def _overlap_ok(new: Obj, objs: list[Obj]) -> bool:
    """Whatever ends up underneath (the larger mask) must stay mostly visible."""
    under = np.zeros_like(new.mask)
    for o in objs:
        inter = np.count_nonzero(o.mask & new.mask)
        if (o.crowd and inter) or (o.area >= new.area and inter > 0.5 * o.area):
            return False
        if o.area < new.area:
            under |= o.mask
    return np.count_nonzero(under & new.mask) <= 0.4 * new.area


def _scene(rng: np.random.Generator, size: int) -> list[Obj]:
    objs: list[Obj] = []
    target = int(rng.integers(2, 9))
    if rng.random() < 0.35:  # bag with one or two things inside it
        bag = make_obj(BAG, rng, size, tuple(rng.uniform(0.3, 0.7, 2) * size))
        if bag is not None:
            objs.append(bag)
            for _ in range(int(rng.integers(1, 3))):
                for _try in range(8):
                    off = rng.normal(0, 0.06, 2) * size
                    item = make_obj(int(rng.choice(BAG_CONTENTS)), rng, size, tuple(bag.frame[:2] + off), 0.6)
                    inside = item is not None and not np.any(item.mask & ~bag.mask)
                    if inside and not any(np.any(item.mask & o.mask) for o in objs[1:]):
                        objs.append(item)
                        break
    if rng.random() < 0.25:  # a pile of paper: sheets partly on each other
        centre, others = rng.uniform(0.25, 0.75, 2) * size, list(objs)
        for _ in range(int(rng.integers(2, 4))):
            sheet = make_obj(PAPER, rng, size, tuple(centre + rng.normal(0, 0.08, 2) * size))
            if sheet is not None and _overlap_ok(sheet, others):
                objs.append(sheet)
    for _try in range(40):
        if len(objs) >= target:
            break
        obj = make_obj(int(rng.integers(1, 11)), rng, size, tuple(rng.uniform(0.12, 0.88, 2) * size))
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


def _crowd(rng: np.random.Generator, size: int) -> Obj | None:
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
    return Obj(cat, mask, None, (cx, cy, 0.0, size * 0.2, size * 0.2), "pieces", crowd=True)


# ---------------------------------------------------------------- COCO records


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format: column-major run lengths, starting with a (possibly empty) run of zeros."""
    flat = mask.ravel(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"counts": ([0] if flat[0] else []) + counts, "size": list(mask.shape)}


def _annotation(obj: Obj, ann_id: int, image_id: int, rng: np.random.Generator) -> dict:
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


def _render(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[Obj]]:
    img = background(rng, size)
    objs = _scene(rng, size)
    for obj in objs:
        paint(img, obj, rng)
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
