"""Learning guards: seeded CPU runs whose result is deterministic on this machine, asserted with a margin.

What they can and cannot catch, measured on the 2-core development machine: the CPU SyncBatchNorm once
computed its variance as E[x^2] - E[x]^2 from float32 sums, and the 600-step demo reached val mIoU 0.35
instead of 0.69. A shorter run does not show it: the demo recipe and data on a 300-step schedule scored
0.3453 with the fixed SyncBatchNorm and 0.4846 with the faulty one, because from-scratch DeconvNet runs of a
few hundred steps are chaotic (rounding-level differences move the result by more than the fault).
So the fault itself is guarded by the float32/bf16 numerics test in test_distributed.py (which fails on the
faulty code), and these runs guard learning as a whole with tasks that converge whatever the trajectory:
fitting a fixed set of images, on 2 ranks through SyncBatchNorm and for DeepLab v1 and FCN-8s.

Floors. A seeded result of a few hundred steps has no derivable tolerance: it depends chaotically on every
rounding, and another CPU rounds differently (other oneDNN/ATen kernels). What can be measured is how far
kernel changes move it, so each floor states its margin against that spread. The spread was measured on one
AMD EPYC (AVX-512) under three kernel variants -- the default kernels, oneDNN limited to AVX2
(ONEDNN_MAX_CPU_ISA=AVX2) and ATen's scalar kernels (ATEN_CPU_CAPABILITY=default) -- plus the value on the
development machine ("dev"). A floor sits at least 3x that spread below the lowest value, and well above what a
path that stops learning scores (0.12-0.35: see the notes at the end of the file), so that rounding cannot cross
it and a broken path cannot pass it. The runs are not lengthened to converge further: CI time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch_utils import REPO, torchrun

from dist_seg.data.prep.convert import ConvertOptions, convert
from dist_seg.data.prep.synth.dataset import generate


def _synth_shards(root: Path, images: int, val_images: int, seed: int) -> tuple[Path, Path]:
    generate(root / "synth", images=images, val_images=val_images, size=224, seed=seed)
    for split in ("train", "val"):
        if split == "val" and not val_images:
            continue
        convert(
            ConvertOptions(
                str(root / f"synth/{split}.json"),
                str(root / "synth/images"),
                str(root / f"shards/{split}"),
                min_shards=2,
                progress=False,
            )
        )
    return root / "shards/train", root / "shards/val"


@pytest.mark.slow
def test_two_process_syncbn_run_fits_its_training_images(tmp_path: Path) -> None:
    """A seeded 2-rank run through SyncBatchNorm (FCN-8s, 15 BatchNorms, 2 images per rank) fits 8 images,
    with the overrides typed as the README writes them (`train.amp=off`). Fitting a fixed set converges
    whatever the trajectory better than a short run of the demo recipe does (see the module docstring), but
    150 steps of FCN-8s still move with the kernels. Measured: 0.9297 (dev); not measured under the kernel
    variants (a 2-rank run), so GUARD_FLOOR takes the spread of the same model, steps and data in one process
    (test_every_vgg_model_overfits_eight_images: fcn8s 0.8875-0.9506, spread 0.063): 0.70 leaves 0.23, 3.6x
    that spread, below the measured value, and 0.35 above a path that stops learning."""
    train, _ = _synth_shards(tmp_path, images=8, val_images=0, seed=3)
    out = tmp_path / "run"
    args = [
        "--module", "dist_seg.train", "--config", str(REPO / "configs/demo.yaml"),
        f"data.train_shards={train}", f"data.val_shards={train}", f"train.out_dir={out}",
        "data.batch_size=2", "data.scale_min=1.0", "data.scale_max=1.0", "data.hflip_prob=0",
        "data.color_jitter=0", "loss.class_weights=null", "optim.weight_decay=0", "model.name=fcn8s",
        "model.aux_loss=0", "optim.lr=0.003",  # the demo recipe of the measurement below (before issue 27)
        "train.max_steps=150", "train.eval_every=150", "train.log_every=50", "train.amp=off", "train.sync_bn=true",
    ]  # fmt: skip
    r = torchrun(args, nproc=2, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 process(es) on cpu" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"val mIoU {metrics['miou']:.4f}")
    assert metrics["miou"] >= GUARD_FLOOR, metrics["iou"]


GUARD_FLOOR = 0.70  # was 0.85: 0.08 below the one value measured, about the fcn8s spread (0.063)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["deconvnet", "deeplab_v1", "fcn8s"])
def test_every_vgg_model_overfits_eight_images(model: str, tmp_path: Path) -> None:
    """The whole path learns for each VGG model: 8 synthetic images, no augmentation, evaluated on themselves,
    one process. Measured mIoU (deterministic on one machine; dev / EPYC default / EPYC oneDNN AVX2 / EPYC
    scalar ATen, see the module docstring): deconvnet 0.7831 / 0.7278 / 0.6232 / 0.7496, deeplab_v1 0.8747 /
    0.8645 / 0.8852 / 0.8834, fcn8s 0.9454 / 0.9367 / 0.9506 / 0.8875. The floors and their margins are in
    OVERFIT_FLOOR."""
    train, _ = _synth_shards(tmp_path, images=8, val_images=0, seed=3)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        env.pop(var, None)
    overrides = {
        "data.train_shards": train, "data.val_shards": train, "train.out_dir": tmp_path / "run",
        "model.name": model, "model.width_mult": 0.125, "data.crop_size": 224, "data.batch_size": BATCH[model],
        "data.scale_min": 1.0, "data.scale_max": 1.0, "data.hflip_prob": 0.0, "data.color_jitter": 0.0,
        "optim.name": "adamw", "optim.lr": 0.003, "optim.weight_decay": 0.0, "train.amp": "off",
        "train.max_steps": STEPS[model], "train.log_every": 50, "train.eval_every": STEPS[model],
        "data.num_workers": 1, **EXTRA.get(model, {}),
    }  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-m", "dist_seg.train", "--config", str(REPO / "configs/cpu_small.yaml"),
         *(f"{k}={v}" for k, v in overrides.items())],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    print(f"{model} overfit mIoU {metrics['miou']:.4f}")
    assert metrics["miou"] >= OVERFIT_FLOOR[model], metrics["iou"]


# DeconvNet needs the demo's recipe to fit the set: median-frequency class weights and a poly schedule over 300
# steps. Measured before this guard existed (same data, batch 4, the data order before windowed shuffling):
# with a constant LR and no class weights its eval-mode mIoU stayed at 0.12-0.13 after 150, 200 and 300
# steps although its training loss fell to 0.52 (pixel accuracy 0.77, mean class accuracy 0.20: nearly every
# pixel painted as the majority class once BatchNorm uses running statistics); poly without class weights:
# 0.13 at 200 steps; poly with class weights: 0.41 at 200 steps, 0.68 at 300.
BATCH = {"deconvnet": 4, "deeplab_v1": 4, "fcn8s": 4}
STEPS = {"deconvnet": 300, "deeplab_v1": 150, "fcn8s": 150}
EXTRA = {"deconvnet": {"loss.class_weights": "auto", "sched.name": "poly", "sched.warmup_steps": 20}}
# Floors against the spread over the kernel variants (module docstring; values in the test's docstring):
# - deeplab_v1: 0.8645-0.8852, spread 0.021: 0.80 leaves 0.065 (3.1x the spread) below the lowest value.
# - fcn8s: 0.8875-0.9506, spread 0.063: 0.70 (was 0.85, 0.038 below the scalar-ATen run) leaves 0.19 (3.0x).
# - deconvnet: 0.6232-0.7831, spread 0.16. NO floor satisfies both rules: 3x the spread below the lowest value
#   is 0.14, inside what a path that stops learning scores (0.12-0.35), and 0.6 is only 0.023 below the
#   oneDNN-AVX2 run, so rounding alone can fail this guard on another CPU. The floor stays at 0.6 until
#   DeconvNet's overfit run is rebuilt to converge (its fit is still climbing at 300 steps: 0.41 at 200, 0.68
#   at 300 in the notes above, so a floor on a plateau needs a longer or better-conditioned run).
OVERFIT_FLOOR = {"deconvnet": 0.6, "deeplab_v1": 0.8, "fcn8s": 0.7}
