"""`dist-seg split`: k-fold train/val jsons grouped by image and stratified by class, through the command line,
on the real trashcan_subset (22 classes) and on small hand-made datasets."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import shared_dataset
from launch_utils import REPO

from dist_seg.data.prep.split import assign_folds, write_folds


def run_split(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dist_seg.cli", "split", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def test_folds_partition_images_keep_annotations_and_balance_classes(tmp_path: Path) -> None:
    ann, _ = shared_dataset("trashcan_subset")
    coco = json.loads(Path(ann).read_text())
    out = tmp_path / "folds"
    r = run_split("--coco", str(ann), "--folds", "5", "--out", str(out), "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert "images per class in each val split" in r.stdout
    val_sets = []
    for k in range(5):
        train = json.loads((out / f"fold{k}" / "train.json").read_text())
        val = json.loads((out / f"fold{k}" / "val.json").read_text())
        tr, va = {im["id"] for im in train["images"]}, {im["id"] for im in val["images"]}
        assert not tr & va and tr | va == {im["id"] for im in coco["images"]}
        for part, ids in ((train, tr), (val, va)):
            assert part["categories"] == coco["categories"]
            # every annotation of an image travels with it, none of another image's
            assert sorted(a["id"] for a in part["annotations"]) == sorted(
                a["id"] for a in coco["annotations"] if a["image_id"] in ids
            )
        val_sets.append(va)
    assert sorted(i for s in val_sets for i in s) == sorted(im["id"] for im in coco["images"])  # each once
    sizes = [len(s) for s in val_sets]
    assert max(sizes) - min(sizes) <= 2, sizes
    # stratified: each class's images spread evenly (a hand count per fold, from the jsons written)
    images_of = {}
    for a in coco["annotations"]:
        images_of.setdefault(a["category_id"], set()).add(a["image_id"])
    for cat, imgs in images_of.items():
        per_fold = [len(imgs & s) for s in val_sets]
        ideal = len(imgs) / 5
        assert max(per_fold) - min(per_fold) <= max(2, round(0.3 * ideal)), (cat, per_fold)
        if len(imgs) <= 5:
            assert max(per_fold) == 1, (cat, per_fold)  # a rare class never doubles up in one fold
    report = json.loads((out / "folds.json").read_text())
    assert [f["val_images"] for f in report["per_fold"]] == sizes


def test_same_seed_same_folds_other_seed_other_folds(tmp_path: Path) -> None:
    classes = {i: {1 + i % 3} | ({4} if i % 7 == 0 else set()) for i in range(60)}
    a, b = assign_folds(classes, 4, seed=0), assign_folds(classes, 4, seed=0)
    assert a == b
    assert assign_folds(classes, 4, seed=1) != a
    assert Counter(a.values()) == {0: 15, 1: 15, 2: 15, 3: 15}
    rare = [a[i] for i in classes if 4 in classes[i]]  # 9 images of class 4 over 4 folds: 3/2/2/2
    assert sorted(Counter(rare).values()) == [2, 2, 2, 3]


def test_images_without_annotations_fill_the_smallest_folds(tmp_path: Path) -> None:
    classes = {i: ({1} if i < 6 else set()) for i in range(12)}
    folds = assign_folds(classes, 3, seed=0)
    assert Counter(folds.values()) == {0: 4, 1: 4, 2: 4}
    assert sorted(Counter(folds[i] for i in range(6)).values()) == [2, 2, 2]


@pytest.mark.parametrize(
    ("coco", "folds", "message"),
    [
        (
            {"images": [{"id": 1}, {"id": 2}], "categories": [{"id": 1, "name": "a"}]},
            1,
            "need at least 2 folds",
        ),
        ({"images": [{"id": 1}, {"id": 2}], "categories": [{"id": 1, "name": "a"}]}, 3, "has only 2 images"),
        (
            {"images": [{"id": 1}, {"id": 1}], "categories": [{"id": 1, "name": "a"}]},
            2,
            "image id 1 appears twice",
        ),
        (
            {
                "images": [{"id": 1}, {"id": 2}],
                "categories": [{"id": 1, "name": "a"}],
                "annotations": [{"id": 9, "image_id": 5, "category_id": 1}],
            },
            2,
            "annotation 9 refers to image id 5",
        ),
    ],
)
def test_bad_input_is_an_error_naming_it(coco: dict, folds: int, message: str, tmp_path: Path) -> None:
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=message):
        write_folds(path, folds, tmp_path / "out")
    r = run_split("--coco", str(path), "--folds", str(folds), "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and message in r.stderr, r.stderr
