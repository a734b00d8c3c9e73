"""K-fold cross-validation splits of a COCO instances json, grouped by image and stratified by class.

    dist-seg split --coco data/train_all.json --folds 5 --out data/folds [--seed 0]

writes DIR/fold0/train.json + DIR/fold0/val.json ... DIR/fold{K-1}/..., and DIR/folds.json with the
per-fold counts. Every image is in exactly one fold's val.json and in the other K-1 folds' train.json, with
all of its annotations (an image is never split between train and val). The folds are stratified by the
classes each image contains, with iterative stratification (Sechidis, Tsoumakas & Vlahavas, ECML PKDD 2011):
the rarest class is placed first, one image at a time, into the fold that still wants most of that class,
so a class on K images lands on K different folds. Images without annotations only balance fold sizes. The
result depends only on the json's content and the seed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from dist_seg.data.prep.coco import load_coco

REPORT_NAME = "folds.json"


def image_classes(coco: dict[str, Any], where: str) -> dict[Any, set[int]]:
    """{image id: category ids of its annotations}; ValueError naming the json for duplicate image ids and
    annotations of images it does not list."""
    ids = [im.get("id") for im in coco["images"]]
    seen: set[Any] = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"{where}: image id {i!r} appears twice in 'images'")
        seen.add(i)
    classes: dict[Any, set[int]] = {i: set() for i in ids}
    for a in coco.get("annotations") or []:
        if a.get("image_id") not in classes:
            raise ValueError(
                f"{where}: annotation {a.get('id')!r} refers to image id {a.get('image_id')!r}, which 'images' "
                "does not list"
            )
        classes[a["image_id"]].add(a["category_id"])
    return classes


def assign_folds(classes: dict[Any, set[int]], folds: int, seed: int) -> dict[Any, int]:
    """{image id: fold} by iterative stratification over the images' class sets."""
    rng = random.Random(seed)
    n = len(classes)
    want_size = [n / folds] * folds
    per_class: dict[int, list[Any]] = defaultdict(list)
    for image, cats in classes.items():
        for c in cats:
            per_class[c].append(image)
    want = {c: [len(imgs) / folds] * folds for c, imgs in per_class.items()}
    left = {c: set(imgs) for c, imgs in per_class.items()}
    fold_of: dict[Any, int] = {}

    def place(image: Any, fold: int) -> None:
        fold_of[image] = fold
        want_size[fold] -= 1
        for c in classes[image]:
            want[c][fold] -= 1
            left[c].discard(image)

    while any(left.values()):
        # the class with the fewest unplaced images (ties: smallest category id, for determinism)
        c = min((c for c in left if left[c]), key=lambda c: (len(left[c]), c))
        images = sorted(left[c], key=repr)
        rng.shuffle(images)
        for image in images:
            best = max(want[c])
            tied = [f for f in range(folds) if want[c][f] == best]
            most = max(want_size[f] for f in tied)
            tied = [f for f in tied if want_size[f] == most]
            place(image, rng.choice(tied))
    empty = sorted((i for i in classes if i not in fold_of), key=repr)
    rng.shuffle(empty)
    for image in empty:  # images with no annotations: to the folds furthest below their share
        most = max(want_size)
        place(image, rng.choice([f for f in range(folds) if want_size[f] == most]))
    return fold_of


def write_folds(coco_path: str | Path, folds: int, out: str | Path, seed: int = 0) -> dict[str, Any]:
    """Write the K train/val pairs and folds.json under `out`; returns the report."""
    where = str(coco_path)
    coco = load_coco(coco_path)
    classes = image_classes(coco, where)
    if folds < 2:
        raise ValueError(f"--folds {folds}: need at least 2 folds")
    if folds > len(classes):
        raise ValueError(f"--folds {folds}: {where} has only {len(classes)} images")
    fold_of = assign_folds(classes, folds, seed)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    anns_of: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for a in coco.get("annotations") or []:
        anns_of[a["image_id"]].append(a)
    out = Path(out)
    report: dict[str, Any] = {"coco": where, "folds": folds, "seed": seed, "per_fold": []}
    for k in range(folds):
        parts: dict[str, dict[str, Any]] = {}
        for split, keep in (("train", lambda f, k=k: f != k), ("val", lambda f, k=k: f == k)):
            images = [im for im in coco["images"] if keep(fold_of[im["id"]])]
            ids = {im["id"] for im in images}
            anns = [a for a in coco.get("annotations") or [] if a["image_id"] in ids]
            parts[split] = {**coco, "images": images, "annotations": anns}
            (out / f"fold{k}").mkdir(parents=True, exist_ok=True)
            (out / f"fold{k}" / f"{split}.json").write_text(json.dumps(parts[split]))
        val_ids = [im["id"] for im in parts["val"]["images"]]
        report["per_fold"].append(
            {
                "fold": k,
                "val_images": len(val_ids),
                "train_images": len(parts["train"]["images"]),
                "val_images_per_class": {
                    names.get(c, str(c)): sum(c in classes[i] for i in val_ids) for c in sorted(names)
                },
                "val_instances_per_class": {
                    names.get(c, str(c)): sum(a["category_id"] == c for i in val_ids for a in anns_of[i])
                    for c in sorted(names)
                },
            }
        )
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_report(report: dict[str, Any]) -> str:
    """Images per class in each fold's val split, one row per class, rarest first."""
    per = report["per_fold"]
    totals = {c: sum(f["val_images_per_class"][c] for f in per) for c in per[0]["val_images_per_class"]}
    width = max([len(c) for c in totals] + [5])
    head = f"{'class':<{width}}  " + " ".join(f"fold{f['fold']:<3}" for f in per) + "  images"
    total = sum(f["val_images"] for f in per)
    rows = [head, f"{'(all)':<{width}}  " + " ".join(f"{f['val_images']:<7}" for f in per) + f"  {total}"]
    for c in sorted(totals, key=lambda c: (totals[c], c)):
        counts = " ".join(f"{f['val_images_per_class'][c]:<7}" for f in per)
        rows.append(f"{c:<{width}}  {counts}  {totals[c]}")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-seg split", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--coco", required=True, help="COCO instances json to split (the images stay where they are)"
    )
    p.add_argument("--folds", type=int, required=True, help="number of folds K (>= 2)")
    p.add_argument(
        "--out", required=True, help="output directory: foldN/train.json, foldN/val.json, folds.json"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the tie-breaking order (default 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        report = write_folds(a.coco, a.folds, a.out, a.seed)
    except ValueError as e:
        print(f"dist-seg split: error: {e}", file=sys.stderr)
        return 1
    print(f"{a.folds} folds of {a.coco} in {a.out} (seed {a.seed}); images per class in each val split:")
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
