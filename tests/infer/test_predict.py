"""`dist-seg predict`: CSV round trip and order, batch-size invariance, inputs (the Predictor itself:
tests/test_inference.py)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, shared_dataset
from PIL import Image
from torch import nn

from dist_seg.checkpoint import save_checkpoint
from dist_seg.config.loading import load_config
from dist_seg.config.schema import to_dict
from dist_seg.data.prep.coco import build_class_map, load_coco
from dist_seg.data.prep.convert import ConvertOptions, convert
from dist_seg.infer import predict
from dist_seg.infer.predict import PredictOptions, list_folder, run_predict
from dist_seg.infer.submission import decode_row, iter_rows
from dist_seg.models import build_model
from dist_seg.runtime import distributed as D

# json positions in trashcan_subset val: 270-pixel and 360-pixel high images interleaved, so batches must regroup
PICK = [0, 35, 1, 36, 2, 3, 37, 4]
OVERRIDES = ["model.name=deeplab_v1"]


# ---------------------------------------------------------------------------------------------- real runs
@contextmanager
def bitwise_batch_invariant_kernels() -> Iterator[None]:
    """oneDNN's CPU convolutions pick kernels by batch size, so a pixel's logits can differ in the last bits
    between batch sizes (measured: 2.4e-7 in probability) and flip the argmax where two classes tie. The
    native kernels compute each image alone; with them, the comparison tests what predict guarantees:
    an image's prediction never depends on which images share its batch."""
    old = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = old


@pytest.fixture(scope="module")
def subset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """8 trashcan val images (two sizes, interleaved) as a test json, a checkpoint, and test shards that were
    converted from a json in another (sorted) order."""
    ann, images = shared_dataset("trashcan_subset_val")
    tmp = tmp_path_factory.mktemp("predict")
    coco = load_coco(ann)
    picked = [coco["images"][i] for i in PICK]
    test = {"images": picked, "categories": coco["categories"]}
    (tmp / "test.json").write_text(json.dumps(test))
    by_name = {**test, "images": sorted(picked, key=lambda im: im["file_name"])}
    (tmp / "sorted.json").write_text(json.dumps(by_name))
    convert(
        ConvertOptions(
            str(tmp / "sorted.json"), str(images), str(tmp / "shards"), min_shards=2, progress=False
        )
    )
    names = list(build_class_map(coco["categories"]).names)
    cfg = load_config(REPO / "configs/cpu_small.yaml", OVERRIDES)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(names))
    for m in model.modules():  # He init without BN statistics: predictions vary across and within images
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)
    state = {
        "model": model.state_dict(),
        "config": to_dict(cfg),
        "model_name": cfg.model.name,
        "num_classes": len(names),
        "class_names": names,
        "train_state": {"step": 0},
    }
    save_checkpoint(tmp / "ck.pt", state)
    ref = tmp / "bs1"
    opts = PredictOptions(str(tmp / "ck.pt"), str(ref), images=str(images), coco=str(tmp / "test.json"))
    opts.submission, opts.batch_size, opts.quiet = str(ref / "sub.csv"), 1, True
    with bitwise_batch_invariant_kernels():
        assert run_predict(cfg, opts, D.init_distributed("cpu"))["problems"] == []
    return {"tmp": tmp, "images": images, "ck": tmp / "ck.pt", "picked": picked, "bs1": ref}


def _label(path: Path) -> np.ndarray:
    im = Image.open(path)
    assert im.mode == "P"
    return np.array(im)


def test_csv_rows_follow_the_json_and_decode_to_the_resized_prediction(subset: dict) -> None:
    rows = [fields for row, fields in iter_rows(subset["bs1"] / "sub.csv") if row > 0]
    assert [r[0] for r in rows] == [im["file_name"] for im in subset["picked"]]
    for (image_id, text), im in zip(rows, subset["picked"], strict=True):
        label = _label(subset["bs1"] / Path(image_id).with_suffix(".png"))
        assert label.shape == (im["height"], im["width"])
        ref = F.interpolate(torch.from_numpy(label)[None, None].float(), size=(256, 256), mode="nearest")
        assert np.array_equal(decode_row(text, 256), ref[0, 0].numpy().astype(np.int64))
    assert len({r[1] for r in rows}) > 1, "the test model must predict varied maps"


