"""data.augment in real training: 2 torchrun ranks with a loader worker each train with the shipped
albumentations recipe, and a run killed after a checkpoint and restarted by torchrun trains on exactly the
augmented batches of an uninterrupted one: the same recorded keys per step (DIST_SEG_RECORD_KEYS), the same
loss bits per step (each a function of the augmented batch and the weights) and the same final weights.

(The per-sample hashes of augmented samples across worker counts, ranks and start batches are checked on the
loader itself in tests/data/loading/test_augment.py; this file is not named test_augment.py because pytest
imports test modules by their base name.)"""

from __future__ import annotations

from pathlib import Path

import torch
from launch_utils import REPO, torchrun

from dist_seg.checkpoint import load_checkpoint
from dist_seg.train.tensorboard import read_scalars

STEPS, SAVED_AT, KILLED_AT = 6, 3, 5
RECIPE = "dist_seg.data.loading.augment_recipes:albumentations_common"


def _run(
    shards: Path, out: Path, keys: Path, env: dict[str, str] | None = None, extra: list[str] | None = None
):
    args = [
        "--module", "dist_seg.train", "--config", str(REPO / "configs/cpu_small.yaml"),
        f"data.train_shards={shards}", "data.val_shards=null", f"train.out_dir={out}",
        "model.name=fcn8s", "model.width_mult=0.0625", "data.crop_size=32", "data.shuffle_buffer=6",
        "data.num_workers=1", "train.log_every=1", f"train.max_steps={STEPS}", f"train.save_every={SAVED_AT}",
        f"data.augment={RECIPE}",
    ]  # fmt: skip
    env = {"DIST_SEG_RECORD_KEYS": str(keys), **(env or {})}
    return torchrun(args, nproc=2, timeout=300, env=env, extra=extra)


def _keys_by_step(keys: Path) -> dict[str, dict[int, list[str]]]:
    """rank file -> step -> the keys recorded for it, in order, over every attempt of the job."""
    out: dict[str, dict[int, list[str]]] = {}
    for f in sorted(keys.glob("keys-rank*.txt")):
        for line in f.read_text().splitlines():
            step, key = line.split()
            out.setdefault(f.name, {}).setdefault(int(step), []).append(key)
    return out


def test_a_restarted_run_trains_on_the_augmented_batches_of_an_uninterrupted_one(
    tiny_shards: dict[str, Path], tmp_path: Path
) -> None:
    shards = tiny_shards["train4"]
    straight = _run(shards, tmp_path / "straight", tmp_path / "keys_straight")
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-3000:]
    killed = _run(
        shards,
        tmp_path / "resumed",
        tmp_path / "keys_resumed",
        env={"DIST_SEG_FAULT_KILL_AT_STEP": f"{KILLED_AT}:1"},
        extra=["--max-restarts=1"],
    )
    assert killed.returncode == 0, killed.stdout[-2000:] + killed.stderr[-3000:]
    assert f"at step {SAVED_AT}" in killed.stdout and "resumed from" in killed.stdout, killed.stdout[-2000:]

    want, got = _keys_by_step(tmp_path / "keys_straight"), _keys_by_step(tmp_path / "keys_resumed")
    assert sorted(want) == sorted(got) == ["keys-rank0.txt", "keys-rank1.txt"]
    for rank, steps in want.items():
        assert sorted(steps) == sorted(got[rank]) == list(range(1, STEPS + 1))
        for step, keys in steps.items():
            assert len(keys) == 2  # data.batch_size
            # a step trained before the kill and again after the restart: the same batch both times
            repeats = len(got[rank][step]) // 2
            assert got[rank][step] == keys * repeats, (rank, step)
            if step <= SAVED_AT or step > KILLED_AT:
                assert repeats == 1
            elif step < KILLED_AT:
                assert repeats == 2
    # bitwise: the same ops on the same bits (OMP_NUM_THREADS=1, one machine); any difference in an augmented
    # batch would show in the loss of its step and in the weights
    a = read_scalars(tmp_path / "straight" / "tb")["train/loss"]
    b = read_scalars(tmp_path / "resumed" / "tb")["train/loss"]
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, STEPS + 1)) and a == b
    wa = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    wb = load_checkpoint(tmp_path / "resumed" / "last.pt")["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
