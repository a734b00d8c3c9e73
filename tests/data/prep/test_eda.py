"""EDA: overlap figures equal an independent per-pixel count from pycocotools masks; plots and report are sound."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import reference_mask, shared_dataset
from PIL import Image

from dist_seg.data.prep.convert import ConvertOptions, convert
from dist_seg.data.prep.eda.report import main, run_eda

POLICIES = ["area", "order", "max-class", "ignore"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- independent reference, built from the json
def _class_index(categories: list[dict]) -> dict[int, int]:
    bg = [c["id"] for c in categories if c["name"].lower() in ("background", "_background_")]
    others = sorted(c["id"] for c in categories if c["id"] not in bg)
    return {**dict.fromkeys(bg, 0), **{cid: i + 1 for i, cid in enumerate(others)}}


_ann_to_mask = reference_mask


def _top(stack: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Per pixel, the topmost instance: the last one in paint `order` that covers the pixel."""
    return order[len(order) - 1 - np.argmax(stack[order][::-1], axis=0)]


def reference(coco: dict, max_images: int | None = None) -> dict:
    """Per-pixel counts from a [N, H, W] stack of masks per image: no painting loop, no dist_seg code."""
    cls_of = _class_index(coco["categories"])
    n = max(cls_of.values()) + 1
    images = coco["images"][:max_images]
    by_image: dict = {im["id"]: [] for im in images}
    for pos, a in enumerate(coco["annotations"]):
        if a["image_id"] in by_image:
            by_image[a["image_id"]].append((pos, a))
    ref = {"multi_instance": 0, "multi_class": 0, "images_with_overlap": 0, "annotated": 0}
    ref["matrix"] = np.zeros((n, n), np.int64)
    ref["changed"] = dict.fromkeys(POLICIES, 0)
    ref["pixels"] = np.zeros(256, np.int64)
    ref["areas"] = {c: [] for c in range(n)}
    for im in images:
        h, w, anns = im["height"], im["width"], by_image[im["id"]]
        if not anns:
            ref["pixels"][0] += h * w
            continue
        stack = np.stack([_ann_to_mask(a["segmentation"], h, w) for _, a in anns])
        cls = np.array([cls_of[a["category_id"]] for _, a in anns])
        area = stack.sum((1, 2))
        for c, ar in zip(cls, area, strict=True):
            ref["areas"][int(c)].append(int(ar))
        cover = stack.sum(0)
        distinct = np.stack([stack[cls == c].any(0) for c in np.unique(cls)]).sum(0)
        ref["multi_instance"] += int((cover >= 2).sum())
        ref["multi_class"] += int((distinct >= 2).sum())
        ref["images_with_overlap"] += bool((cover >= 2).any())
        ref["annotated"] += int((cover > 0).sum())

        area_order = np.array(
            sorted(range(len(anns)), key=lambda i: (-area[i], anns[i][1]["id"], anns[i][0]))
        )
        top = _top(stack, area_order)
        labels = {
            "area": np.where(cover > 0, cls[top], 0),
            "order": np.where(cover > 0, cls[_top(stack, np.arange(len(anns)))], 0),
            "max-class": np.where(stack, cls[:, None, None], 0).max(0),
        }
        labels["ignore"] = np.where(distinct >= 2, 255, labels["area"])
        for p in POLICIES:
            ref["changed"][p] += int((labels[p] != labels["area"]).sum())
        ref["pixels"] += np.bincount(labels["area"].ravel().astype(np.int64), minlength=256)
        # matrix[a, b]: pixels whose top instance has class a while some other instance of class b covers them
        others = stack & (np.arange(len(anns))[:, None, None] != top[None])
        for b in np.unique(cls):
            under_b = others[cls == b].any(0)
            np.add.at(ref["matrix"], (cls[top[under_b]], b), 1)
    return ref


