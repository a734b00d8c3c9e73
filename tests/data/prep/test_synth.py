"""The built-in synthetic dataset: valid COCO, deterministic, and its overlaps, crowds and RLEs really there."""

from __future__ import annotations

import colorsys
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import reference_mask
from PIL import Image

from dist_seg.cli import main as cli_main
from dist_seg.data.prep.synth import dataset as synth

SIZE = 128
TRAIN, VAL = 40, 8
NAMES = [
    "General trash",
    "Paper",
    "Paper pack",
    "Metal",
    "Glass",
    "Plastic",
    "Styrofoam",
    "Plastic bag",
    "Battery",
    "Clothing",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth.generate(out, images=TRAIN, val_images=VAL, size=SIZE, seed=7)
    return out


def _load(out: Path, split: str) -> dict:
    return json.loads((out / f"{split}.json").read_text())


_decode = reference_mask


def _instances(coco: dict) -> dict[int, list[tuple[dict, np.ndarray]]]:
    """image id -> [(annotation, decoded mask)] in json order."""
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    out: dict[int, list[tuple[dict, np.ndarray]]] = {i: [] for i in sizes}
    for ann in coco["annotations"]:
        out[ann["image_id"]].append((ann, _decode(ann["segmentation"], *sizes[ann["image_id"]])))
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_ids_and_categories(dataset: Path) -> None:
    train, val = _load(dataset, "train"), _load(dataset, "val")
    assert [len(train["images"]), len(val["images"])] == [TRAIN, VAL]
    assert train["images"][0]["file_name"] == "train/000001.jpg"
    assert val["images"][-1]["file_name"] == f"val/{VAL:06d}.jpg"
    image_ids = [im["id"] for im in train["images"] + val["images"]]
    assert len(set(image_ids)) == len(image_ids)
    for coco in (train, val):
        assert [(c["id"], c["name"]) for c in coco["categories"]] == list(enumerate(NAMES, start=1))
        ann_ids = [a["id"] for a in coco["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids)
        for im in coco["images"]:
            with Image.open(dataset / "images" / im["file_name"]) as img:
                assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (im["width"], im["height"]))


def test_annotations_are_valid_coco(dataset: Path) -> None:
    for split in ("train", "val"):
        coco = _load(dataset, split)
        images = {im["id"]: im for im in coco["images"]}
        for ann in coco["annotations"]:
            im = images[ann["image_id"]]
            h, w = im["height"], im["width"]
            assert 1 <= ann["category_id"] <= 10
            seg = ann["segmentation"]
            if isinstance(seg, list):
                assert ann["iscrowd"] == 0
                for poly in seg:
                    assert len(poly) >= 6 and len(poly) % 2 == 0, ann["id"]
                    assert 0 <= min(poly) and max(poly[0::2]) < w and max(poly[1::2]) < h
            else:
                assert seg["size"] == [h, w], ann["id"]
                assert isinstance(seg["counts"], list if ann["iscrowd"] else str)
                if ann["iscrowd"]:
                    assert sum(seg["counts"]) == h * w
            mask = _decode(seg, h, w)
            ys, xs = np.nonzero(mask)
            assert abs(ann["area"] - mask.sum()) <= max(2, 0.01 * mask.sum()), ann["id"]
            expected = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert np.allclose(ann["bbox"], expected, atol=1), ann["id"]


def test_polygons_rle_and_crowd_all_present(dataset: Path) -> None:
    anns = _load(dataset, "train")["annotations"]
    polygons = sum(isinstance(a["segmentation"], list) for a in anns)
    rles = sum(isinstance(a["segmentation"], dict) and not a["iscrowd"] for a in anns)
    crowds = sum(a["iscrowd"] == 1 for a in anns)
    assert polygons > 0.75 * len(anns)
    assert rles > 0 and crowds > 0
    assert len(anns) / TRAIN >= 3


def test_claimed_overlaps_are_present(dataset: Path) -> None:
    multi, mixed, same_class, nested = 0, 0, 0, []
    for image_id, insts in _instances(_load(dataset, "train")).items():
        insts = [(a, m) for a, m in insts if not a["iscrowd"]]
        if not insts:
            continue
        masks = np.stack([m for _, m in insts])
        cats = np.array([a["category_id"] for a, _ in insts])
        multi += int((masks.sum(0) >= 2).sum())
        classes_here = np.stack([masks[cats == c].any(0) for c in np.unique(cats)])
        mixed += int((classes_here.sum(0) >= 2).sum())
        for i, (a, m) in enumerate(insts):
            for b, n in insts[i + 1 :]:
                if a["category_id"] == b["category_id"]:
                    same_class += int((m & n).sum())
                small, large = (m, n) if m.sum() < n.sum() else (n, m)
                if a["category_id"] != b["category_id"] and not (small & ~large).any():
                    nested.append(image_id)
    assert multi > 0 and mixed > 0 and same_class > 0
    assert nested, "no image has a smaller instance lying inside a larger one of another class"


def test_area_order_is_json_order_and_pixels_match_labels(dataset: Path) -> None:
    """Painting largest-first (the converter's `area` policy) must give each class its own colour."""
    coco = _load(dataset, "train")
    hues = {
        i: colorsys.rgb_to_hsv(*colorsys.hsv_to_rgb(h / 360, s, v))[0] * 360
        for i, (_, (h, s, v)) in enumerate(synth.CLASSES, start=1)
    }
    checked = 0
    instances = _instances(coco)
    for im in coco["images"]:
        insts = [(a, m) for a, m in instances[im["id"]] if not a["iscrowd"]]
        areas = [a["area"] for a, _ in insts]
        assert areas == sorted(areas, reverse=True), im["file_name"]
        labels = np.zeros((im["height"], im["width"]), np.uint8)
        for ann, mask in insts:
            labels[mask] = ann["category_id"]
        with Image.open(dataset / "images" / im["file_name"]) as img:
            hsv = np.asarray(img.convert("HSV"), dtype=np.float32) / 255
        for cat in np.unique(labels[labels > 0]):
            # Edges blur in JPEG: judge the region's median colour, on regions big enough to have a middle.
            region = hsv[labels == cat]
            if len(region) < 40:
                continue
            hue, sat, val = np.median(region, axis=0)
            if synth.CLASSES[cat - 1][0] == "Styrofoam":
                assert sat < 0.2 and val > 0.7, (im["file_name"], cat)
            else:
                diff = abs((hue * 360 - hues[cat] + 180) % 360 - 180)
                assert diff < 20 and sat > 0.15, (im["file_name"], int(cat), hue * 360, sat)
            checked += 1
    assert checked > TRAIN


def test_same_seed_same_bytes_and_prefix_stable(tmp_path: Path) -> None:
    for name, images in (("a", 5), ("b", 5), ("short", 3)):
        synth.generate(tmp_path / name, images=images, val_images=2, size=96, seed=11)
    synth.generate(tmp_path / "other", images=5, val_images=2, size=96, seed=12)
    a, b, short, other = (_files(tmp_path / n) for n in ("a", "b", "short", "other"))
    assert a == b
    # The first images do not depend on how many were asked for (every image has its own random stream).
    assert all(a[k] == v for k, v in short.items() if k.endswith(".jpg"))
    assert a["images/train/000001.jpg"] != other["images/train/000001.jpg"]


def test_cli_dispatch_and_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert cli_main(["synth", "--out", str(out), "--images", "2", "--val-images", "1", "--size", "64"]) == 0
    assert len(_load(out, "train")["images"]) == 2 and len(_load(out, "val")["images"]) == 1
    assert "train.json" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        synth.main(["--out", str(out), "--images", "0"])
    assert "images must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="size"):
        synth.generate(out, images=1, val_images=0, size=16, seed=0)


def test_converter_takes_it_without_dropping_anything(dataset: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    cmd = [sys.executable, "-m", "dist_seg.data.prep.convert", "--coco", str(dataset / "train.json")]
    cmd += ["--images", str(dataset / "images"), "--out", str(shards)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((shards / "manifest.json").read_text())
    assert not any(manifest["dropped"].values()), manifest["dropped"]
    assert not any(manifest["repaired"].values()), manifest["repaired"]
    assert manifest["total_samples"] == TRAIN
