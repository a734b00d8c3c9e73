"""`dist-seg evaluate` and `dist-seg predict` on 2 real torchrun ranks equal one process: the confusion matrix,
the metrics and the submission CSV, for one checkpoint and for an ensemble with flips and sliding windows."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from launch_utils import REPO, torchrun
from numerics import U64, gamma
from trained_run import CONFIG, N_IMAGES, one_thread, train_run, untrained_fcn8s

from dist_seg.config.loading import load_config
from dist_seg.infer import evaluate
from dist_seg.infer.predict import PredictOptions, run_predict
from dist_seg.runtime import distributed as D


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return train_run(tmp_path_factory)


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


def test_an_ensemble_with_windows_and_flips_evaluates_and_predicts_on_two_ranks_like_one(run: dict) -> None:
    """Two members (the trained deeplab_v1 and an fcn8s of another width), flip TTA, 96-pixel windows every
    64 pixels: the CLI in one process, then the same options under torchrun; confusion matrix and CSV equal."""
    from dist_seg.infer.predict import main as predict_main

    tmp, coco = run["tmp"], str(run["tmp"] / "val.json")
    members = [str(run["ck"]), str(untrained_fcn8s(run))]
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
