"""train.loggers `wandb` with the real W&B in offline mode (WANDB_MODE=offline): what lands where in the run
file W&B writes (read back through W&B's own record protobuf), and a resume that continues the same W&B run
without repeating a step."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from trackers_for_tests import wandb_attempts

from dist_seg.config.schema import Config, TrainConfig
from dist_seg.runtime.distributed import World
from dist_seg.runtime.preemption import PREEMPTED_EXIT_CODE
from dist_seg.train.tracking import RunLog

pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install -e .[wandb])")

MAIN = World(0, 0, 1, torch.device("cpu"), None)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _cfg(out: Path) -> Config:
    return Config(train=TrainConfig(out_dir=str(out), loggers=["wandb"], wandb_project="tests"))


def test_reports_land_in_one_wandb_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    picture = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    log = RunLog.start(_cfg(out), MAIN, None, None)
    log.config(_cfg(out), 0)
    for step in (1, 2, 3):
        log.scalars({"train/loss": 1.0 / step, "val/iou/Paper (wet)": 0.1 * step}, step)
    log.image("val/samples", picture, 3)
    log.final({"model": "fcn8s"}, {"miou": 0.3, "pixel_acc": 0.9}, 3)
    log.close()

    [run] = wandb_attempts(out)
    assert run["run_id"] == log.run_key and run["exit_code"] == 0
    assert run["config"]["train"]["loggers"] == ["wandb"] and run["config"]["data"]["batch_size"] == 8
    assert run["history"]["train/loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [s for s, _ in run["history"]["val/iou/Paper (wet)"]] == [1, 2, 3]
    [(step, path)] = run["history"]["val/samples/path"]
    assert step == 3
    assert np.array_equal(np.asarray(Image.open(run["run_dir"] / "files" / path).convert("RGB")), picture)
    assert run["summary"]["final/miou"] == 0.3 and run["summary"]["final/pixel_acc"] == 0.9


def test_a_resume_continues_the_run_without_repeating_a_step(tmp_path: Path) -> None:
    """The first attempt logs steps 1..3 and is stopped (checkpoint at 2); the resume from step 2 in the
    same run directory logs 3 and 4. Offline, W&B knows nothing of the first attempt: the run directory's
    trackers.json does, so the resumed attempt writes step 4 only, to the same W&B run."""
    out = tmp_path / "run"
    log = RunLog.start(_cfg(out), MAIN, None, None)
    log.config(_cfg(out), 0)
    for step in (1, 2, 3):
        log.scalars({"train/loss": float(step)}, step)
    log.close("preempted")
    # W&B names an offline run's directory by the second it started: a real resume is seconds later
    started = int(time.time())
    while int(time.time()) == started:
        time.sleep(0.05)
    resumed = RunLog.start(_cfg(out), MAIN, 2, log.run_key)
    resumed.config(_cfg(out), 2)
    for step in (3, 4):
        resumed.scalars({"train/loss": 100.0 + step}, step)
    resumed.close()

    first, second = wandb_attempts(out)
    assert first["run_id"] == second["run_id"] == log.run_key
    assert first["exit_code"] == PREEMPTED_EXIT_CODE and second["exit_code"] == 0
    assert first["history"]["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert second["history"]["train/loss"] == [(4, 104.0)]
