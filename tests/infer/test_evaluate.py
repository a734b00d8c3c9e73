"""`dist-seg evaluate` agrees with the trainer's own eval; checkpoint mismatches; 2 ranks == 1 process."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from conftest import REPO, shared_dataset
from launch_utils import torchrun
from numerics import U64, gamma
from PIL import Image

from dist_seg.checkpoint import load_for_inference
from dist_seg.config.loading import load_config
from dist_seg.data.prep.coco import load_coco
from dist_seg.data.prep.convert import ConvertOptions, convert
from dist_seg.infer import evaluate
from dist_seg.infer.predict import PredictOptions, run_predict
from dist_seg.runtime import distributed as D

N_IMAGES = 12
CONFIG = str(REPO / "configs/cpu_small.yaml")
# deeplab_v1 is the fastest VGG model on CPU; eval_resize keeps the eval passes small
MODEL = ["model.name=deeplab_v1", "data.eval_resize=128"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The thread count changes how oneDNN splits a convolution, so the last bits of logits and the argmax at
    ties (measured: 8 of 1.5 M pixels differ between 1 and 2 threads). The torchrun workers run with
    OMP_NUM_THREADS=1 (launch_utils), so the in-process references do too."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-step training run (the trainer evaluates at its last step) on 12 trashcan val images."""
    from dist_seg.train.loop import fit

    ann, images = shared_dataset("trashcan_subset_val")
    tmp = tmp_path_factory.mktemp("evaluate")
    coco = load_coco(ann)
    coco["images"] = coco["images"][:N_IMAGES]
    keep = {im["id"] for im in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    (tmp / "val.json").write_text(json.dumps(coco))
    for name, labels in (("shards", True), ("test_shards", False)):
        opts = ConvertOptions(
            str(tmp / "val.json"), str(images), str(tmp / name), min_shards=3, progress=False
        )
        opts.no_labels = not labels
        convert(opts)
    shards = str(tmp / "shards")
    overrides = [
        *MODEL,
        f"data.train_shards={shards}",
        f"data.val_shards={shards}",
        f"train.out_dir={tmp / 'run'}",
    ]
    overrides += ["train.max_steps=2", "optim.lr=0.01"]
    cfg = load_config(CONFIG, overrides)
    fit(cfg, D.init_distributed("cpu"))
    return {"tmp": tmp, "images": images, "overrides": overrides, "ck": tmp / "run" / "last.pt"}


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


@pytest.mark.slow
def test_two_ranks_evaluate_and_predict_like_one_process(run: dict) -> None:
    tmp, coco = run["tmp"], str(run["tmp"] / "val.json")
    one = tmp / "one"
    cfg = load_config(CONFIG, run["overrides"])
    opts = PredictOptions(str(run["ck"]), str(one / "pred"), images=str(run["images"]), coco=coco, quiet=True)
    opts.submission = str(one / "sub.csv")
    assert run_predict(cfg, opts, D.init_distributed("cpu"))["problems"] == []
    ref = json.loads((tmp / "run" / "metrics.json").read_text())  # the trainer's eval, one process

    # same batch size and an even split: each batch holds the same images as in one process, so every
    # computation is the same one and the files must match byte for byte
    two = tmp / "two"
    worker = str(REPO / "tests/workers/predict_worker.py")
    args = [
        worker,
        str(run["ck"]),
        str(tmp / "shards"),
        str(run["images"]),
        coco,
        str(two),
        *run["overrides"],
    ]
    r = torchrun(args, nproc=2, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads((two / "eval" / "metrics.json").read_text())
    assert got["world_size"] == 2 and got["num_images"] == N_IMAGES
    assert got["matrix"] == ref["matrix"] and got["miou"] == ref["miou"]
    # the per-image mIoUs are the same float64 values (the same integer counts, the same ops); only their
    # sum runs in another order (per batch, per rank, then across ranks): two sums of N_IMAGES non-negative
    # terms, each within gamma(N_IMAGES - 1) of the exact sum in float64, then one division by the exact count
    assert got["image_miou"] == pytest.approx(ref["image_miou"], rel=2 * gamma(N_IMAGES + 1, U64))
    assert (two / "sub.csv").read_bytes() == (one / "sub.csv").read_bytes()
    assert sorted(p.name for p in (two / "pred").glob("*.png")) == sorted(
        p.name for p in (one / "pred").glob("*.png")
    )


def _untrained_fcn8s(run: dict):
    """A randomly initialised FCN-8s (width 0.125) checkpoint with the run's classes and config: a second,
    different ensemble member, whose label maps are far from uniform."""
    from dist_seg.checkpoint import load_checkpoint, save_checkpoint
    from dist_seg.config.schema import to_dict
    from dist_seg.models import build_model

    path = run["tmp"] / "fcn8s.pt"
    if not path.exists():
        trained = load_checkpoint(run["ck"])
        cfg = load_config(CONFIG, [*run["overrides"], "model.name=fcn8s", "model.width_mult=0.125"])
        torch.manual_seed(1)
        model = build_model(cfg.model, trained["num_classes"])
        state = {**trained, "model": model.state_dict(), "model_name": "fcn8s", "config": to_dict(cfg)}
        save_checkpoint(path, state)
    return path


@pytest.mark.slow
def test_an_ensemble_with_windows_and_flips_evaluates_and_predicts_on_two_ranks_like_one(run: dict) -> None:
    """Two members (the trained deeplab_v1 and an fcn8s of another width), flip TTA, 96-pixel windows every
    64 pixels: the CLI in one process, then the same options under torchrun; confusion matrix and CSV equal."""
    from dist_seg.infer.predict import main as predict_main

    tmp, coco = run["tmp"], str(run["tmp"] / "val.json")
    members = [str(run["ck"]), str(_untrained_fcn8s(run))]
    flags = ["--checkpoint", members[0], "--checkpoint", members[1], "--tta", "flip"]
    flags += ["--mode", "slide", "--window", "96", "--stride", "64"]
    one = tmp / "ens_one"
    base = ["--config", CONFIG, *flags, *run["overrides"]]
    assert evaluate.main([*base, "--out", str(one / "eval")]) == 0
    predict_args = ["--images", str(run["images"]), "--coco", coco, "--out", str(one / "pred")]
    assert predict_main([*base, *predict_args, "--submission", str(one / "sub.csv"), "--quiet"]) == 0
    ref = json.loads((one / "eval" / "metrics.json").read_text())
    assert ref["checkpoint"] == members and ref["model"] == ["deeplab_v1", "fcn8s"]
    assert (ref["mode"], ref["window"], ref["stride"], ref["tta"]) == ("slide", 96, 64, "flip")
    single = json.loads((tmp / "run" / "metrics.json").read_text())
    assert ref["matrix"] != single["matrix"]  # the ensemble is not the trained model alone

    two = tmp / "ens_two"
    worker = str(REPO / "tests/workers/predict_worker.py")
    options = {"tta": "flip", "mode": "slide", "window": 96, "stride": 64}
    args = [
        worker,
        ",".join(members),
        str(tmp / "shards"),
        str(run["images"]),
        coco,
        str(two),
        *run["overrides"],
    ]
    r = torchrun(args, nproc=2, timeout=300, env={"INFERENCE": json.dumps(options)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads((two / "eval" / "metrics.json").read_text())
    assert got["world_size"] == 2 and got["num_images"] == N_IMAGES
    assert got["matrix"] == ref["matrix"] and got["miou"] == ref["miou"]
    assert (two / "sub.csv").read_bytes() == (one / "sub.csv").read_bytes()


def test_evaluate_and_predict_with_the_dense_crf(run: dict) -> None:
    """--crf as users type it, with a config override, on a model whose predictions are noisy (an untrained
    FCN-8s): the CRF changes the confusion matrix (not its total), and metrics.json records its parameters."""
    from dist_seg.infer.predict import main as predict_main

    tmp, ck = run["tmp"], str(_untrained_fcn8s(run))
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
