"""`dist-seg evaluate` agrees with the trainer's own eval; checkpoint mismatches; 2 ranks == 1 process."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from PIL import Image
from trained_run import CONFIG, N_IMAGES, one_thread, train_run, untrained_fcn8s

from dist_seg.checkpoint import load_for_inference
from dist_seg.config.loading import load_config
from dist_seg.infer import evaluate
from dist_seg.runtime import distributed as D


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return train_run(tmp_path_factory)


def test_evaluate_equals_the_trainers_eval(run: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate.main(["--config", CONFIG, "--checkpoint", str(run["ck"]), *run["overrides"]]) == 0
    trainer = json.loads((run["tmp"] / "run" / "metrics.json").read_text())
    ours = json.loads((run["tmp"] / "run" / "eval" / "metrics.json").read_text())  # default: CKPT_DIR/eval
    assert ours["matrix"] == trainer["matrix"]
    for key in ("miou", "pixel_acc", "mean_acc", "image_miou", "iou", "acc", "iou_by_class"):
        assert ours[key] == trainer[key], key
    assert ours["step"] == trainer["step"] == 2 and ours["num_images"] == N_IMAGES
    assert sum(map(sum, ours["matrix"])) == ours["num_pixels"] > 0
    assert Image.open(run["tmp"] / "run" / "eval" / "confusion.png").format == "PNG"
    table = capsys.readouterr().out
    assert f"mIoU {ours['miou']:6.4f}" in table
    assert all(name in table for name in ours["iou_by_class"])


def test_checkpoint_mismatch_names_both_sides(run: dict, capsys: pytest.CaptureFixture[str]) -> None:
    def load(*extra: str) -> None:
        cfg = load_config(CONFIG, [*run["overrides"], *extra])
        load_for_inference(cfg, run["ck"], D.init_distributed("cpu").device)

    with pytest.raises(ValueError, match="holds model 'deeplab_v1' with 23 classes.*asks for model 'fcn8s'"):
        load("model.name=fcn8s")
    with pytest.raises(
        ValueError, match="holds model 'deeplab_v1' with 23 classes.*'deeplab_v1' with 5 classes"
    ):
        load("model.num_classes=5")
    with pytest.raises(ValueError, match="width_mult=0.0625\\) does not fit .* model.width_mult=0.125"):
        load("model.width_mult=0.125")
    argv = ["--config", CONFIG, "--checkpoint", str(run["ck"]), *run["overrides"], "model.name=fcn8s"]
    assert evaluate.main(argv) == 2
    assert "'fcn8s'" in capsys.readouterr().err
    test_shards = str(run["tmp"] / "test_shards")
    assert evaluate.main([*argv[:-1], "--shards", test_shards]) == 2
    assert "have no label maps" in capsys.readouterr().err


def test_evaluate_and_predict_with_the_dense_crf(run: dict) -> None:
    """--crf as users type it, with a config override, on a model whose predictions are noisy (an untrained
    FCN-8s): the CRF changes the confusion matrix (not its total), and metrics.json records its parameters."""
    from dist_seg.infer.predict import main as predict_main

    tmp, ck = run["tmp"], str(untrained_fcn8s(run))
    overrides = [*run["overrides"], "model.name=fcn8s", "model.width_mult=0.125"]
    base = ["--config", CONFIG, "--checkpoint", ck, *overrides]
    assert evaluate.main([*base, "--out", str(tmp / "plain_eval")]) == 0
    base += ["--crf", "crf.iterations=5"]
    assert evaluate.main([*base, "--out", str(tmp / "crf_eval")]) == 0
    got = json.loads((tmp / "crf_eval" / "metrics.json").read_text())
    plain = json.loads((tmp / "plain_eval" / "metrics.json").read_text())
    assert got["crf"]["iterations"] == 5 and got["crf"]["bilateral_xy_std"] == 121.0 and plain["crf"] is None
    assert got["matrix"] != plain["matrix"] and sum(map(sum, got["matrix"])) == sum(map(sum, plain["matrix"]))
    out = tmp / "crf_pred"
    images = ["--images", str(run["images"]), "--coco", str(tmp / "val.json"), "--out", str(out), "--quiet"]
    assert predict_main([*base, *images]) == 0
    assert len(list(out.rglob("*.png"))) == N_IMAGES
