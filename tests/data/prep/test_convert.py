"""Converter: label maps equal an independent pycocotools rasterisation; bad input is named and counted."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from coco_fixtures import good_coco, jpeg, run_convert
from conftest import decode_png, read_shards, reference_mask, shared_dataset
from PIL import Image
from pycocotools import mask as mask_utils
from tiny_shards import sample_ranges

from dist_seg.data.format.manifest import read_manifest
from dist_seg.data.prep.convert import ConvertOptions, convert

POLICIES = ["area", "order", "max-class", "ignore"]


# ---------------------------------------------------------------- independent reference rasteriser
def _class_index(categories: list[dict]) -> dict[int, int]:
    bg = [c["id"] for c in categories if c["name"].lower() in ("background", "_background_")]
    others = sorted(c["id"] for c in categories if c["id"] not in bg)
    return {**{b: 0 for b in bg}, **{cid: i + 1 for i, cid in enumerate(others)}}


def _ann_mask(ann: dict, h: int, w: int) -> np.ndarray:
    return reference_mask(ann["segmentation"], h, w)


def reference_label(anns: list[dict], h: int, w: int, cls_of: dict[int, int], policy: str) -> np.ndarray:
    masks = [(_ann_mask(a, h, w), cls_of[a["category_id"]], a["id"]) for a in anns]
    label = np.zeros((h, w), np.uint8)
    if policy == "max-class":
        for m, c, _ in masks:
            label = np.where(m, np.maximum(label, c), label)
        return label
    if policy == "order":
        ordered = masks
    else:
        ordered = sorted(masks, key=lambda t: (-int(t[0].sum()), t[2]))
    for m, c, _ in ordered:
        label[m] = c
    if policy == "ignore":
        classes_here = np.zeros((h, w), np.int32)
        for c in {c for _, c, _ in masks}:
            union = np.zeros((h, w), bool)
            for m, c2, _ in masks:
                if c2 == c:
                    union |= m
            classes_here += union
        label[classes_here >= 2] = 255
    return label


@pytest.mark.parametrize("name", ["trashcan_subset", "icevision_coco6", "labelme_voc3_coco"])
def test_label_maps_equal_reference_under_every_policy(name: str, tmp_path: Path) -> None:
    ann_path, img_dir = shared_dataset(name)
    coco = json.loads(ann_path.read_text())
    cls_of = _class_index(coco["categories"])
    by_image: dict = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    images = coco["images"][:60]  # enough to cover overlaps; keeps the test fast
    keep = {im["id"] for im in images}
    sub = dict(coco, images=images, annotations=[a for a in coco["annotations"] if a["image_id"] in keep])
    sub_path = tmp_path / "sub.json"
    sub_path.write_text(json.dumps(sub))
    for policy in POLICIES:
        out = tmp_path / policy
        m = convert(ConvertOptions(str(sub_path), str(img_dir), str(out), overlap=policy, progress=False))
        samples = read_shards(out)
        assert m["total_samples"] == len(images) == len(samples)
        assert m["dropped"] == {}
        for im in images:
            s = samples[f"{im['id']:012d}"]
            got = decode_png(s["seg.png"])
            want = reference_label(by_image.get(im["id"], []), im["height"], im["width"], cls_of, policy)
            assert got.shape == (im["height"], im["width"])
            np.testing.assert_array_equal(got, want, err_msg=f"{name} image {im['id']} policy {policy}")
            meta = json.loads(s["json"])
            assert meta["image_id"] == im["id"] and meta["file_name"] == im["file_name"]


@pytest.mark.parametrize("name", ["trashcan_subset", "icevision_coco6", "labelme_voc3_coco"])
def test_manifest_counts_equal_direct_count(name: str, tmp_path: Path) -> None:
    ann_path, img_dir = shared_dataset(name)
    coco = json.loads(ann_path.read_text())
    m = convert(ConvertOptions(str(ann_path), str(img_dir), str(tmp_path / "s"), progress=False))
    cls_of = _class_index(coco["categories"])
    assert m["total_samples"] == len(coco["images"])
    assert m["counts"]["annotations_used"] == len(coco["annotations"])
    assert sum(s["samples"] for s in m["shards"]) == len(coco["images"])
    instances = np.zeros(m["num_classes"], int)
    for a in coco["annotations"]:
        instances[cls_of[a["category_id"]]] += 1
    assert [c["instances"] for c in m["class_stats"]] == instances.tolist()
    # pixel counts over all classes add up to every pixel of every image
    total = sum(im["height"] * im["width"] for im in coco["images"])
    assert sum(c["pixels"] for c in m["class_stats"]) + m["ignore_pixels"] == total
    names = [c["name"] for c in m["classes"]]
    if name == "labelme_voc3_coco":  # category id 0 '_background_' is class 0, not a second background
        assert names[0] == "_background_" and m["classes"][0]["category_id"] == 0
        assert "background" not in names
    else:
        assert names[0] == "background" and m["classes"][0]["category_id"] is None
    ids = [c["category_id"] for c in m["classes"][1:]]
    assert ids == sorted(ids)


def test_trashcan_val_converts_with_defaults(tmp_path: Path) -> None:
    ann_path, img_dir = shared_dataset("trashcan_subset_val")
    out = tmp_path / "val"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_seg.data.prep.convert",
            "--coco",
            str(ann_path),
            "--images",
            str(img_dir),
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "converted 60 of 60 images" in r.stdout
    assert read_manifest(out)["total_samples"] == 60


# ---------------------------------------------------------------- hand-built datasets (tests/coco_fixtures.py)
def test_area_policy_keeps_small_object_inside_large_one(tmp_path: Path) -> None:
    m, _ = run_convert(tmp_path, good_coco(tmp_path / "img"))
    label = decode_png(read_shards(tmp_path / "out")["000000000001"]["seg.png"])
    # classes: 0 background, 1 bottle (id 3), 2 bag (id 7); the bottle lies inside the bag
    assert label[8, 8] == 1 and label[3, 3] == 2 and label[28, 38] == 0
    assert m["overlap"]["pixels_multi_class"] == 4 * 36 and m["overlap"]["images_with_overlap"] == 4


def test_colour_modes_and_exif_become_rgb(tmp_path: Path) -> None:
    d = tmp_path / "img"
    coco = good_coco(d, n=5)
    jpeg(d / "sub/1.jpg", mode="L")
    jpeg(d / "sub/2.jpg", mode="CMYK")
    jpeg(d / "sub/3.png", mode="P", fmt="PNG")
    jpeg(d / "sub/4.png", mode="RGBA", fmt="PNG")
    jpeg(d / "sub/5.jpg", w=30, h=40, exif_orientation=6)  # stored 30x40, displayed 40x30
    for i in (3, 4):
        coco["images"][i - 1]["file_name"] = f"sub/{i}.png"
    m, log = run_convert(tmp_path, coco)
    assert m["dropped"] == {} and m["total_samples"] == 5, log
    assert m["repaired"] == {
        "converted_CMYK_to_RGB": 1,
        "converted_L_to_RGB": 1,
        "converted_P_to_RGB": 1,
        "converted_RGBA_to_RGB": 1,
        "exif_orientation_6": 1,
    }
    for key, s in read_shards(tmp_path / "out").items():
        ext = "png" if key.endswith(("3", "4")) else "jpg"
        img = Image.open(io.BytesIO(s[ext]))
        assert img.mode == "RGB" and img.size == (40, 30), key
        assert img.getexif().get(0x0112, 1) == 1


def test_original_jpeg_bytes_kept(tmp_path: Path) -> None:
    run_convert(tmp_path, good_coco(tmp_path / "img"))
    s = read_shards(tmp_path / "out")["000000000003"]
    assert s["jpg"] == (tmp_path / "img/sub/3.jpg").read_bytes()
    assert json.loads(s["json"])["actions"] == ["kept_original"]


def test_deterministic_and_independent_of_workers(tmp_path: Path) -> None:
    ann_path, img_dir = shared_dataset("trashcan_subset")
    outs = []
    for i, workers in enumerate([1, 1, 2]):
        out = tmp_path / f"o{i}"
        convert(
            ConvertOptions(
                str(ann_path), str(img_dir), str(out), samples_per_shard=70, workers=workers, progress=False
            )
        )
        outs.append(out)
    for a in outs[1:]:
        for f in sorted(p.name for p in outs[0].iterdir()):
            assert (outs[0] / f).read_bytes() == (a / f).read_bytes(), f
    m = read_manifest(outs[0])
    assert [s["samples"] for s in m["shards"]] == [60, 60, 60, 60]  # 240 near-equal in ceil(240/70) = 4


def test_test_split_is_image_only(tmp_path: Path) -> None:
    coco = good_coco(tmp_path / "img")
    del coco["annotations"]
    m, _ = run_convert(tmp_path, coco)
    assert m["has_labels"] is False and "class_stats" not in m
    for s in read_shards(tmp_path / "out").values():
        assert set(s) == {"jpg", "json"}


def test_classes_subset(tmp_path: Path) -> None:
    m, _ = run_convert(tmp_path, good_coco(tmp_path / "img"), classes="bag")
    assert [c["name"] for c in m["classes"]] == ["background", "bag"]
    assert m["remapped"] == {"class_not_selected": 4}
    label = decode_png(read_shards(tmp_path / "out")["000000000001"]["seg.png"])
    assert label[8, 8] == 1 and set(np.unique(label)) == {0, 1}
    _, err = run_convert(tmp_path, good_coco(tmp_path / "img"), classes="bag,cup")
    assert "unknown class name(s) ['cup']" in err


def test_min_shards_and_crowd_policies(tmp_path: Path) -> None:
    coco = good_coco(tmp_path / "img")
    m, _ = run_convert(tmp_path, coco, min_shards=3)
    assert [s["samples"] for s in m["shards"]] == [2, 1, 1]
    _, err = run_convert(tmp_path, coco, min_shards=5)
    assert "--min-shards 5" in err
    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((8, 8), np.uint8), ((20, 2), (30, 2)))))
    crowd = {
        "id": 99,
        "image_id": 1,
        "category_id": 3,
        "iscrowd": 1,
        "segmentation": {"size": [30, 40], "counts": rle["counts"].decode()},
    }
    coco["annotations"].append(crowd)
    for policy, value in (("include", 1), ("ignore", 255), ("skip", 0)):
        run_convert(tmp_path, coco, crowd=policy)
        label = decode_png(read_shards(tmp_path / "out")["000000000001"]["seg.png"])
        assert label[25, 35] == value, policy


def test_shard_index_locates_every_sample_and_its_digest(tiny_shards) -> None:
    """The index a ranged reader trusts: sample i is exactly bytes offsets[i]..offsets[i+1] of the tar (checked
    against the tar's own headers), that range hashes to sha256[i], and the manifest holds the index's hash."""
    shard_dir = tiny_shards["train4"]
    m = read_manifest(shard_dir)
    assert m["format_version"] == 2
    for s in m["shards"]:
        shard, index_path = shard_dir / s["name"], shard_dir / s["index"]
        index = json.loads(index_path.read_text())
        ranges = sample_ranges(shard)
        assert len(ranges) == s["samples"]
        assert index["offsets"] == [lo for _, lo, _ in ranges] + [ranges[-1][2]]
        data = shard.read_bytes()
        assert [hashlib.sha256(data[lo:hi]).hexdigest() for _, lo, hi in ranges] == index["sha256"]
        assert hashlib.sha256(index_path.read_bytes()).hexdigest() == s["index_sha256"]


def test_shards_are_webdataset_shards(tiny_shards) -> None:
    """webdataset itself reads our shards: the same keys and member bytes as the tars hold, in order."""
    import webdataset as wds

    shard_dir = tiny_shards["train4"]
    urls = [str(p) for p in sorted(shard_dir.glob("shard-*.tar"))]
    got = [
        (s["__key__"], s["jpg"], s["seg.png"], json.loads(s["json"]))
        for s in wds.WebDataset(urls, shardshuffle=False)
    ]
    want = read_shards(shard_dir)
    assert [k for k, *_ in got] == list(want)
    for key, jpg, seg, meta in got:
        assert jpg == want[key]["jpg"] and seg == want[key]["seg.png"]
        assert meta == json.loads(want[key]["json"])