def assert_matches_reference(summary: dict, coco: dict, max_images: int | None = None) -> None:
    ref = reference(coco, max_images)
    o = summary["overlap"]
    assert o["pixels_multi_instance"] == ref["multi_instance"]
    assert o["pixels_multi_class"] == ref["multi_class"]
    assert o["images_with_overlap"] == ref["images_with_overlap"]
    assert o["annotated_pixels"] == ref["annotated"]
    assert np.array_equal(np.array(o["matrix"]), ref["matrix"])
    assert o["policy_changes_vs_area"] == ref["changed"]
    assert o["share_multi_instance_of_annotated"] == pytest.approx(ref["multi_instance"] / ref["annotated"])
    for row in summary["per_class"]:
        c = row["index"]
        assert row["pixels"] == ref["pixels"][c], row["name"]
        if ref["areas"][c]:
            assert row["mean_area"] == pytest.approx(np.mean(ref["areas"][c]))
            assert row["median_area"] == pytest.approx(np.median(ref["areas"][c]))


def assert_counts_match_json(summary: dict, coco: dict, max_images: int | None = None) -> None:
    cls_of = _class_index(coco["categories"])
    kept = {im["id"] for im in coco["images"][:max_images]}
    anns = [a for a in coco["annotations"] if a["image_id"] in kept]
    instances = Counter(cls_of[a["category_id"]] for a in anns)
    images = Counter(c for _, c in {(a["image_id"], cls_of[a["category_id"]]) for a in anns})
    for row in summary["per_class"]:
        assert row["instances"] == instances.get(row["index"], 0), row["name"]
        assert row["images"] == images.get(row["index"], 0), row["name"]
    c = summary["counts"]
    assert c["images_in_json"] == len(coco["images"])
    assert c["annotations_in_json"] == len(coco["annotations"])
    assert c["categories"] == len(coco["categories"])
    assert c["crowd_annotations_in_json"] == sum(bool(a.get("iscrowd")) for a in coco["annotations"])
    assert c["images_analysed"] == len(kept)
    assert c["images_without_annotations"] == len(kept - {a["image_id"] for a in anns})


def assert_outputs_sound(out: Path, summary: dict) -> None:
    assert summary["plots"], "no plots listed"
    for name in summary["plots"].values():
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 5000, f"{name} is only {len(data)} bytes"
        with Image.open(out / name) as im:
            assert min(im.size) >= 200, (name, im.size)
    report = (out / "report.md").read_text()
    links = re.findall(r"\]\(([^)#][^)]*)\)", report)
    assert set(summary["plots"].values()) <= set(links), "a plot is not embedded in report.md"
    missing = [link for link in links if not (out / link).is_file()]
    assert not missing, f"report.md links to missing files {missing}"
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))


# ---------------------------------------------------------------- real datasets, one run each
@pytest.fixture(scope="module")
def trashcan(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path]:
    ann, images = shared_dataset("trashcan_subset")
    out = tmp_path_factory.mktemp("eda_trashcan")
    return run_eda(ann, images, out, progress=False), json.loads(ann.read_text()), out


@pytest.fixture(scope="module")
def coco6(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path]:
    ann, images = shared_dataset("icevision_coco6")
    out = tmp_path_factory.mktemp("eda_coco6")
    return run_eda(ann, images, out, progress=False), json.loads(ann.read_text()), out


@pytest.mark.parametrize("dataset", ["trashcan", "coco6"])
def test_overlap_figures_equal_independent_count(dataset: str, request: pytest.FixtureRequest) -> None:
    summary, coco, _ = request.getfixturevalue(dataset)
    assert_matches_reference(summary, coco)
    assert summary["overlap"]["pixels_multi_class"] > 0  # both datasets really have cross-class overlap


@pytest.mark.parametrize("dataset", ["trashcan", "coco6"])
def test_class_counts_equal_direct_json_count(dataset: str, request: pytest.FixtureRequest) -> None:
    summary, coco, _ = request.getfixturevalue(dataset)
    assert_counts_match_json(summary, coco)
    assert summary["dropped"] == {}


@pytest.mark.parametrize("dataset", ["trashcan", "coco6"])
def test_plots_are_pngs_and_report_links_exist(dataset: str, request: pytest.FixtureRequest) -> None:
    summary, _, out = request.getfixturevalue(dataset)
    assert "gallery" in summary["plots"] and 0 < len(summary["gallery"]) <= 6
    px = [g["pixels_multi_instance"] for g in summary["gallery"]]
    assert px == sorted(px, reverse=True) and px[0] > 0
    assert_outputs_sound(out, summary)


