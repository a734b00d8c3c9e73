import numpy as np
import pytest
import torch

from dist_seg.config.schema import Config
from dist_seg.train.tensorboard import (
    TAGS,
    TBLogger,
    TensorBoardTracker,
    expand_tags,
    read_images,
    read_scalars,
    read_tags,
)
from dist_seg.train.tracker_api import TrackedRun, TrackerSetup


def test_writes_every_kind_and_reads_back(tmp_path):
    with TBLogger(tmp_path, enabled=True) as tb:
        for step in (1, 2, 3):
            tb.scalars({"train/loss": 1.0 / step, "train/lr/encoder": torch.tensor(0.01)}, step)
        picture = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
        tb.image("val/samples", picture, step=3)
        tb.text("config", "train:\n  lr: 0.01", preformatted=True)
        tb.hparams({"optim": {"lr": 0.01, "name": "sgd"}, "groups": [1, 2]}, {"val/miou": 0.5}, step=3)
    scalars = read_scalars(tmp_path)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert scalars["train/loss"][1][1] == pytest.approx(0.5)
    assert scalars["train/lr/encoder"][0][1] == pytest.approx(0.01)
    assert scalars["hparam/val/miou"] == [(3, pytest.approx(0.5))]
    assert {"train/loss", "train/lr/encoder", "val/samples", "config"} <= read_tags(tmp_path)
    [(step, seen)] = read_images(tmp_path, "val/samples")
    assert step == 3 and np.array_equal(seen[..., :3], picture)  # PNG in the event file: lossless


def test_tracker_purges_what_the_interrupted_attempt_logged_past_the_checkpoint(tmp_path):
    """TensorBoardTracker under train.loggers: a resume from step 2 hides the first attempt's step 3."""
    cfg = Config()

    def attempt(resumed_step, steps, offset):
        tracker = TensorBoardTracker(TrackerSetup(cfg, tmp_path, "run", "key", resumed_step))
        assert tracker.open() == TrackedRun(None, 0, f"event files in {tmp_path / 'tb'}")
        for step in steps:
            tracker.scalars({"train/loss": offset + step}, step)
        tracker.final({"model": "fcn8s"}, {"miou": offset}, steps[-1])
        tracker.close("finished")

    attempt(None, [1, 2, 3], 0.0)
    attempt(2, [3, 4], 100.0)
    scalars = read_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(1, 1.0), (2, 2.0), (3, 103.0), (4, 104.0)]
    assert scalars["hparam/miou"] == [(4, 100.0)]  # the first attempt's, at step 3, is purged too


def test_disabled_logger_writes_nothing(tmp_path):
    tb = TBLogger(tmp_path / "tb", enabled=False)
    tb.scalars({"train/loss": 1.0}, 1)
    tb.text("config", "x")
    tb.close()
    assert not (tmp_path / "tb").exists()


def test_purge_step_hides_steps_of_the_crashed_run(tmp_path):
    with TBLogger(tmp_path, enabled=True) as tb:  # the run that crashes after step 8
        for step in range(1, 9):
            tb.scalars({"train/loss": float(step)}, step)
    # resumed from the checkpoint of step 5: the first step it logs is 6
    with TBLogger(tmp_path, enabled=True, purge_step=6) as tb:
        for step in range(6, 11):
            tb.scalars({"train/loss": 100.0 + step}, step)
    seen = read_scalars(tmp_path)["train/loss"]
    assert [s for s, _ in seen] == list(range(1, 11))
    assert dict(seen)[5] == 5.0 and dict(seen)[6] == 106.0
    raw = [s for s, _ in read_scalars(tmp_path, purge=False)["train/loss"]]
    assert len(raw) == 8 + 5  # the raw files still hold the crashed run's steps 6..8


def test_tag_catalogue_expands():
    tags = expand_tags(
        ["encoder", "decoder"], ["bg", "Paper"], ["train/gpu_mem_peak_gb"], ["encoder", "fc6", "decoder"]
    )
    assert {"train/lr/encoder", "train/lr/decoder", "val/iou/Paper", "val/miou", "config"} <= tags
    assert {"train/grad_norm/encoder", "train/grad_norm/fc6", "train/grad_norm/decoder"} <= tags
    assert "train/gpu_mem_peak_gb" not in tags and not any("<" in t for t in tags)
    assert len(tags) == len(TAGS) - 3 - 1 + 2 + 2 + 3


def test_reader_names_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="nothere"):
        read_scalars(tmp_path / "nothere")
