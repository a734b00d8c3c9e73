"""Resume on another geometry, with real torchrun runs: 2 -> 1 and 1 -> 2 processes and a change of
data.num_workers. A run is killed mid-epoch after a checkpoint, resumed on the new geometry, and the samples
of the interrupted epoch (recorded with DIST_SEG_RECORD_KEYS) must be each sample exactly once; the global
step, the global batch and the learning rate after the resume must be those of an uninterrupted run.

The dataset has 40 samples and the global batch is 4, so an epoch is 10 steps and uses every sample (no
drop_last tail): the multiset of keys over the interrupted epoch must equal the dataset's keys. Every run has
loader workers (one per rank; the last test changes it to two)."""

from __future__ import annotations

from pathlib import Path

import pytest
from launch_utils import REPO, torchrun
from tiny_shards import tar_keys

from dist_seg.checkpoint import load_checkpoint
from dist_seg.train.tensorboard import read_scalars

STEPS, SAVED_AT, KILLED_AT = 10, 4, 6
FAST = [
    "model.name=fcn8s", "model.width_mult=0.0625", "data.crop_size=32", "train.log_every=1",
    "sched.name=poly", f"train.max_steps={STEPS}", "data.shuffle_buffer=6",
    "data.num_workers=1",  # loader workers, as every real run has (cpu_small.yaml has none)
]  # fmt: skip


def _run(shards: Path, out: Path, keys: Path, nproc: int, *extra: str, env: dict | None = None):
    args = [
        "--module", "dist_seg.train", "--config", str(REPO / "configs/cpu_small.yaml"),
        f"data.train_shards={shards}", "data.val_shards=null", f"train.out_dir={out}", *FAST, *extra,
    ]  # fmt: skip
    return torchrun(args, nproc=nproc, timeout=300, env={"DIST_SEG_RECORD_KEYS": str(keys), **(env or {})})


def _keys(folder: Path, up_to: int | None = None) -> list[str]:
    """Every (step, key) line the ranks recorded; only steps <= up_to when given."""
    got = []
    for f in sorted(folder.glob("keys-rank*.txt")):
        for line in f.read_text().splitlines():
            step, key = line.split()
            if up_to is None or int(step) <= up_to:
                got.append(key)
    return got


def _lr(out: Path) -> dict[int, float]:
    scalars = read_scalars(out / "tb")
    return dict(scalars[next(t for t in scalars if t.startswith("train/lr/"))])


@pytest.fixture(scope="module")
def reference(tiny_shards: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The learning rate of an uninterrupted 2-process run, step by step."""
    out = tmp_path_factory.mktemp("elastic_reference")
    r = _run(tiny_shards["train4"], out / "run", out / "keys", 2, "data.batch_size=2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert sorted(_keys(out / "keys")) == sorted(tar_keys(tiny_shards["train4"]))
    return _lr(out / "run")


def _interrupted_then_resumed(
    shards: Path, tmp_path: Path, before: tuple[int, list[str]], after: tuple[int, list[str]]
) -> tuple[str, Path]:
    out, keys_a, keys_b = tmp_path / "run", tmp_path / "keys_a", tmp_path / "keys_b"
    kill = {"DIST_SEG_FAULT_KILL_AT_STEP": f"{KILLED_AT}:0"}
    a = _run(shards, out, keys_a, before[0], f"train.save_every={SAVED_AT}", *before[1], env=kill)
    assert a.returncode != 0 and f"SIGKILL rank 0 at step {KILLED_AT}" in a.stdout, a.stdout[-2000:]
    b = _run(shards, out, keys_b, after[0], "train.resume=auto", *after[1])
    assert b.returncode == 0, b.stdout[-2000:] + b.stderr[-3000:]
    assert f"at step {SAVED_AT} (epoch 0, step {SAVED_AT} of it)" in b.stdout
    # over the interrupted epoch: what the checkpoint had trained on, then the resumed run; each key once
    used = _keys(keys_a, up_to=SAVED_AT) + _keys(keys_b)
    assert sorted(used) == sorted(tar_keys(shards)), "a sample was used twice or never"
    state = load_checkpoint(out / "last.pt")["train_state"]
    assert state["step"] == STEPS and state["global_batch"] == 4
    return b.stdout, out


def _same_lr_after_resume(out: Path, reference: dict[int, float]) -> None:
    lr = _lr(out)
    assert sorted(lr) == list(range(1, STEPS + 1))
    for step in range(SAVED_AT + 1, STEPS + 1):
        # the same Python schedule formula at the same step, stored as float32 by both runs: equal, not close
        assert lr[step] == reference[step], step


@pytest.mark.slow
def test_two_processes_resume_on_one_keeping_the_global_batch(tiny_shards, reference, tmp_path: Path) -> None:
    shards = tiny_shards["train4"]
    stdout, out = _interrupted_then_resumed(
        shards, tmp_path, (2, ["data.batch_size=2"]), (1, ["data.batch_size=2"])
    )
    assert "global batch 4 kept: data.batch_size=2 x 1 rank(s) x train.grad_accum=2" in stdout
    assert "continues on a new geometry (2 rank(s) x batch 2" in stdout
    _same_lr_after_resume(out, reference)
    # a batch size that cannot make the checkpoint's global batch of 4 is refused before the first step
    refused = _run(shards, out, tmp_path / "k2", 1, "data.batch_size=3", "train.resume=auto")
    assert refused.returncode != 0
    assert "cannot resume: the checkpoint's global batch is 4" in refused.stderr + refused.stdout


@pytest.mark.slow
def test_one_process_resumes_on_two(tiny_shards, reference, tmp_path: Path) -> None:
    stdout, out = _interrupted_then_resumed(
        tiny_shards["train4"], tmp_path, (1, ["data.batch_size=4"]), (2, ["data.batch_size=2"])
    )
    assert "continues on a new geometry (1 rank(s) x batch 4" in stdout
    _same_lr_after_resume(out, reference)


@pytest.mark.slow
def test_a_change_of_loader_workers_replans_the_rest_of_the_epoch(
    tiny_shards, reference, tmp_path: Path
) -> None:
    stdout, out = _interrupted_then_resumed(
        tiny_shards["train4"],
        tmp_path,
        (2, ["data.batch_size=2", "data.num_workers=1"]),
        (2, ["data.batch_size=2", "data.num_workers=2"]),
    )
    assert "1 reader(s), window 6 -> 2 rank(s) x batch 2, 2 reader(s)" in stdout
    _same_lr_after_resume(out, reference)