def test_class_weights_follow_the_documented_formula(coco6: tuple[dict, dict, Path]) -> None:
    summary, _, _ = coco6
    rows = summary["per_class"]
    freq = [r["pixels"] / r["image_pixels"] if r["pixels"] else 0.0 for r in rows]
    median = float(np.median([f for f in freq if f > 0]))
    expected = [median / f if f else 0.0 for f in freq]
    assert summary["suggested_class_weights"] == pytest.approx(expected)
    assert "median(freq) / freq_c" in summary["class_weights_method"]["formula"]


def test_max_images_and_workers(tmp_path: Path) -> None:
    ann, images = shared_dataset("trashcan_subset")
    coco = json.loads(ann.read_text())
    one = run_eda(ann, images, tmp_path / "w1", max_images=40, progress=False)
    two = run_eda(ann, images, tmp_path / "w2", max_images=40, workers=2, progress=False)
    assert_counts_match_json(one, coco, max_images=40)
    assert_matches_reference(one, coco, max_images=40)
    for key in ("counts", "per_class", "overlap", "suggested_class_weights", "gallery"):
        assert one[key] == two[key], key


# ---------------------------------------------------------------- hand-built dataset with known overlaps
def _rect(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    # on integer corners pycocotools fills columns x0..x1-1 and rows y0..y1-1: (x1-x0)*(y1-y0) pixels
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _hand_built(tmp_path: Path, write_second_image: bool = True) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png") if write_second_image else ("a.png",):
        Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(images / name)
    anns = [
        # image 1: a 20x30 `cup` (600 px) and a 30x25 `bag` (750 px) overlapping on 10x15 = 150 px
        {"id": 1, "image_id": 1, "category_id": 7, "segmentation": _rect(10, 10, 30, 40)},
        {"id": 2, "image_id": 1, "category_id": 9, "segmentation": _rect(20, 25, 50, 50)},
        # image 2: two `cup`s overlapping on 5x5 = 25 px (same class)
        {"id": 3, "image_id": 2, "category_id": 7, "segmentation": _rect(0, 0, 10, 10)},
        {"id": 4, "image_id": 2, "category_id": 7, "segmentation": _rect(5, 5, 15, 15)},
    ]
    for a in anns:
        a.update(iscrowd=0, area=0.0, bbox=[0, 0, 1, 1])
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 64, "height": 64},
            {"id": 2, "file_name": "b.png", "width": 64, "height": 64},
        ],
        "categories": [{"id": 7, "name": "cup"}, {"id": 9, "name": "bag"}],
        "annotations": anns,
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    return path, images


def test_pycocotools_fills_integer_rectangles_as_assumed() -> None:
    m = _ann_to_mask(_rect(10, 10, 30, 40), 64, 64) & _ann_to_mask(_rect(20, 25, 50, 50), 64, 64)
    assert m.sum() == 150
    assert np.argwhere(m).min(0).tolist() == [25, 20] and np.argwhere(m).max(0).tolist() == [39, 29]


def test_hand_built_overlap_is_exact(tmp_path: Path) -> None:
    ann, images = _hand_built(tmp_path)
    s = run_eda(ann, images, tmp_path / "out", progress=False)
    o = s["overlap"]
    cup, bag = 1, 2
    assert o["pixels_multi_instance"] == 150 + 25
    assert o["pixels_multi_class"] == 150
    assert o["images_with_overlap"] == 2 and o["images_with_class_overlap"] == 1
    assert o["annotated_pixels"] == (600 + 750 - 150) + (100 + 100 - 25)
    expected = np.zeros((3, 3), np.int64)
    expected[cup, bag] = 150  # the smaller cup lies on the bag
    expected[cup, cup] = 25
    assert np.array_equal(np.array(o["matrix"]), expected)
    assert o["top_pairs"][0] == {"on_top": "cup", "underneath": "bag", "pixels": 150}
    # order: the bag comes later in the json and covers the cup; max-class: bag (index 2) wins; ignore: 255
    assert o["policy_changes_vs_area"] == {"area": 0, "order": 150, "max-class": 150, "ignore": 150}
    rows = {r["name"]: r for r in s["per_class"]}
    assert rows["cup"]["pixels"] == 600 + 175 and rows["bag"]["pixels"] == 750 - 150
    assert rows["cup"]["instances"] == 3 and rows["cup"]["images"] == 2 and rows["cup"]["median_area"] == 100
    assert [g["file_name"] for g in s["gallery"]] == ["a.png", "b.png"]
    assert_outputs_sound(tmp_path / "out", s)
    assert "`cup` on `bag` (150 px)" in (tmp_path / "out" / "report.md").read_text()


