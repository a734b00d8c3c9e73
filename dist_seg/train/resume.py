"""Resuming on another geometry: what a checkpoint's data position and schedule mean on this run's ranks,
batch size and loader workers (torchrun's elastic mode, a requeue on other hardware, an edited config).

The rules (README "Preemption, node loss and resize" states them for users):

- The global batch (data.batch_size x world size x train.grad_accum) belongs to the run. A resume on another
  world size or batch size keeps it by choosing train.grad_accum, so the optimizer steps per epoch, the LR
  curve and the samples per step are those of the uninterrupted run. When no whole grad_accum makes the
  checkpoint's global batch, the resume stops before the first step with an error naming both sides.
- The data position is global: epoch, optimizer steps done in it, and the segment of the epoch being read.
  The epoch's order is a function of the shards, the geometry (world size, batch size, loader workers,
  shuffle window), train.seed and data.shuffle_shards. When none of these changed, the loader continues the
  segment at the next batch, so the run is the uninterrupted run. When the geometry, the seed or the shard
  shuffle changed, the epoch continues in a new segment over exactly the samples it has not used yet
  (dist_seg.data.loading.plan.consumed_ids, in the checkpoint's order), read in the new order; so over the
  interrupted epoch every sample is used once, up to the drop_last tail, and the next epochs follow the new
  settings. (The shards themselves must be the checkpoint's: check_same_dataset compares the sample count.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from dist_seg.checkpoint import CheckpointManager
from dist_seg.config.schema import Config
from dist_seg.data.format.shards import ShardSet
from dist_seg.data.format.urls import redact
from dist_seg.data.loading.plan import Geometry, consumed_ids, ids_to_runs, runs_to_ids
from dist_seg.runtime import distributed as D
from dist_seg.train.state import TrainState


def agree_on_checkpoint(ckpts: CheckpointManager, cfg: Config, world: D.World) -> Path | None:
    """Rank 0 picks the checkpoint to resume from (or none) and every rank must be able to read it: a rank
    that decided alone could start fresh while the others resume, and DDP would average diverged replicas."""
    choice: tuple[str | None, str | None] = (None, None)
    if world.is_main:
        try:
            path = ckpts.resume_path(cfg.train.resume)
            choice = (str(path) if path is not None else None, None)
        except ValueError as e:
            choice = (None, str(e))
    path, error = D.broadcast_object(choice)
    if error is not None:
        raise ValueError(error)
    blind = [
        r for r, bad in enumerate(D.all_gather_object(path is not None and not Path(path).is_file())) if bad
    ]
    if blind:
        raise ValueError(
            f"rank 0 resumes from {path}, which rank(s) {blind} cannot read: train.out_dir must be on a "
            "filesystem that every node shares (or set train.resume to a path all nodes can read)"
        )
    return Path(path) if path is not None else None


def keep_global_batch(cfg: Config, saved: dict[str, Any], world_size: int) -> tuple[Config, str | None]:
    """`cfg` with the train.grad_accum that keeps the checkpoint's global batch on `world_size` ranks, and a
    line saying what changed (None when nothing did). ValueError naming both sides when none can."""
    state, old_cfg = saved["train_state"], saved.get("config", {})
    global_batch = int(state.get("global_batch") or 0)
    if not global_batch:
        return cfg, None  # a checkpoint older than the rule: nothing to keep
    per_step = cfg.data.batch_size * world_size
    if per_step * cfg.train.grad_accum == global_batch:
        return cfg, None
    old = state.get("geometry", {})
    was = (
        f"data.batch_size={old.get('batch_size', '?')} x {old.get('world_size', '?')} rank(s) x "
        f"train.grad_accum={old_cfg.get('train', {}).get('grad_accum', '?')}"
    )
    if global_batch % per_step:
        raise ValueError(
            f"cannot resume: the checkpoint's global batch is {global_batch} ({was}), and data.batch_size="
            f"{cfg.data.batch_size} x {world_size} rank(s) = {per_step} does not divide it; set "
            f"data.batch_size so that batch_size x world size divides {global_batch}"
        )
    grad_accum = global_batch // per_step
    note = (
        f"global batch {global_batch} kept: data.batch_size={cfg.data.batch_size} x {world_size} rank(s) x "
        f"train.grad_accum={grad_accum} (was {was}; train.grad_accum={cfg.train.grad_accum} in the config)"
    )
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=grad_accum)), note


def continue_epoch(
    state: TrainState,
    geometry: Geometry,
    saved_cfg: dict[str, Any],
    shard_set: ShardSet,
    seed: int,
    shuffle: bool = True,
) -> str | None:
    """Carry the saved data position over to this run's data order: its `geometry`, train.seed (`seed`) and
    data.shuffle_shards (`shuffle`). Nothing when none of them changed (the segment continues at the next
    batch), for a checkpoint without a geometry, or at an epoch boundary (nothing of the epoch read yet);
    otherwise a new segment of the epoch over the samples not used yet, which are counted in the order the
    checkpoint's run read them. Returns what it did. The caller records `geometry` as the segment's
    afterwards."""
    old = state.geometry
    if not old or state.epoch_step == 0:
        return None
    old_seed, old_shuffle = _saved_order(saved_cfg, seed, shuffle)
    changed = [
        f"{key} {was} -> {now}"
        for key, was, now in (("train.seed", old_seed, seed), ("data.shuffle_shards", old_shuffle, shuffle))
        if was != now
    ]
    if old == geometry.as_dict() and not changed:
        return None
    old_geometry = Geometry(**old)
    used = _used_so_far(state, shard_set, old_geometry, old_seed, old_shuffle)
    state.consumed = ids_to_runs(used)
    state.segment += 1
    state.segment_start = state.epoch_step
    how = []
    if old != geometry.as_dict():
        how.append(f"on a new geometry ({_describe(old_geometry)} -> {_describe(geometry)})")
    if changed:
        how.append(f"in a new data order ({', '.join(changed)})")
    return (
        f"epoch {state.epoch} continues {' and '.join(how)}: "
        f"{len(used)} of its {shard_set.total_samples} samples used so far, the rest re-planned"
    )


def _saved_order(saved_cfg: dict[str, Any], seed: int, shuffle: bool) -> tuple[int, bool]:
    """The checkpoint run's train.seed and data.shuffle_shards, the inputs of the epoch order besides the
    geometry (this run's where the checkpoint does not say)."""
    old_seed = int(saved_cfg.get("train", {}).get("seed", seed))
    return old_seed, bool(saved_cfg.get("data", {}).get("shuffle_shards", shuffle))


def _used_so_far(
    state: TrainState, shard_set: ShardSet, old_geometry: Geometry, old_seed: int, old_shuffle: bool
) -> set[int]:
    """The ids of the samples the interrupted epoch has used: earlier segments', and the batches every rank
    took of the current one, read as the checkpoint's run read them."""
    grad_accum = state.global_batch // (old_geometry.batch_size * old_geometry.world_size)
    start_batch = (state.epoch_step - state.segment_start) * grad_accum
    return consumed_ids(
        shard_set.shard_samples,
        old_seed,
        state.epoch,
        old_shuffle,
        state.segment,
        runs_to_ids(state.consumed),
        old_geometry,
        start_batch,
    )


def check_same_dataset(state: dict[str, Any], shard_set: ShardSet, path: str) -> None:
    """The position counts samples of the checkpoint's dataset: another dataset cannot continue it."""
    saved = state.get("samples")
    if saved is not None and int(saved) != shard_set.total_samples:
        raise ValueError(
            f"checkpoint {path} was written on training shards of {saved} samples, but data.train_shards="
            f"{redact(shard_set.spec)} holds {shard_set.total_samples}: resume with the same shards, or start a new "
            "run (train.resume=null or another train.out_dir)"
        )


def _describe(g: Geometry) -> str:
    return f"{g.world_size} rank(s) x batch {g.batch_size}, {g.readers} reader(s), window {g.window}"
