"""The trainer end to end: real torchrun runs on CPU (gloo), DDP equivalence, exact resume, config errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch_utils import REPO, THIS_VENV, free_port, setup_used_this_venv, torchrun

from dist_seg.checkpoint import load_checkpoint
from dist_seg.config.schema import ModelConfig
from dist_seg.models import build_model
from dist_seg.train.tensorboard import expand_tags, read_scalars, read_tags

TRAIN = ["-m", "dist_seg.train", "--config", str(REPO / "configs/cpu_small.yaml")]


def _overrides(train: Path, val: Path, out: Path, **kw: object) -> list[str]:
    base = {"data.train_shards": train, "data.val_shards": val, "train.out_dir": out}
    return [f"{k}={v}" for k, v in {**base, **kw}.items()]


@pytest.mark.slow
def test_two_process_run_learns_logs_and_checkpoints(trash_shards, tmp_path: Path) -> None:
    train, val = trash_shards
    out = tmp_path / "run"
    overrides = _overrides(
        train,
        val,
        out,
        **{"train.max_steps": 24, "train.log_every": 1, "train.eval_every": 12, "data.num_workers": 1},
    )
    r = torchrun(["--module", *TRAIN[1:], *overrides], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "final val mIoU" in r.stdout
    losses = [v for _, v in read_scalars(out / "tb")["train/loss"]]
    assert len(losses) == 24
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    ck = load_checkpoint(out / "last.pt")
    assert ck["train_state"]["step"] == 24 and len(ck["rng"]) == 2
    load_checkpoint(out / "best.pt")
    groups = [g["name"] for g in ck["optimizer"]["param_groups"]]
    names = ck["class_names"]
    blocks = ["encoder", "fc6", "fc7", "decoder", "classifier"]  # the VGG models' top-level blocks
    assert blocks == list(dict.fromkeys(k.split(".")[0] for k in ck["model"]))
    want = expand_tags(groups, [], {"train/gpu_mem_peak_gb", "val/iou/<class name>"}, blocks)
    tags = read_tags(out / "tb")
    assert want <= tags, want - tags
    assert any(t.startswith("val/iou/") and t[8:] in names for t in tags)
    assert (out / "config.yaml").is_file() and (out / "metrics.json").is_file()


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_rank_with_double_batch(tmp_path: Path) -> None:
    """One SGD step (the worker's EQ_STEPS, see its docstring) in float64 on 2 ranks x 2 images (SyncBN, DDP)
    equals one process x 4 images. The two runs do the same math in different orders, so they differ by
    float64 rounding (u = 1.1e-16) amplified by the step's conditioning: measured 5.3e-4 of the tolerance
    on one AMD EPYC. rtol 1e-7 is float32's rounding (6e-8) with a margin: a float32
    operation leaking into the step, or a math difference between the paths (a missing all-reduce, a
    per-rank BatchNorm statistic, a wrong gradient average), is amplified by the same conditioning and
    moves the weights by far more. After 3 steps the amplified float64 rounding alone reached 0.66 of this
    tolerance (it grows 16-77x a step), which is why the worker runs one."""
    worker = str(REPO / "tests/workers/ddp_equiv_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        env.pop(var, None)
    one = subprocess.run(
        [sys.executable, worker, str(tmp_path / "one.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([worker, str(tmp_path / "two.pt")], timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-7, atol=1e-8, msg=lambda m, k=k: f"{k}: {m}")
    # the comparison means something only if training moved the weights away from their shared init
    torch.manual_seed(0)
    init = build_model(ModelConfig(name="deconvnet", width_mult=0.0625), 4).state_dict()
    assert not torch.allclose(init["classifier.weight"].double(), a["classifier.weight"].double(), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model",
    # fcn8s has dropout: the RNG must resume exactly too; and its weight EMA must resume exactly
    [{}, {"model.name": "fcn8s", "data.crop_size": 64, "train.ema_decay": 0.9}],
    ids=["deconvnet", "fcn8s-dropout"],
)
def test_resume_after_kill_equals_uninterrupted_run(model: dict, trash_shards, tmp_path: Path) -> None:
    train, val = trash_shards
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        env.pop(var, None)

    def run(out: Path, **extra_env: str) -> subprocess.CompletedProcess:
        args = [
            sys.executable,
            *TRAIN,
            *_overrides(
                train,
                "null",
                out,
                **{"train.max_steps": 8, "train.save_every": 4, "train.log_every": 1, "data.num_workers": 1},
                **model,
            ),
        ]
        return subprocess.run(args, env={**env, **extra_env}, capture_output=True, text=True, timeout=300)

    straight = run(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run(tmp_path / "resumed", DIST_SEG_FAULT_KILL_AT_STEP="6")
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = run(tmp_path / "resumed")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    a = read_scalars(tmp_path / "straight" / "tb")["train/loss"]
    b = read_scalars(tmp_path / "resumed" / "tb")["train/loss"]
    assert [s for s, _ in b] == list(range(1, 9))  # no gap, no duplicate
    # Bitwise, by construction: the resumed run restores the weights, optimizer, RNG and data order exactly,
    # and both runs compute the same ops on the same bits with the same kernels, thread count
    # (OMP_NUM_THREADS=2) and buffer alignment (torch allocates 64-byte aligned) on one machine. Any
    # difference is a resume bug, however small (measured: equal).
    for (s1, v1), (s2, v2) in zip(a, b, strict=True):
        assert s1 == s2 and v1 == v2, (s1, v1, v2)
    ca, cb = (
        load_checkpoint(tmp_path / "straight" / "last.pt"),
        load_checkpoint(tmp_path / "resumed" / "last.pt"),
    )
    pairs = [(ca["model"], cb["model"])]
    if "train.ema_decay" in model:
        assert ca["ema"]["updates"] == cb["ema"]["updates"] == 8
        pairs.append((ca["ema"]["weights"], cb["ema"]["weights"]))
    for wa, wb in pairs:
        for k in wa:
            assert torch.equal(wb[k], wa[k]), k  # bitwise, as the losses above


def test_config_errors_fail_before_any_process_group(tmp_path: Path) -> None:
    for bad, key in (
        ("train.epoch=3", "train.epoch"),
        ("data.batch_size=two", "data.batch_size"),
        ("train.amp=fp8", "train.amp"),
    ):
        r = torchrun(["--module", *TRAIN[1:], bad], timeout=120)
        assert r.returncode != 0
        assert f"config key {key}" in r.stderr, r.stderr[-2000:]
        assert "init_process_group" not in r.stderr


@pytest.mark.slow
def test_two_torchrun_agents_train_together_like_two_nodes(trash_shards, tmp_path: Path) -> None:
    """launch/multinode.sh twice on one machine (node ranks 0 and 1, c10d rendezvous), as on two nodes."""
    train, val = trash_shards
    port = free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DIST_SEG_VENV": THIS_VENV,  # this venv: set-up is a no-op
        "NNODES": "2",
        "NPROC_PER_NODE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "MAX_RESTARTS": "0",
    }
    args = [
        str(REPO / "configs/cpu_small.yaml"),
        *_overrides(train, val, tmp_path / "run", **{"train.max_steps": 4, "data.num_workers": 0}),
    ]
    procs = [
        subprocess.Popen(
            ["bash", str(REPO / "launch/multinode.sh"), *args],
            cwd=REPO,
            env={**env, "NODE_RANK": str(node)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in range(2)
    ]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (o, e) in zip(procs, outs, strict=True):
        assert p.returncode == 0, o[-2000:] + e[-3000:]
        assert setup_used_this_venv(o), o[:500]
    joined = "".join(o for o, _ in outs)
    assert "2 process(es)" in joined and "final val mIoU" in joined
    assert load_checkpoint(tmp_path / "run" / "last.pt")["train_state"]["step"] == 4


@pytest.mark.slow
def test_launch_train_script(trash_shards, tmp_path: Path) -> None:
    """launch/train.sh as the README shows it: all local GPUs, or 2 gloo processes on a CPU machine."""
    env = {**os.environ, "DIST_SEG_VENV": THIS_VENV, "NPROC": "2"}
    args = [
        str(REPO / "configs/cpu_small.yaml"),
        f"data.train_shards={trash_shards[0]}",
        f"train.out_dir={tmp_path / 'run'}",
        "model.name=fcn8s",
        "data.crop_size=64",
        "train.max_steps=2",
    ]
    r = subprocess.run(
        ["bash", str(REPO / "launch/train.sh"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert setup_used_this_venv(r.stdout), r.stdout[:500]
    assert "2 process(es) on cpu" in r.stdout and (tmp_path / "run" / "last.pt").is_file()