def test_matrix_counts_a_pixel_once_per_class_underneath(tmp_path: Path) -> None:
    ann, images = _hand_built(tmp_path)
    coco = json.loads(ann.read_text())
    # image 1 becomes: a 4x4 cup (16 px) inside two nested bags of 400 and 100 px, the cup listed first
    coco["annotations"][:2] = [
        {"id": 1, "image_id": 1, "category_id": 7, "segmentation": _rect(2, 2, 6, 6), "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 9, "segmentation": _rect(0, 0, 20, 20), "iscrowd": 0},
        {"id": 6, "image_id": 1, "category_id": 9, "segmentation": _rect(0, 0, 10, 10), "iscrowd": 0},
    ]
    ann.write_text(json.dumps(coco))
    s = run_eda(ann, images, tmp_path / "out", progress=False)
    o = s["overlap"]
    # the cup's 16 px lie on two bags but count once for (cup, bag); the inner bag covers the outer on 84 px
    assert np.array(o["matrix"]).tolist() == [[0, 0, 0], [0, 25, 16], [0, 0, 84]]
    assert o["pixels_multi_instance"] == 100 + 25 and o["pixels_multi_class"] == 16
    assert o["policy_changes_vs_area"] == {"area": 0, "order": 16, "max-class": 16, "ignore": 16}
    assert_matches_reference(s, coco)


def test_ignore_policy_labels_cross_class_pixels_255(tmp_path: Path) -> None:
    ann, images = _hand_built(tmp_path)
    s = run_eda(ann, images, tmp_path / "out", overlap="ignore", progress=False)
    assert s["ignore_pixels"] == 150
    assert s["overlap"]["labelled_pixels"] == 2 * 64 * 64 - 150
    assert {r["name"]: r["pixels"] for r in s["per_class"]}["cup"] == 600 - 150 + 175


def test_bad_items_reported_like_the_converter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ann, images = _hand_built(tmp_path, write_second_image=False)
    coco = json.loads(ann.read_text())
    coco["annotations"].append(
        {"id": 5, "image_id": 1, "category_id": 99, "segmentation": _rect(0, 0, 5, 5), "iscrowd": 0}
    )
    ann.write_text(json.dumps(coco))
    s = run_eda(ann, images, tmp_path / "out", progress=False)
    err = capsys.readouterr().err
    assert "skipped [unknown_category] annotation id=5 image_id=1 file='a.png' category_id=99" in err
    assert "skipped [missing_image_file] image id=2 file='b.png'" in err and "b.png does not exist" in err
    assert s["dropped"] == {"missing_image_file": 1, "unknown_category": 1}
    manifest = convert(ConvertOptions(str(ann), str(images), str(tmp_path / "shards"), progress=False))
    assert s["dropped"] == manifest["dropped"]
    # the statistics still count image 2 (they need the json only); the gallery shows the readable image
    assert s["overlap"]["pixels_multi_instance"] == 175
    assert [g["file_name"] for g in s["gallery"]] == ["a.png"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| `missing_image_file` | 1 | image file not found |" in report
    assert_outputs_sound(tmp_path / "out", s)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ann, images = _hand_built(tmp_path)
    assert main(["--coco", str(ann), "--images", str(images), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert "175 pixels" in capsys.readouterr().out
    assert main(["--coco", str(ann), "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "nope" in capsys.readouterr().err