def test_batch_size_does_not_change_any_row(subset: dict, capsys: pytest.CaptureFixture[str]) -> None:
    out = subset["tmp"] / "bs3"
    argv = ["--config", str(REPO / "configs/cpu_small.yaml"), "--checkpoint", str(subset["ck"]), *OVERRIDES]
    argv += ["--images", str(subset["images"]), "--coco", str(subset["tmp"] / "test.json"), "--out", str(out)]
    with bitwise_batch_invariant_kernels():
        assert (
            predict.main([*argv, "--submission", str(out / "sub.csv"), "--batch-size", "3", "--quiet"]) == 0
        )
    assert "(checked: OK)" in capsys.readouterr().out
    assert (out / "sub.csv").read_bytes() == (subset["bs1"] / "sub.csv").read_bytes()
    for im in subset["picked"]:
        stem = Path(im["file_name"]).with_suffix(".png")
        assert np.array_equal(_label(out / stem), _label(subset["bs1"] / stem))


def test_shards_input_is_written_in_the_json_order(subset: dict) -> None:
    cfg = load_config(REPO / "configs/cpu_small.yaml", OVERRIDES)
    out = subset["tmp"] / "from_shards"
    opts = PredictOptions(str(subset["ck"]), str(out), shards=str(subset["tmp"] / "shards"))
    opts.coco, opts.submission, opts.batch_size, opts.quiet = (
        str(subset["tmp"] / "test.json"),
        str(out / "s.csv"),
        4,
        True,
    )
    with bitwise_batch_invariant_kernels():
        assert run_predict(cfg, opts, D.init_distributed("cpu"))["problems"] == []
    # the shards hold the images in file-name order; the CSV follows the json, byte for byte as from the folder
    assert (out / "s.csv").read_bytes() == (subset["bs1"] / "sub.csv").read_bytes()


def test_folder_without_json_eval_resize_and_overlays(subset: dict) -> None:
    root = subset["tmp"] / "folder"
    small, tall = subset["picked"][0], subset["picked"][1]
    for rel, im in (("a/x.jpg", small), ("b/c/y.jpg", tall)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(subset["images"] / im["file_name"], root / rel)
    out = root / "pred"  # inside the image folder: its outputs must never be read back as inputs
    cfg = load_config(REPO / "configs/cpu_small.yaml", [*OVERRIDES, "data.eval_resize=128"])
    opts = PredictOptions(str(subset["ck"]), str(out), images=str(root), overlays=True, quiet=True)
    opts.submission = str(out / "sub.csv")
    for _ in range(2):
        assert run_predict(cfg, opts, D.init_distributed("cpu")) == {
            "images": 2,
            "submission": opts.submission,
            "problems": [],
        }
    assert [f[0] for r, f in iter_rows(out / "sub.csv") if r > 0] == ["a/x.jpg", "b/c/y.jpg"]
    for rel, im in (("a/x", small), ("b/c/y", tall)):
        size = (im["height"], im["width"])
        assert _label(out / f"{rel}.png").shape == size  # predicted at 128, returned to the original size
        assert Image.open(out / "overlays" / f"{rel}.jpg").size == size[::-1]


def test_input_list_errors_name_the_culprit(subset: dict, tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="'a.jpg' and 'a.png' would both be predicted to a.png"):
        list_folder(tmp_path, None, tmp_path / "out")
    with pytest.raises(ValueError, match=r"file_name 'vid_\d+_frame\d+.jpg' not found under --images"):
        list_folder(tmp_path, str(subset["tmp"] / "test.json"), tmp_path / "out")
    cfg = load_config(REPO / "configs/cpu_small.yaml", OVERRIDES)
    both = PredictOptions(str(subset["ck"]), str(tmp_path), images=str(tmp_path), shards="x")
    with pytest.raises(ValueError, match="exactly one of --images DIR and --shards SPEC"):
        run_predict(cfg, both, D.init_distributed("cpu"))
