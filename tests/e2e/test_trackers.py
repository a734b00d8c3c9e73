"""Run tracking end to end: a 2-process torchrun run (loader workers on) with
train.loggers=[tensorboard,mlflow,wandb] writes the same metrics to all three (MLflow on a sqlite store, W&B
offline), keeps credentials from the environment out of every output and file; a resume continues the same
MLflow and W&B runs without repeating a step, while a tracker failing on rank 0 costs only its reports."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from launch_utils import REPO, torchrun
from trackers_for_tests import mlflow_artifacts, mlflow_history, mlflow_runs, wandb_attempts

from dist_seg.checkpoint import load_checkpoint
from dist_seg.train.mlflow_tracker import metric_key
from dist_seg.train.tensorboard import read_scalars

pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install -e .[mlflow])")
pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install -e .[wandb])")

SECRETS = {  # credentials the trackers could read from the environment: none may be written or printed
    "MLFLOW_TRACKING_PASSWORD": "mlflow-pw-5b1e0c",
    "MLFLOW_TRACKING_TOKEN": "mlflow-token-77a2f9",
    "WANDB_API_KEY": "0123456789abcdef0123456789abcdef0badc0de",
}


def _train(tiny_shards: dict[str, Path], out: Path, store: str, *extra: str) -> tuple[str, str]:
    overrides = [
        f"data.train_shards={tiny_shards['train4']}",
        f"data.val_shards={tiny_shards['eval1']}",
        f"train.out_dir={out}",
        "model.name=fcn8s",
        "data.crop_size=32",
        "data.num_workers=1",
        "train.log_every=1",
        "train.eval_every=2",
        f"train.mlflow_tracking_uri={store}",
        *extra,
    ]
    env = {
        **SECRETS,
        "WANDB_MODE": "offline",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),  # the test trackers
    }
    config = str(REPO / "configs/cpu_small.yaml")
    r = torchrun(["--module", "dist_seg.train", "--config", config, *overrides], env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout, r.stderr


def _steps(points: list[tuple[int, float]]) -> list[int]:
    return [s for s, _ in points]


def test_two_processes_report_to_tensorboard_mlflow_and_wandb_and_a_resume_continues_them(
    tiny_shards: dict[str, Path], tmp_path: Path
) -> None:
    out, store = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    loggers = "train.loggers=[tensorboard,mlflow,wandb]"
    stdout, stderr = _train(tiny_shards, out, store, loggers, "train.max_steps=3")
    ck = load_checkpoint(out / "last.pt")
    tb = read_scalars(out / "tb")
    [run] = mlflow_runs(store)
    mlflow = mlflow_history(store, run.info.run_id)
    [wandb] = wandb_attempts(out)
    # one tracked run each, found by the key every checkpoint keeps
    assert run.data.tags["dist_seg.run_key"] == wandb["run_id"] == ck["run_key"]
    assert run.info.status == "FINISHED" and wandb["exit_code"] == 0
    # the same scalars at the same steps: every TensorBoard tag of the training and the evaluations
    classes = [t for t in tb if t.startswith("val/iou/")]
    assert classes and _steps(tb["train/loss"]) == [1, 2, 3] and _steps(tb["val/miou"]) == [2, 3]
    for tag in ["train/loss", "train/grad_norm", "val/miou", "val/pixel_acc", *classes]:
        mine = mlflow[metric_key(tag)]
        assert _steps(mine) == _steps(wandb["history"][tag]) == _steps(tb[tag]), tag
        # MLflow and W&B keep float64; TensorBoard float32 (relative rounding 2**-24)
        assert [v for _, v in mine] == [v for _, v in wandb["history"][tag]], tag
        assert np.allclose([v for _, v in tb[tag]], [v for _, v in mine], rtol=2**-24, atol=0), tag
    # images at each evaluation; the config as params; the final metrics
    assert _steps(wandb["history"]["val/samples/path"]) == [2, 3]
    images = [a for a in mlflow_artifacts(store, run.info.run_id, "images") if a.endswith(".png")]
    assert sorted(a.split("+")[0] + "@" + a.split("+")[2] for a in images) == [
        "images/val~confusion@2",
        "images/val~confusion@3",
        "images/val~samples@2",
        "images/val~samples@3",
    ]
    assert run.data.params["train.loggers"] == '["tensorboard", "mlflow", "wandb"]'
    assert run.data.params["data.num_workers"] == "1" and wandb["config"]["data"]["num_workers"] == 1
    final = mlflow["final/miou"]
    assert final == [(3, wandb["summary"]["final/miou"])] and final[0][1] == mlflow["val/miou"][-1][1]
    # credentials from the environment: in no output, no file of the run, no store
    files = [p for p in tmp_path.rglob("*") if p.is_file()]  # the run directory, the MLflow store
    for name, secret in SECRETS.items():
        assert secret not in stdout + stderr, name
        assert not [p for p in files if secret.encode() in p.read_bytes()], name

    # The resume: from the step-2 checkpoint, as if the run had died after logging step 3; next to the three,
    # a tracker on rank 0 fails at every scalars report (tests/train/test_tracking.py has one that hangs)
    shutil.copy(out / "step-00000002.pt", tmp_path / "step2.pt")
    failing = "train.loggers=[tensorboard,mlflow,wandb,trackers_for_tests:RaisingTracker]"
    resume = [f"train.resume={tmp_path / 'step2.pt'}", "train.max_steps=4"]
    stdout, stderr = _train(tiny_shards, out, store, failing, *resume)
    said = [line for line in stderr.splitlines() if line.startswith("train.loggers: trackers_for_tests:")]
    assert len(said) == 2 and "scalars failed (ConnectionError" in said[0], said  # once, then the count
    [again] = mlflow_runs(store)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert _steps(mlflow_history(store, run.info.run_id)["train/loss"]) == [1, 2, 3, 4]
    first, second = wandb_attempts(out)
    assert first["run_id"] == second["run_id"] == ck["run_key"]
    assert _steps(first["history"]["train/loss"]) + _steps(second["history"]["train/loss"]) == [1, 2, 3, 4]
    assert _steps(read_scalars(out / "tb")["train/loss"]) == [1, 2, 3, 4]
    assert load_checkpoint(out / "last.pt")["run_key"] == ck["run_key"]
