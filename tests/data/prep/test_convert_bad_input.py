"""Converter on bad input: each bad item is named, counted and skipped (or stops the run with --strict), the json
itself is checked, unsafe keys are refused, and a run over every fault at once is reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from coco_fixtures import good_coco, run_convert, square
from conftest import decode_png, read_shards
from pycocotools import mask as mask_utils

from dist_seg.data.prep.convert import ConvertOptions, convert

BAD_CASES = {
    # reason: (mutation of a good json and its files, text the message must contain)
    "missing_image_file": (lambda c, d: (d / "sub/2.jpg").unlink(), "sub/2.jpg"),
    "unreadable_image": (
        lambda c, d: (d / "sub/2.jpg").write_bytes((d / "sub/2.jpg").read_bytes()[:200]),
        "id=2",
    ),
    "size_mismatch": (lambda c, d: c["images"][1].update(width=41), "id=2"),
    "unknown_category": (lambda c, d: c["annotations"][2].update(category_id=99), "id=20"),
    "missing_image_id": (lambda c, d: c["annotations"][2].update(image_id=77), "image_id=77"),
    "empty_segmentation": (lambda c, d: c["annotations"][2].update(segmentation=[]), "id=20"),
    "bad_polygon": (lambda c, d: c["annotations"][2].update(segmentation=[[1, 1, 9, 9]]), "id=20"),
    "rle_size_mismatch": (
        lambda c, d: c["annotations"][2].update(segmentation={"size": [10, 10], "counts": [0, 100]}),
        "id=20",
    ),
    "duplicate_image_id": (lambda c, d: c["images"][1].update(id=1), "id=1"),
    "duplicate_annotation_id": (lambda c, d: c["annotations"][2].update(id=10), "id=10"),
    "bad_key": (lambda c, d: c["images"][1].update(id="../2.x"), "'../2.x'"),
    "bad_rle": (
        lambda c, d: c["annotations"][2].update(segmentation={"size": [30, 40], "counts": "0"}),
        "id=20",
    ),
    "bad_annotation_entry": (lambda c, d: c["annotations"][2].update(image_id=[2]), "annotations[2]"),
}


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_bad_input_is_named_counted_and_skipped(reason: str, tmp_path: Path) -> None:
    coco = good_coco(tmp_path / "img")
    mutate, culprit = BAD_CASES[reason]
    mutate(coco, tmp_path / "img")
    m, log = run_convert(tmp_path, coco)
    assert m["dropped"].get(reason) == 1, (m["dropped"], log)
    assert f"[{reason}]" in log and culprit in log, log
    assert f"{reason}=1" in log  # the final summary line counts it
    # --strict stops at it, naming it
    m2, err = run_convert(tmp_path, coco, strict=True)
    assert m2 == {} and f"[{reason}]" in err and culprit in err, err


def test_odd_polygon_part_dropped_rest_kept(tmp_path: Path) -> None:
    coco = good_coco(tmp_path / "img")
    coco["annotations"][0]["segmentation"] = [square(2, 2, 20), [1, 2, 3, 4, 5, 6, 7]]
    m, log = run_convert(tmp_path, coco)
    assert m["dropped"] == {"bad_polygon": 1} and m["counts"]["annotations_used"] == 8


def test_invalid_and_non_coco_json_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    ann = tmp_path / "ann.json"
    ann.write_text("{not json")
    with pytest.raises(ValueError, match="ann.json is not valid json"):
        convert(ConvertOptions(str(ann), str(tmp_path / "img"), str(tmp_path / "o"), progress=False))
    ann.write_text(json.dumps({"info": {}, "annotations": []}))
    with pytest.raises(ValueError, match="ann.json is not a COCO instances json: 'images'"):
        convert(ConvertOptions(str(ann), str(tmp_path / "img"), str(tmp_path / "o"), progress=False))


# ---------------------------------------------------------------- fault drills (issue 9, cases 8 and 10)
@pytest.mark.parametrize("bad_id", ["a/b", "..", ".", "x.y", "../etc"])
def test_converter_rejects_unsafe_keys(bad_id: str, tmp_path: Path) -> None:
    coco = good_coco(tmp_path / "img")
    coco["images"][1]["id"] = bad_id
    m, log = run_convert(tmp_path, coco)
    assert m["dropped"]["bad_key"] == 1 and repr(bad_id) in log
    assert all("/" not in k and "." not in k for k in read_shards(tmp_path / "out"))


def test_converter_survives_every_bad_input_at_once_and_reruns_identically(tmp_path: Path) -> None:
    coco = good_coco(tmp_path / "img", n=12)
    img = tmp_path / "img"
    (img / "sub/2.jpg").unlink()
    (img / "sub/3.jpg").write_bytes((img / "sub/3.jpg").read_bytes()[:200])
    coco["images"][3]["width"] = 41
    anns = {a["id"]: a for a in coco["annotations"]}
    anns[50]["category_id"] = 99
    anns[60]["image_id"] = 777
    anns[70]["segmentation"] = []
    anns[80]["segmentation"] = [[1, 1, 9, 9]]
    anns[90]["segmentation"] = {"size": [10, 10], "counts": [0, 100]}
    coco["images"][9]["id"] = 1
    anns[111]["id"] = 110
    coco["images"][11]["id"] = "a/b"
    first, log = run_convert(tmp_path, coco)
    want = {
        "missing_image_file",
        "unreadable_image",
        "size_mismatch",
        "unknown_category",
        "missing_image_id",
        "empty_segmentation",
        "bad_polygon",
        "rle_size_mismatch",
        "duplicate_image_id",
        "duplicate_annotation_id",
        "bad_key",
    }
    assert want <= set(first["dropped"]), (first["dropped"], log)
    assert first["total_samples"] == 12 - 5  # missing, unreadable, size mismatch, duplicate id, bad key
    files = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    run_convert(tmp_path, coco)
    assert files == {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}


def test_rle_runs_must_cover_the_image_and_iscrowd_is_parsed(tmp_path: Path) -> None:
    coco = good_coco(tmp_path / "img")
    long_rle = mask_utils.encode(np.asfortranarray(np.ones((31, 40), np.uint8)))["counts"].decode()
    coco["annotations"][2]["segmentation"] = {
        "size": [30, 40],
        "counts": long_rle,
    }  # 31x40 runs in a 30x40 box
    coco["annotations"][4]["iscrowd"] = "0"  # a string flag: not crowd
    coco["annotations"][6]["iscrowd"] = "yes"
    coco["annotations"][7]["category_id"] = [3]
    m, log = run_convert(tmp_path, coco, crowd="ignore")
    assert m["dropped"] == {"bad_rle": 1, "bad_annotation_entry": 1, "unknown_category": 1}, log
    assert "compressed RLE counts sum to 1240, not height*width=1200" in log
    label = decode_png(read_shards(tmp_path / "out")["000000000003"]["seg.png"])
    assert label[3, 3] == 2  # image 3's bag (annotation 30, iscrowd "0") is painted, not ignored
