"""train.loggers `mlflow` with the real MLflow on a local sqlite store: what lands where (params, metrics per
step, artifacts, tags, status), a resume that continues the run without repeating a step, and credentials
from the environment kept out of everything printed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from launch_utils import free_port
from PIL import Image
from trackers_for_tests import mlflow_artifacts, mlflow_history, mlflow_runs

from dist_seg.config.schema import Config, TrainConfig
from dist_seg.runtime.distributed import World
from dist_seg.train.mlflow_tracker import KEY_TAG, metric_key, tracking_uri
from dist_seg.train.tracking import RunLog, config_report

pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install -e .[mlflow])")

MAIN = World(0, 0, 1, torch.device("cpu"), None)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One sqlite store for the module: creating its tables takes seconds."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    yield f"sqlite:///{db}"


def _cfg(out: Path, store: str, experiment: str, **train: object) -> Config:
    t = TrainConfig(
        out_dir=str(out), loggers=["mlflow"], mlflow_tracking_uri=store, mlflow_experiment=experiment
    )
    for k, v in train.items():
        setattr(t, k, v)
    return Config(train=t)


def _picture() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)


def test_metric_names_are_what_mlflow_accepts() -> None:
    assert metric_key("val/iou/General trash") == "val/iou/General trash"
    assert metric_key("val/iou/Paper (wet)&dry") == "val/iou/Paper _wet__dry"
    assert metric_key("val/iou/..") == "val/iou/_" and metric_key("val/iou/") == "val/iou/_"


def test_reports_land_in_one_mlflow_run(tmp_path: Path, store: str) -> None:
    cfg = _cfg(tmp_path / "run", store, "lands")
    log = RunLog.start(cfg, MAIN, None, None)
    log.config(cfg, 0)
    for step in (1, 2, 3):
        log.scalars({"train/loss": 1.0 / step, "val/iou/Paper (wet)": 0.1 * step}, step)
    log.image("val/samples", _picture(), 3)
    log.final({"model": "fcn8s"}, {"miou": 0.3, "pixel_acc": 0.9}, 3)
    log.close()

    [run] = mlflow_runs(store, "lands")
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.tags[KEY_TAG] == log.run_key
    assert run.data.params == config_report(cfg).params
    history = mlflow_history(store, run.info.run_id)
    assert history["train/loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [s for s, _ in history["val/iou/Paper _wet_"]] == [1, 2, 3]
    assert history["final/miou"] == [(3, 0.3)] and history["final/pixel_acc"] == [(3, 0.9)]
    artifacts = mlflow_artifacts(store, run.info.run_id)
    assert "config.yaml" in artifacts
    [png] = [a for a in artifacts if a.startswith("images/val~samples+step+3+") and a.endswith(".png")]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    local = client.download_artifacts(run.info.run_id, png, str(tmp_path))
    assert np.array_equal(np.asarray(Image.open(local).convert("RGB")), _picture())  # PNG: lossless
    assert client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)).endswith("config.yaml")
    # artifacts of a new experiment on a local sqlite store sit beside the database, not in ./mlruns
    db_dir = Path(store.removeprefix("sqlite:///")).parent
    assert run.info.artifact_uri.startswith((db_dir / "mlartifacts" / "lands").as_uri())


def test_a_resume_continues_the_run_without_repeating_a_step(
    tmp_path: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first attempt logs steps 1..3 and is stopped (checkpoint at 2); the resume from step 2, in a fresh
    run directory (so nothing but MLflow knows what was logged), logs 3 and 4: MLflow keeps one point per
    step, the first attempt's at 3, and the run's params, noting the one the resume changed."""
    first = _cfg(tmp_path / "a", store, "resume", max_steps=3)
    log = RunLog.start(first, MAIN, None, None)
    log.config(first, 0)
    for step in (1, 2, 3):
        log.scalars({"train/loss": float(step)}, step)
    log.close("preempted")
    [run] = mlflow_runs(store, "resume")
    assert run.info.status == "KILLED"

    second = _cfg(tmp_path / "b", store, "resume", max_steps=4)
    log = RunLog.start(second, MAIN, 2, log.run_key)
    log.config(second, 2)
    for step in (3, 4):
        log.scalars({"train/loss": 100.0 + step}, step)
    log.final({}, {"miou": 0.5}, 4)
    log.close()
    [again] = mlflow_runs(store, "resume")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert mlflow_history(store, run.info.run_id)["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0)]
    assert again.data.params["train.max_steps"] == "3"
    assert {"config.yaml", "config-resumed-at-step-2.yaml"} <= set(mlflow_artifacts(store, run.info.run_id))
    out = capsys.readouterr().out
    assert f"run {run.info.run_id} already holds steps up to 3" in out
    assert "this attempt changed train.out_dir, train.max_steps" in out


def test_credentials_in_the_environment_uri_never_show(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """MLFLOW_TRACKING_URI with a user and password, at a loopback port where no server listens: the tracker
    cannot start, the run goes on, and neither the log nor MLflow's own output shows the password (it was
    moved into MLFLOW_TRACKING_USERNAME/PASSWORD before MLflow saw the URI)."""
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cret@127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    saved = {v: os.environ.pop(v, None) for v in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    try:
        cfg = Config(train=TrainConfig(out_dir=str(tmp_path / "run"), loggers=["mlflow"]))
        log = RunLog.start(cfg, MAIN, None, None)
        log.config(cfg, 0)
        log.scalars({"train/loss": 1.0}, 1)
        log.close()
        assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cret"
        assert os.environ["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{port}"
    finally:
        for var, value in saved.items():  # what the tracker set in this process's environment goes
            os.environ.pop(var, None)
            if value is not None:
                os.environ[var] = value
    out, err = capfd.readouterr()
    assert "s3cret" not in out + err
    assert (
        f"train.loggers: mlflow: cannot start (MlflowException: API request to http://127.0.0.1:{port}/"
        in err
    )
    assert err.endswith("train.loggers: mlflow: reports: 0 delivered, 0 failed, 2 dropped\n")


def test_the_uri_keeps_what_is_not_a_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None) is None
    assert tracking_uri("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"
    assert tracking_uri("https://mlflow.example:8443/base") == "https://mlflow.example:8443/base"
