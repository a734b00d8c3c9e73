"""Learning guards: seeded CPU runs whose result is deterministic on one machine, asserted with a margin.

- test_the_demo_trains_deconvnet_to_its_floor: the mission's model, through `launch/demo.sh` as users run it
  (2 gloo ranks, SyncBatchNorm, float32, loader workers). It fails when DeconvNet stops learning reliably
  (the auxiliary head removed: 0.56 against a floor of 0.79; issue 27).
- test_vgg_models_overfit_eight_images: DeepLab v1 and FCN-8s fit 8 images in one process.

What no learning run can catch: the CPU SyncBatchNorm once computed its variance as E[x^2] - E[x]^2 from
float32 sums. That form loses eps * mean^2/var of the variance, and on this model's own inputs mean^2/var
stays at or below ~10^3 (fc6/fc7, 8 values per channel; every other BatchNorm ~12): the fault changes two
layers' scale by at most 1.4e-5 (117 float32 ulp), a rounding-level change like a CPU's kernels make
everywhere (benchmarks/bn_conditioning.py; benchmarks/RESULTS.md, "The learning guard"). The demo scores
0.8816 with it, inside the recipe's kernel-and-seed spread; before the auxiliary head, when any rounding
change moved the demo between 0.33 and 0.74, it happened to land on 0.35. The fault is guarded by the
float32/bf16 numerics test in tests/runtime/test_distributed.py, on the inputs where it is catastrophic
(mean/std 1000), which fails on it (output error 95-155x its bound on a 1x1 map).

Floors. A seeded result of a few hundred steps has no derivable tolerance: it depends on every rounding, and
another CPU rounds differently (other oneDNN/ATen kernels). What can be measured is how far kernel changes move
it, so each floor states its margin against that spread. The spread was measured on one AMD EPYC (AVX-512)
under three kernel variants -- the default kernels, oneDNN limited to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2) and
ATen's scalar kernels (ATEN_CPU_CAPABILITY=default) -- plus, for the overfits, the value on the development
machine ("dev"), and for the demo, other seeds. A floor sits at least 3x that spread below the lowest value,
and well above what the fault it guards scores, so that rounding cannot cross it and a broken path cannot
pass it. A run whose result moves with the kernels by as much as a fault moves it guards nothing: the demo
cut to 300 steps scored 0.70 and 0.59 under two kernel variants, and 0.62 without the auxiliary head.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch_utils import REPO, THIS_VENV, setup_used_this_venv

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
def test_the_demo_trains_deconvnet_to_its_floor(tmp_path: Path) -> None:
    """The mission's model learns: `launch/demo.sh` exactly as the README's Quick start runs it (no overrides:
    configs/demo.yaml's width-0.125 DeconvNet with the auxiliary head, AdamW lr 0.006, ce+dice with class
    weights, 600 steps, 2 gloo ranks through SyncBatchNorm in float32, one loader worker per rank), on the
    synthetic data and shards the script makes itself. The figures, the floor and what it catches are in
    DEMO_FLOOR below; about 6 minutes on 2 cores."""
    env = {
        **os.environ,
        # this test's venv: the script's set-up is a no-op
        "DIST_SEG_VENV": THIS_VENV,
        "DEMO_DATA": str(tmp_path / "data"),
        "DEMO_RUN": str(tmp_path / "run"),
        "DEMO_NPROC": "2",  # the CPU shape the floor was measured in, also on a machine with GPUs
    }
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"):
        env.pop(var, None)  # launch/demo.sh picks the threads per process as it does for a user
    cmd = ["bash", str(REPO / "launch/demo.sh")]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert setup_used_this_venv(r.stdout), r.stdout[:500]  # not a copy installed elsewhere
    assert "training on 2 processes" in r.stdout
    assert "decoder, classifier, aux" in r.stdout  # the optimizer's table: the auxiliary head trains
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    print(f"launch/demo.sh: final val mIoU {metrics['miou']:.4f}")
    assert metrics["miou"] >= DEMO_FLOOR, metrics["iou"]


# Measured with launch/demo.sh as above at 3e9729b on a 2-core AMD EPYC (AVX-512), seed 0 unless named:
# - the recipe, under the kernel variants of the module docstring: 0.8936 (default kernels), 0.8849 (oneDNN
#   limited to AVX2), 0.8693 (ATen's scalar kernels); with `train.seed=1` 0.8883, `train.seed=2` 0.8762.
#   Lowest 0.8693, spread over the five 0.024.
# - the fix removed (`model.aux_loss=0`, the issue-27 stall): 0.5574 (0.3809 under oneDNN AVX2).
# 0.79 sits 0.079 (3.2x the spread) below the lowest value and 0.23 above the higher fault value (the
# issue's bar for the recipe, 0.80, would leave 2.8x). The one-pass float32 SyncBN variance put back gives
# 0.8816, inside that spread: on this model's inputs the fault is a rounding-level change (module docstring),
# so it is guarded by the float32/bf16 numerics test in tests/runtime/test_distributed.py (which fails on
# it), not here. At 300 steps (half the schedule) no floor separated recipe from fault: 0.7034 default, 0.5928 oneDNN
# AVX2, 0.6190 without the head.
DEMO_FLOOR = 0.79


@pytest.mark.slow
@pytest.mark.parametrize("model", ["deeplab_v1", "fcn8s"])
def test_vgg_models_overfit_eight_images(model: str, tmp_path: Path) -> None:
    """The whole path learns for DeepLab v1 and FCN-8s: 8 synthetic images, no augmentation, evaluated on
    themselves, one process. Measured mIoU (deterministic on one machine; dev / EPYC default / EPYC oneDNN AVX2 /
    EPYC scalar ATen, see the module docstring): deeplab_v1 0.8747 / 0.8645 / 0.8852 / 0.8834, fcn8s 0.9454 /
    0.9367 / 0.9506 / 0.8875. The floors and their margins are in OVERFIT_FLOOR. DeconvNet is guarded by
    test_the_demo_trains_deconvnet_to_its_floor instead (see the notes below OVERFIT_FLOOR)."""
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


BATCH = {"deeplab_v1": 4, "fcn8s": 4}
STEPS = {"deeplab_v1": 150, "fcn8s": 150}
EXTRA: dict[str, dict[str, object]] = {}
# Floors against the spread over the kernel variants (module docstring; values in the test's docstring):
# - deeplab_v1: 0.8645-0.8852, spread 0.021: 0.80 leaves 0.065 (3.1x the spread) below the lowest value.
# - fcn8s: 0.8875-0.9506, spread 0.063: 0.70 (was 0.85, 0.038 below the scalar-ATen run) leaves 0.19 (3.0x).
OVERFIT_FLOOR = {"deeplab_v1": 0.8, "fcn8s": 0.7}
# DeconvNet was a third case here until issue 27 (300 steps, class weights, poly): 0.7831 (dev) / 0.7278 /
# 0.6232 / 0.7496 under the kernel variants, a spread of 0.16, so no floor had both margins (3x the spread
# below the lowest value is 0.14, inside what a path that stops learning scores, 0.12-0.35), and its floor of
# 0.6 sat 0.023 below the oneDNN-AVX2 run. Measured before that guard (same data, batch 4): with a constant LR
# and no class weights its eval-mode mIoU stayed at 0.12-0.13 although its training loss fell to 0.52 (nearly
# every pixel painted as the majority class once BatchNorm uses running statistics); poly without class
# weights: 0.13 at 200 steps; poly with class weights: 0.41 at 200 steps, 0.68 at 300.
