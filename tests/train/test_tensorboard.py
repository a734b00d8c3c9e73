import pytest
import torch

from dist_seg.train.tensorboard import TAGS, TBLogger, expand_tags, read_images, read_scalars, read_tags
from dist_seg.viz import class_palette


def test_writes_every_kind_and_reads_back(tmp_path):
    names = ["bg", "General trash", "Paper"]
    with TBLogger(tmp_path, enabled=True) as tb:
        for step in (1, 2, 3):
            tb.scalars({"train/loss": 1.0 / step, "train/lr/encoder": torch.tensor(0.01)}, step)
        images = torch.rand(2, 3, 8, 10)
        targets = torch.randint(0, 3, (2, 8, 10))
        targets[:, 0] = 255
        tb.image_triplets(images, targets, targets.clone(), class_palette(3), step=3)
        tb.confusion(torch.tensor([[4, 1, 0], [0, 3, 0], [1, 0, 2]]), names, step=3)
        tb.text("config", "train:\n  lr: 0.01", preformatted=True)
        tb.hparams({"optim": {"lr": 0.01, "name": "sgd"}, "groups": [1, 2]}, {"val/miou": 0.5}, step=3)
    scalars = read_scalars(tmp_path)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert scalars["train/loss"][1][1] == pytest.approx(0.5)
    assert scalars["train/lr/encoder"][0][1] == pytest.approx(0.01)
    assert scalars["hparam/val/miou"] == [(3, pytest.approx(0.5))]
    tags = read_tags(tmp_path)
    assert {"train/loss", "train/lr/encoder", "val/samples", "val/confusion", "config"} <= tags
    [(step, grid)] = read_images(tmp_path, "val/samples")
    assert step == 3 and grid.shape[:2] == (2 * 8 + 4, 3 * 10 + 8)
    # first row of the ground-truth panel is ignore (255): white
    assert (grid[0, 14, :3] == 255).all()


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
    tags = expand_tags(["encoder", "decoder"], ["bg", "Paper"], exclude=["train/gpu_mem_peak_gb"])
    assert {"train/lr/encoder", "train/lr/decoder", "val/iou/Paper", "val/miou", "config"} <= tags
    assert "train/gpu_mem_peak_gb" not in tags and not any("<" in t for t in tags)
    assert len(tags) == len(TAGS) - 2 - 1 + 4


def test_reader_names_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="nothere"):
        read_scalars(tmp_path / "nothere")
