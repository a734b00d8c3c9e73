"""dist_seg.train.reporting helpers that do not need a training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trackers_for_tests as tt

from dist_seg.config.schema import Config, TrainConfig
from dist_seg.runtime.distributed import World
from dist_seg.train.reporting import hms, report_eval, report_final, sample_triplets, trim_history
from dist_seg.train.tracking import RunLog


def test_trim_history_drops_entries_after_the_resumed_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics_history.jsonl"
    path.write_text("".join(json.dumps({"step": s, "miou": s / 10}) + "\n" for s in (2, 4, 6)))
    trim_history(tmp_path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
    trim_history(tmp_path / "absent", 4)  # no history yet: nothing to do


def test_hms() -> None:
    assert hms(3725.9) == "1:02:05" and hms(0) == "0:00:00"


def _metrics(miou: float, weights: str) -> dict:
    return {
        "miou": miou,
        "pixel_acc": 0.9,
        "mean_acc": 0.6,
        "image_miou": 0.4,
        "iou": [0.8, float("nan"), 0.2],
        "weights": weights,
    }


def test_evaluations_reach_the_trackers_and_the_run_directory(tmp_path: Path) -> None:
    """The trained weights' evaluation and the EMA's (the primary one): scalars under val/ and val_ema/, a
    class never seen (NaN IoU) left out, the pictures and metrics.json for the primary only, both in the
    history; the final summary."""
    tt.CREATED.clear()
    cfg = Config(train=TrainConfig(out_dir=str(tmp_path), loggers=["trackers_for_tests:RecordingTracker"]))
    log = RunLog.start(cfg, World(0, 0, 1, torch.device("cpu"), None), None, None)
    names = ["background", "cat", "dog"]
    image = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    truth = torch.tensor([[0, 1, 2, 255, 0]] * 4, dtype=torch.uint8)
    kept = [
        (image, truth, truth.long()),
        (image[:, :2], truth[:2], truth[:2].long()),
    ]  # the 2nd: another size
    matrix = np.array([[5, 0, 1], [0, 0, 0], [1, 0, 2]])
    report_eval(cfg, log, 6, _metrics(0.5, "model"), matrix, kept, names, 3, primary=False)
    report_eval(cfg, log, 6, _metrics(0.55, "ema"), matrix, kept, names, 3, primary=True)
    report_final(cfg, log, 2, {**_metrics(0.55, "ema"), "iou_by_class": {}}, 6)
    log.close()
    [tracker] = tt.CREATED
    scalars = {
        tag: (value, step) for values, step in tracker.reports["scalars"] for tag, value in values.items()
    }
    assert scalars["val/miou"] == (0.5, 6) and scalars["val_ema/miou"] == (0.55, 6)
    assert {"val/iou/background", "val/iou/dog", "val_ema/iou/dog"} <= scalars.keys()
    assert "val/iou/cat" not in scalars and "val_ema/iou/cat" not in scalars
    pictures = {tag: (picture, step) for tag, picture, step in tracker.reports["image"]}
    assert pictures.keys() == {"val/samples", "val/confusion"}
    samples, step = pictures["val/samples"]
    assert step == 6 and samples.shape == (4, 3 * 5 + 2 * 4, 3)  # one row: the sample of the first's size
    assert np.array_equal(samples[:, :5], image.permute(1, 2, 0).numpy())  # the input panel, as read
    assert pictures["val/confusion"][0].dtype == np.uint8 and pictures["val/confusion"][0].ndim == 3
    [(settings, final, step)] = tracker.reports["final"]
    assert final == {"miou": 0.55, "pixel_acc": 0.9, "mean_acc": 0.6, "image_miou": 0.4} and step == 6
    assert settings["world_size"] == 2
    assert json.loads((tmp_path / "metrics.json").read_text())["miou"] == 0.55
    history = [json.loads(line) for line in (tmp_path / "metrics_history.jsonl").read_text().splitlines()]
    assert [(h["step"], h["weights"]) for h in history] == [(6, "model"), (6, "ema")]


def test_sample_triplets_paint_truth_and_prediction_with_the_class_palette() -> None:
    from dist_seg.viz import class_palette

    image = torch.zeros((3, 2, 3), dtype=torch.uint8)
    truth = torch.tensor([[0, 1, 255], [1, 0, 0]], dtype=torch.uint8)
    pred = torch.tensor([[1, 1, 0], [0, 0, 1]])
    grid = sample_triplets([(image, truth, pred)], 2)
    palette = class_palette(2)
    assert np.array_equal(grid[0, 3 + 4 + 1], palette[1]) and np.array_equal(
        grid[1, 2 * (3 + 4) + 2], palette[1]
    )
    assert (grid[0, 3 + 4 + 2] == 255).all()  # ignore is white
    with pytest.raises(ValueError, match="uint8"):
        sample_triplets([(image.float(), truth, pred)], 2)
