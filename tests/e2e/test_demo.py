"""launch/demo.sh end to end at a tiny size, through the same script the README's Quick start runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from launch_utils import REPO, THIS_VENV, setup_used_this_venv

from dist_seg.checkpoint import load_checkpoint
from dist_seg.data.format.manifest import read_manifest


@pytest.mark.slow
def test_demo_script_runs_end_to_end(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DIST_SEG_VENV": THIS_VENV,  # this test's venv: set-up is a no-op
        "DEMO_DATA": str(tmp_path / "data"),
        "DEMO_RUN": str(tmp_path / "run"),
        "DEMO_IMAGES": "8",
        "DEMO_VAL_IMAGES": "4",
        "DEMO_SIZE": "224",
        "DEMO_NPROC": "2",
    }
    cmd = [
        "bash",
        str(REPO / "launch/demo.sh"),
        "train.max_steps=3",
        "train.eval_every=null",
        "train.log_every=1",
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert setup_used_this_venv(r.stdout), r.stdout[:500]  # not a copy installed elsewhere
    assert "final val mIoU" in r.stdout and "Plastic bag" in r.stdout
    assert f"tensorboard --logdir {tmp_path / 'run'}" in r.stdout
    synth = tmp_path / "data" / "synth-8-4-224"
    assert read_manifest(synth / "shards/train")["total_samples"] == 8
    assert read_manifest(synth / "shards/val")["total_samples"] == 4
    assert load_checkpoint(tmp_path / "run" / "last.pt")["train_state"]["step"] == 3
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    # a second run reuses the data and the shards
    r2 = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0 and "reusing the synthetic dataset" in r2.stdout
    assert r2.stdout.count("reusing shards") == 2
