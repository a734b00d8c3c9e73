"""Hand-built COCO datasets for the converter tests, and the converter run as users run it (its command line)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dist_seg.data.format.manifest import read_manifest


def jpeg(
    path: Path,
    w: int = 40,
    h: int = 30,
    mode: str = "RGB",
    fmt: str = "JPEG",
    exif_orientation: int | None = None,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    kw = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif.tobytes()
    img.save(path, format=fmt, **kw)


def square(x: int, y: int, s: int) -> list[float]:
    return [x, y, x + s, y, x + s, y + s, x, y + s]


def good_coco(img_dir: Path, n: int = 4) -> dict:
    images, anns = [], []
    for i in range(1, n + 1):
        jpeg(img_dir / f"sub/{i}.jpg")
        images.append({"id": i, "file_name": f"sub/{i}.jpg", "width": 40, "height": 30})
        anns.append(
            {"id": 10 * i, "image_id": i, "category_id": 7, "segmentation": [square(2, 2, 20)], "iscrowd": 0}
        )
        anns.append(
            {
                "id": 10 * i + 1,
                "image_id": i,
                "category_id": 3,
                "segmentation": [square(5, 5, 6)],
                "iscrowd": 0,
            }
        )
    cats = [{"id": 3, "name": "bottle"}, {"id": 7, "name": "bag"}]
    return {"images": images, "annotations": anns, "categories": cats}


def run_convert(tmp_path: Path, coco: dict, **kw) -> tuple[dict, str]:
    """`python -m dist_seg.data.prep.convert` on TMP/ann.json and TMP/img into TMP/out: (manifest, output); ({}, stderr)
    when it fails. Keyword arguments become flags (`min_shards=2` -> `--min-shards 2`, True -> a bare flag)."""
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    args = [
        sys.executable,
        "-m",
        "dist_seg.data.prep.convert",
        "--coco",
        str(ann),
        "--images",
        str(tmp_path / "img"),
        "--out",
        str(tmp_path / "out"),
        "--quiet",
    ]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        return {}, r.stderr
    return read_manifest(tmp_path / "out"), r.stderr + r.stdout
