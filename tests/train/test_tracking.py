"""dist_seg.train.tracking: one reporting path to every tracker of train.loggers, the trackers named (the
preflight refuses a missing extra, a tracker that does not import, credentials in the tracking URI), and a
training run next to trackers that raise, hang or cannot open (test_tracker_thread.py has the thread's rules).
The trackers that misbehave are test classes named in train.loggers like any tracker of your own
(tests/trackers_for_tests.py); the real MLflow and W&B are tested in test_mlflow_tracker.py and
test_wandb_tracker.py."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import trackers_for_tests as tt

from dist_seg.config.schema import Config, DataConfig, TrainConfig
from dist_seg.runtime.distributed import World
from dist_seg.train.preflight import PreflightError, check_loggers, check_tracking_uri
from dist_seg.train.tracking import RunLog, config_report, tracker_class

MAIN = World(0, 0, 1, torch.device("cpu"), None)


@pytest.fixture(autouse=True)
def fresh_trackers() -> Iterator[None]:
    """Each test starts with no test trackers made and nothing stuck; a hanging tracker is let go after."""
    tt.CREATED.clear()
    tt.STUCK.clear()
    tt.RELEASE.clear()
    yield
    tt.RELEASE.set()


def _cfg(tmp_path: Path, *loggers: str, timeout_s: float = 30.0) -> Config:
    return Config(
        train=TrainConfig(out_dir=str(tmp_path / "run"), loggers=list(loggers), logger_timeout_s=timeout_s)
    )


def test_every_tracker_gets_the_same_reports_in_order(tmp_path: Path) -> None:
    log = RunLog.start(
        _cfg(tmp_path, "trackers_for_tests:RecordingTracker", "trackers_for_tests:RaisingTracker"),
        MAIN,
        None,
        None,
    )
    picture = np.zeros((4, 6, 3), np.uint8)
    log.config(_cfg(tmp_path), 0)
    for step in (1, 2):
        log.scalars({"train/loss": torch.tensor(0.5 * step), "val/iou/cat": 0.25}, step)
    log.image("val/samples", picture, 2)
    log.final({"model": "fcn8s"}, {"miou": 0.25}, 2)
    log.close()
    quiet, raising = tt.CREATED
    assert quiet.reports["scalars"] == [
        ({"train/loss": 0.5, "val/iou/cat": 0.25}, 1),
        ({"train/loss": 1.0, "val/iou/cat": 0.25}, 2),
    ]
    assert type(quiet.reports["scalars"][0][0]["train/loss"]) is float  # tensors are read once, on rank 0
    assert [r[0] for r in quiet.reports["image"]] == ["val/samples"] and quiet.reports["image"][0][
        1
    ] is picture
    assert quiet.reports["final"] == [({"model": "fcn8s"}, {"miou": 0.25}, 2)]
    assert quiet.reports["close"] == [("finished",)]
    for kind in ("config", "image", "final", "close"):  # the raising tracker still got everything else
        assert raising.reports[kind] == quiet.reports[kind], kind


def test_ranks_other_than_0_track_nothing(tmp_path: Path) -> None:
    log = RunLog.start(
        _cfg(tmp_path, "tensorboard", "trackers_for_tests:RecordingTracker"),
        World(1, 1, 2, torch.device("cpu"), None),
        None,
        None,
    )
    log.config(_cfg(tmp_path), 0)
    log.scalars({"train/loss": 1.0}, 1)
    log.close()
    assert log.threads == [] and log.run_key is None and tt.CREATED == []
    assert not (tmp_path / "run").exists()


def test_the_config_report_is_redacted_and_flat(tmp_path: Path) -> None:
    cfg = Config(
        data=DataConfig(train_shards="https://data.example/train?token=abc"),
        train=TrainConfig(loggers=["tensorboard", "mlflow"]),
    )
    report = config_report(cfg)
    assert (
        "abc" not in report.yaml and "abc" not in json.dumps(report.tree) and "abc" not in str(report.params)
    )
    assert report.params["train.loggers"] == '["tensorboard", "mlflow"]'
    assert report.params["data.batch_size"] == "8" and report.params["model.pretrained"] == "null"
    assert report.params["optim.name"] == "sgd" and report.tree["optim"]["name"] == "sgd"
    assert set(report.params) == {f"{s}.{k}" for s, keys in report.tree.items() for k in keys}


# ------------------------------------------------------------------------------ naming trackers: the preflight
def test_a_missing_extra_is_named_before_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # Python's way of making an import fail: not installed
    with pytest.raises(ImportError, match=r"pip install -e \.\[mlflow\]"):
        tracker_class("mlflow")
    with pytest.raises(PreflightError) as e:
        check_loggers(["tensorboard", "mlflow"])
    assert str(e.value) == (
        "train.loggers=[tensorboard,mlflow]: mlflow is not installed: pip install -e .[mlflow] (or pip install "
        "mlflow)"
    )


def test_a_missing_extra_stops_the_command_before_the_rendezvous(
    tiny_shards, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from launch_utils import REPO

    from dist_seg.train import command

    def no_rendezvous(*args: object) -> None:
        raise AssertionError("init_distributed called after a user error")

    monkeypatch.setattr(command.D, "init_distributed", no_rendezvous)
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = [
        "--config",
        str(REPO / "configs/cpu_small.yaml"),
        f"data.train_shards={tiny_shards['train4']}",
        "train.loggers=[tensorboard,wandb]",
        "train.mlflow_tracking_uri=https://alice:s3cret@mlflow.example",
    ]
    assert command.main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        "dist_seg.train: error: train.loggers=[tensorboard,wandb]: wandb is not installed: pip install -e "
        ".[wandb] (or pip install wandb)",
        "dist_seg.train: error: train.mlflow_tracking_uri=https://mlflow.example: carries credentials; give "
        "them in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), or the "
        "whole URI in MLFLOW_TRACKING_URI, which is never written",
    ]


def test_a_tracker_of_your_own_must_import() -> None:
    check_loggers(["tensorboard", "trackers_for_tests:RaisingTracker"])
    with pytest.raises(PreflightError) as e:
        check_loggers(["nosuch.module:T", "trackers_for_tests:Nothing"])
    assert str(e.value) == (
        "train.loggers=[nosuch.module:T,trackers_for_tests:Nothing]: nosuch.module:T: ModuleNotFoundError: No "
        "module named 'nosuch'; trackers_for_tests:Nothing: ValueError: module trackers_for_tests has no class "
        "Nothing"
    )


def test_credentials_in_the_tracking_uri_key_are_refused_unshown() -> None:
    check_tracking_uri("http://mlflow.example:5000")
    check_tracking_uri("sqlite:////tmp/mlflow.db")
    with pytest.raises(PreflightError) as e:
        check_tracking_uri("https://alice:s3cret@mlflow.example")
    assert "s3cret" not in str(e.value) and "MLFLOW_TRACKING_PASSWORD" in str(e.value)
    assert str(e.value).startswith("train.mlflow_tracking_uri=https://mlflow.example: carries credentials")


def test_logger_names_are_checked_with_the_config() -> None:
    from dist_seg.config.loading import load_config

    with pytest.raises(ValueError, match=r"train.loggers=\['tensorboard', 'mlflw'\]: 'mlflw' is neither"):
        load_config(None, ["train.loggers=[tensorboard,mlflw]"])
    with pytest.raises(ValueError, match="named twice"):
        load_config(None, ["train.loggers=[wandb,wandb]"])
    assert load_config(None, ["train.loggers=[tensorboard,mlflow,wandb]"]).train.loggers == [
        "tensorboard",
        "mlflow",
        "wandb",
    ]


# ------------------------------------------------------------------------------------------- through fit()
def test_a_run_with_trackers_that_raise_hang_or_cannot_open_trains_and_reports_the_same_to_the_rest(
    tiny_shards, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through fit(), with loader workers: next to TensorBoard, a tracker that raises at every scalars
    report, one that hangs at its first and one that cannot open. Training runs to its end, the good
    trackers (TensorBoard and a recording one) got the same scalars and images, each bad tracker is said
    once and counted, and the checkpoint keeps the run key."""
    from launch_utils import REPO

    from dist_seg.checkpoint import load_checkpoint
    from dist_seg.config.loading import load_config
    from dist_seg.train.loop import fit
    from dist_seg.train.tensorboard import read_images, read_scalars

    out = tmp_path / "run"
    loggers = ["tensorboard", "RecordingTracker", "RaisingTracker", "HangingTracker", "UnopenableTracker"]
    overrides = [
        f"data.train_shards={tiny_shards['train4']}",
        f"data.val_shards={tiny_shards['eval1']}",
        f"train.out_dir={out}",
        "model.name=fcn8s",
        "data.crop_size=32",
        "data.num_workers=1",
        "train.max_steps=4",
        "train.eval_every=2",
        "train.log_every=1",
        f"train.loggers=[{','.join(n if n == 'tensorboard' else f'trackers_for_tests:{n}' for n in loggers)}]",
        "train.logger_timeout_s=2",
    ]
    metrics = fit(load_config(REPO / "configs/cpu_small.yaml", overrides), MAIN)
    assert 0.0 <= metrics["miou"] <= 1.0
    err = capsys.readouterr().err
    for name in ("RaisingTracker", "HangingTracker", "UnopenableTracker"):
        said = [
            line
            for line in err.splitlines()
            if line.startswith(f"train.loggers: trackers_for_tests:{name}: ")
        ]
        assert len(said) == 2, said
    assert tt.STUCK.is_set()
    tb = read_scalars(out / "tb")
    quiet = next(t for t in tt.CREATED if type(t) is tt.RecordingTracker)
    seen: dict[str, list[tuple[int, float]]] = {}
    for values, step in quiet.reports["scalars"]:
        for tag, value in values.items():
            seen.setdefault(tag, []).append((step, value))
    assert seen.keys() == tb.keys() - {
        "hparam/miou",
        "hparam/pixel_acc",
        "hparam/mean_acc",
        "hparam/image_miou",
    }
    for tag, points in seen.items():  # TensorBoard stores float32
        assert [s for s, _ in tb[tag]] == [s for s, _ in points] and np.allclose(
            [v for _, v in tb[tag]], [v for _, v in points], rtol=6e-8, atol=0
        ), tag
    assert [s for s, _ in tb["train/loss"]] == [1, 2, 3, 4]
    for tag in ("val/samples", "val/confusion"):
        mine = [(step, image) for t, image, step in quiet.reports["image"] if t == tag]
        theirs = read_images(out / "tb", tag)
        assert [s for s, _ in mine] == [s for s, _ in theirs] == [2, 4]
        assert all(np.array_equal(a, b[..., :3]) for (_, a), (_, b) in zip(mine, theirs, strict=True))
    assert quiet.reports["final"][0][1] == {
        k: pytest.approx(metrics[k]) for k in ("miou", "pixel_acc", "mean_acc", "image_miou")
    }
    assert quiet.reports["close"] == [("finished",)]
    ck = load_checkpoint(out / "last.pt")
    assert ck["run_key"] == quiet.setup.run_key and ck["train_state"]["step"] == 4


def test_the_trackers_built_by_name_are_the_names_the_config_accepts() -> None:
    """config.validation accepts train.loggers names before any process starts; tracking builds them. The
    config layer cannot import train, so this keeps the two lists one."""
    from dist_seg.config.validation import BUILTIN_LOGGERS
    from dist_seg.train.tracking import BUILTIN

    assert tuple(BUILTIN) == BUILTIN_LOGGERS
