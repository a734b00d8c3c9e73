"""Converter throughput and memory: images/s with --workers 1 and 2, peak RSS, and RSS growth with dataset size.

    python benchmarks/convert.py                       # trashcan_subset (RLE) and icevision_coco6 (polygons)
    python benchmarks/convert.py --images 3000

A dataset is repeated (same files, new image and annotation ids) until it has --images images, so the json
grows like a real dataset while the image files stay the shared ones. Each conversion runs in a fresh
process that reports its own peak RSS and that of its worker processes. Last line is machine-readable.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DATASETS = {
    "trashcan_subset": ("annotations/instances_train.json", "train"),
    "icevision_coco6": ("annotations.json", "images"),
}

_RUNNER = """
import resource, sys, time
from dist_seg.data.prep.convert import ConvertOptions, convert
t = time.perf_counter()
m = convert(ConvertOptions(sys.argv[1], sys.argv[2], sys.argv[3], workers=int(sys.argv[4]), progress=False))
dt = time.perf_counter() - t
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(m["total_samples"], dt, own, kids)
"""


def repeat_dataset(ann: Path, n_images: int, out: Path) -> Path:
    coco = json.loads(ann.read_text())
    images, anns = [], []
    k = 0
    while len(images) < n_images:
        for im in coco["images"]:
            if len(images) >= n_images:
                break
            new_id = len(images) + 1
            images.append({**im, "id": new_id})
            for a in coco["annotations"]:
                if a["image_id"] == im["id"]:
                    k += 1
                    anns.append({**a, "id": k, "image_id": new_id})
    path = out / f"{ann.stem}-x{n_images}.json"
    path.write_text(json.dumps({**coco, "images": images, "annotations": anns}))
    return path


def run(ann: Path, images: Path, workers: int, tmp: Path) -> tuple[int, float, float]:
    out = tmp / f"shards-{workers}-{ann.stem}"
    r = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(ann), str(images), str(out), str(workers)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    n, dt, own, kids = r.stdout.split()
    return int(n), int(n) / float(dt), max(int(own), int(kids)) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    a = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, (ann_rel, img_rel) in DATASETS.items():
            root = SHARED / name
            if not (root / ann_rel).is_file():
                print(f"{name}: skipped ({root} is absent)")
                continue
            small = repeat_dataset(root / ann_rel, a.images // 4, tmp)
            big = repeat_dataset(root / ann_rel, a.images, tmp)
            _, _, rss_small = run(small, root / img_rel, 1, tmp)
            for workers in (1, 2):
                n, ips, rss = run(big, root / img_rel, workers, tmp)
                print(f"{name}: {n} images, --workers {workers}: {ips:.1f} images/s, peak RSS {rss:.0f} MB")
                results[(name, workers)] = (ips, rss)
            print(
                f"{name}: peak RSS {rss_small:.0f} MB at {a.images // 4} images vs "
                f"{results[(name, 1)][1]:.0f} MB at {a.images} images (--workers 1)"
            )
    speedups = [results[(n, 2)][0] / results[(n, 1)][0] for n in DATASETS if (n, 1) in results]
    print(f"time={time.strftime('%Y-%m-%d')} workers2_speedup={min(speedups):.2f}" if speedups else "no data")


if __name__ == "__main__":
    main()
