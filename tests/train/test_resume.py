"""dist_seg.train.resume, the rules a resume follows (README "Preemption, node loss and resize"), checked
against hand-computed expectations: the global batch kept across world sizes (or the resume refused, naming
both sides), an interrupted epoch continued on the same or another geometry, or in another data order
(train.seed, data.shuffle_shards), without re-reading a sample (through the real train loader), another
dataset refused, and the checkpoint every rank agrees on."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_shards import tar_keys

from dist_seg.checkpoint import CheckpointManager
from dist_seg.config.schema import Config, DataConfig, TrainConfig
from dist_seg.data.format.shards import ShardSet, resolve_shards
from dist_seg.data.loading.plan import Geometry
from dist_seg.data.loading.train_loader import build_train_loader
from dist_seg.runtime.distributed import World
from dist_seg.train import resume
from dist_seg.train.resume import agree_on_checkpoint, check_same_dataset, continue_epoch, keep_global_batch
from dist_seg.train.state import TrainState

ONE_PROCESS = World(0, 0, 1, torch.device("cpu"), None)


# ---------------------------------------------------------------- keep_global_batch
def _cfg(batch_size: int = 2, grad_accum: int = 1) -> Config:
    return Config(data=DataConfig(batch_size=batch_size), train=TrainConfig(grad_accum=grad_accum))


def _saved(global_batch: int, world_size: int, batch_size: int, grad_accum: int) -> dict[str, Any]:
    """What keep_global_batch reads of a checkpoint written by a run of that geometry."""
    geometry = {"world_size": world_size, "batch_size": batch_size, "readers": 1, "window": 16}
    return {
        "train_state": {"global_batch": global_batch, "geometry": geometry},
        "config": {"train": {"grad_accum": grad_accum}},
    }


def test_the_same_global_batch_changes_nothing() -> None:
    cfg = _cfg(batch_size=2, grad_accum=2)
    assert keep_global_batch(cfg, _saved(16, 4, 2, 2), world_size=4) == (cfg, None)


@pytest.mark.parametrize(
    ("world_size", "grad_accum"),
    [(2, 4), (1, 8), (8, 1)],  # 16 = 2 x 2 x 4 = 2 x 1 x 8 = 2 x 8 x 1
)
def test_another_world_size_keeps_the_global_batch_by_grad_accum(world_size: int, grad_accum: int) -> None:
    """A run of 4 ranks x batch 2 x grad_accum 2 (global batch 16) resumed on `world_size` ranks."""
    cfg = _cfg(batch_size=2, grad_accum=2)
    kept, note = keep_global_batch(cfg, _saved(16, 4, 2, 2), world_size)
    assert kept.train.grad_accum == grad_accum
    assert kept.data.batch_size * world_size * kept.train.grad_accum == 16
    assert cfg.train.grad_accum == 2  # the caller's config is left as it was
    assert note == (
        f"global batch 16 kept: data.batch_size=2 x {world_size} rank(s) x train.grad_accum={grad_accum} "
        "(was data.batch_size=2 x 4 rank(s) x train.grad_accum=2; train.grad_accum=2 in the config)"
    )


def test_a_changed_batch_size_is_absorbed_by_grad_accum_too() -> None:
    kept, note = keep_global_batch(_cfg(batch_size=4), _saved(16, 4, 2, 2), world_size=2)
    assert kept.train.grad_accum == 2 and note is not None and "data.batch_size=4 x 2 rank(s)" in note


@pytest.mark.parametrize(
    ("batch_size", "world_size", "per_step"),
    [(3, 2, 6), (2, 16, 32)],  # 6 does not divide 16; 32 ranks' worth is more than the global batch
)
def test_a_global_batch_no_grad_accum_can_make_is_refused(
    batch_size: int, world_size: int, per_step: int
) -> None:
    with pytest.raises(ValueError) as e:
        keep_global_batch(_cfg(batch_size=batch_size), _saved(16, 4, 2, 2), world_size)
    assert str(e.value) == (
        "cannot resume: the checkpoint's global batch is 16 (data.batch_size=2 x 4 rank(s) x "
        f"train.grad_accum=2), and data.batch_size={batch_size} x {world_size} rank(s) = {per_step} does not "
        "divide it; set data.batch_size so that batch_size x world size divides 16"
    )


def test_a_checkpoint_without_a_global_batch_keeps_the_config() -> None:
    cfg = _cfg(batch_size=2, grad_accum=3)
    assert keep_global_batch(cfg, {"train_state": {"step": 5}}, world_size=7) == (cfg, None)


# ---------------------------------------------------------------- continue_epoch
def _geometry(world_size: int) -> Geometry:
    """The loader geometry of _data on `world_size` ranks: batch 2, one reader (num_workers=0), window 8."""
    return Geometry(world_size=world_size, batch_size=2, readers=1, window=8)


def _data(shards: Path, shuffle: bool = True) -> DataConfig:
    return DataConfig(
        train_shards=str(shards), batch_size=2, crop_size=24, num_workers=0, shuffle_buffer=8,
        shuffle_shards=shuffle,
    )  # fmt: skip


def _read(
    shards: Path,
    world_size: int,
    state: TrainState,
    grad_accum: int,
    batches: int | None = None,
    order: tuple[int, bool] = (0, True),
) -> list[str]:
    """The sample keys every rank's real train loader yields from `state`'s data position (`batches` loader
    batches per rank, or the rest of the epoch), with train.seed and data.shuffle_shards `order`."""
    keys: list[str] = []
    seed, shuffle = order
    for rank in range(world_size):
        loader = build_train_loader(_data(shards, shuffle), rank, world_size, seed=seed)
        assert loader.geometry == _geometry(world_size)
        loader.set_position(state.data_position(grad_accum))
        for i, batch in enumerate(loader):
            if batches is not None and i == batches:
                break
            keys += batch.keys
    return keys


def _interrupted(shards: Path, world_size: int, grad_accum: int, steps: int) -> tuple[TrainState, list[str]]:
    """The state of a run stopped after `steps` optimizer steps of epoch 0, and the keys it trained on."""
    geometry = _geometry(world_size)
    state = TrainState(step=steps, epoch_step=steps, global_batch=2 * world_size * grad_accum, samples=40)
    state.geometry = geometry.as_dict()
    used = _read(shards, world_size, TrainState(), grad_accum, batches=steps * grad_accum)
    return state, used


def test_the_same_geometry_continues_the_segment_at_the_next_batch(tiny_shards: dict[str, Path]) -> None:
    """2 ranks x batch 2 x grad_accum 2 (8 images a step) stopped after 3 of the epoch's 5 steps: 24 samples
    used; the resume reads the other 16 and nothing twice."""
    shards = tiny_shards["train4"]  # 4 shards x 10 samples
    state, used = _interrupted(shards, world_size=2, grad_accum=2, steps=3)
    before = dataclasses.replace(state)
    assert continue_epoch(state, _geometry(2), {}, resolve_shards(str(shards)), seed=0) is None
    assert state == before
    rest = _read(shards, 2, state, grad_accum=2)
    assert len(used) == 24 and len(rest) == 16
    assert sorted(used + rest) == sorted(tar_keys(shards))


def test_another_geometry_continues_the_epoch_over_the_unused_samples(tiny_shards: dict[str, Path]) -> None:
    """The same interrupted run resumed on 1 rank (grad_accum 4 keeps the global batch 8): a new segment over
    the 16 samples not used yet, 2 more optimizer steps, every sample of the epoch used exactly once."""
    shards = tiny_shards["train4"]
    state, used = _interrupted(shards, world_size=2, grad_accum=2, steps=3)
    note = continue_epoch(state, _geometry(1), {"train": {"seed": 0}}, resolve_shards(str(shards)), seed=0)
    assert note == (
        "epoch 0 continues on a new geometry (2 rank(s) x batch 2, 1 reader(s), window 8 -> "
        "1 rank(s) x batch 2, 1 reader(s), window 8): 24 of its 40 samples used so far, the rest re-planned"
    )
    assert (state.segment, state.segment_start, state.epoch_step) == (1, 3, 3)
    assert sum(b - a for a, b in state.consumed) == 24
    state.geometry = _geometry(1).as_dict()  # what the loop records for the new segment
    position = state.data_position(grad_accum=4)
    assert (position.segment, position.start_batch) == (1, 0)
    rest = _read(shards, 1, state, grad_accum=4)
    assert len(rest) == 16 and not set(rest) & set(used)
    assert sorted(used + rest) == sorted(tar_keys(shards))


@pytest.mark.parametrize(
    ("order", "change"),
    [
        pytest.param((1, True), "train.seed 0 -> 1", id="another-seed"),
        pytest.param((0, False), "data.shuffle_shards True -> False", id="no-shard-shuffle"),
    ],
)
def test_a_changed_data_order_continues_the_epoch_over_the_unused_samples(
    tiny_shards: dict[str, Path], order: tuple[int, bool], change: str
) -> None:
    """The same geometry, but the resume changes an input of the epoch's order: continuing the segment would
    read the new order from batch 6 on, repeating samples and skipping others; instead the rest of the
    epoch is re-planned over the 16 samples not used yet, in the new order."""
    shards = tiny_shards["train4"]
    state, used = _interrupted(shards, world_size=2, grad_accum=2, steps=3)
    naive = _read(shards, 2, state, grad_accum=2, order=order)  # what the segment's next batches would be
    assert set(naive) & set(used), "the changed order does not move samples: the test shows nothing"
    saved_cfg = {"train": {"seed": 0}, "data": {"shuffle_shards": True}}
    note = continue_epoch(state, _geometry(2), saved_cfg, resolve_shards(str(shards)), *order)
    assert note == (
        f"epoch 0 continues in a new data order ({change}): 24 of its 40 samples used so far, the rest "
        "re-planned"
    )
    assert (state.segment, state.segment_start) == (1, 3)
    rest = _read(shards, 2, state, grad_accum=2, order=order)
    assert len(rest) == 16 and sorted(used + rest) == sorted(tar_keys(shards))


def test_a_new_geometry_and_a_new_seed_are_both_named() -> None:
    state = TrainState(step=3, epoch_step=3, global_batch=8, samples=40, geometry=_geometry(2).as_dict())
    note = continue_epoch(state, _geometry(1), {"train": {"seed": 0}}, _shard_set(40), seed=5)
    assert note is not None and note.startswith(
        "epoch 0 continues on a new geometry (2 rank(s) x batch 2, 1 reader(s), window 8 -> 1 rank(s) x "
        "batch 2, 1 reader(s), window 8) and in a new data order (train.seed 0 -> 5): 24 of its 40"
    )


def _shard_set(samples: int, spec: str = "/data/train") -> ShardSet:
    """A one-shard ShardSet of `samples` samples, for the checks that read only its counts and spec."""
    return ShardSet(spec, {f"{spec}/shard-000000.tar": samples}, 2, [], True, None, [spec])


@pytest.mark.parametrize(
    ("epoch_step", "geometry"),
    [
        pytest.param(0, _geometry(2).as_dict(), id="at-an-epoch-boundary"),
        pytest.param(3, {}, id="checkpoint-older-than-geometries"),
    ],
)
def test_no_new_segment_when_nothing_of_the_epoch_was_read_or_the_geometry_is_unknown(
    epoch_step: int, geometry: dict[str, int]
) -> None:
    state = TrainState(step=5, epoch=1, epoch_step=epoch_step, global_batch=8, geometry=geometry)
    before = dataclasses.replace(state)
    assert continue_epoch(state, _geometry(1), {}, _shard_set(40), seed=0) is None
    assert state == before


# ---------------------------------------------------------------- check_same_dataset
def test_another_dataset_is_refused_naming_the_checkpoint() -> None:
    with pytest.raises(ValueError) as e:
        check_same_dataset({"step": 3, "samples": 37}, _shard_set(40), "runs/a/last.pt")
    assert str(e.value) == (
        "checkpoint runs/a/last.pt was written on training shards of 37 samples, but data.train_shards="
        "/data/train holds 40: resume with the same shards, or start a new run (train.resume=null or another "
        "train.out_dir)"
    )


def test_the_same_dataset_or_a_checkpoint_that_did_not_count_passes() -> None:
    check_same_dataset({"samples": 40}, _shard_set(40), "runs/a/last.pt")
    check_same_dataset({"step": 3}, _shard_set(40), "runs/a/last.pt")  # written before samples were recorded


# ---------------------------------------------------------------- agree_on_checkpoint
def _agree(out: Path, resume_setting: str | None) -> Path | None:
    cfg = Config(train=TrainConfig(out_dir=str(out), resume=resume_setting))
    return agree_on_checkpoint(CheckpointManager(out, keep_last=2), cfg, ONE_PROCESS)


def test_one_process_resumes_from_last_pt_when_auto_finds_it(tmp_path: Path) -> None:
    assert _agree(tmp_path, "auto") is None  # nothing written yet: start fresh
    (tmp_path / "last.pt").write_bytes(b"x")
    assert _agree(tmp_path, "auto") == tmp_path / "last.pt"
    assert _agree(tmp_path, None) is None  # train.resume=null starts fresh even so


def test_one_process_resumes_from_a_named_file_or_refuses_a_missing_one(tmp_path: Path) -> None:
    named = tmp_path / "elsewhere.pt"
    named.write_bytes(b"x")
    assert _agree(tmp_path / "run", str(named)) == named
    with pytest.raises(ValueError, match=r"train.resume=.*nothere.pt.*checkpoint file not found"):
        _agree(tmp_path / "run", str(tmp_path / "nothere.pt"))


def test_a_rank_that_cannot_read_the_checkpoint_stops_every_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0 found last.pt, rank 1 (simulated: its answer to the all-gather) cannot see the file."""
    (tmp_path / "last.pt").write_bytes(b"x")
    monkeypatch.setattr(resume.D, "all_gather_object", lambda blind: [blind, True])
    with pytest.raises(ValueError) as e:
        _agree(tmp_path, "auto")
    assert str(e.value) == (
        f"rank 0 resumes from {tmp_path / 'last.pt'}, which rank(s) [1] cannot read: train.out_dir must be "
        "on a filesystem that every node shares (or set train.resume to a path all nodes can read)"
    )
