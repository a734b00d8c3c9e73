"""The training loop: fit() builds the run, restores a checkpoint, and steps through epochs; after each
optimizer step the objects that own the loop's decisions act in a fixed order. Read it top to bottom.

One step, from fit() to optimizer.step():

1. fit() puts the loader at the TrainState's data position (epoch, segment, loader batch) and wraps it in a
   Prefetcher, which copies the next batch to the device while the current step runs.
2. _optimizer_step() takes train.grad_accum of those batches and makes each a model input on the device
   (TrainBatch.model_input: uint8 -> normalised float32 images, in channels_last when configured).
3. step.train_step() runs forward and backward per micro-batch (DDP all-reduces the gradients on the last),
   clips the gradients, all-reduces the non-finite and stop flags once (so every rank takes the same
   branch), then calls optimizer.step() (GradScaler.step under fp16), moves the weight EMA and steps the
   LR scheduler.
4. Back in _optimizer_step(), TrainState.record_step counts the step and the TrainMeter meters it (a
   progress line and scalars to every tracker of train.loggers when StepSchedule.should_log).

Then fit() decides what else happens at that step, each decision owned by one object: the epoch ends
(StepSchedule.epoch_done); a stop signal ends the run with a checkpoint (checkpointing.StopSignalExit); the
Validator evaluates (StepSchedule.should_evaluate); EarlyStop ends the run after train.early_stop_patience
evaluations without a new best; the Checkpointer saves when due.

Step arithmetic: one optimizer step consumes train.grad_accum loader batches on every rank, i.e.
data.batch_size x world_size x train.grad_accum images. Every rank runs exactly the same number of steps
(the loader guarantees the batch count), so DDP never waits on a rank that ran out of data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_seg.checkpoint import restore_training, run_key
from dist_seg.config.schema import Config, save_config
from dist_seg.data.format.remote import RemoteOptions
from dist_seg.data.format.shards import ShardSet, dataset_classes
from dist_seg.data.format.urls import redacted_config
from dist_seg.data.loading.prefetch import Prefetcher
from dist_seg.data.loading.train_loader import TRAIN_TENSORS, TrainLoader, build_train_loader
from dist_seg.models import build_model, pretrained_summary
from dist_seg.runtime import distributed as D
from dist_seg.runtime import fault_injection as faults
from dist_seg.runtime.precision import AMP_DTYPES
from dist_seg.runtime.preemption import StopRequest, clear_marker
from dist_seg.train import reporting, resume
from dist_seg.train.checkpointing import Checkpointer, Saved, StopSignalExit, find_resume
from dist_seg.train.ema import WeightEMA
from dist_seg.train.losses import build_loss, load_class_weights
from dist_seg.train.optim import build_optimizer, build_scheduler, format_groups
from dist_seg.train.reporting import TrainMeter, print_main
from dist_seg.train.state import StepSchedule, TrainState
from dist_seg.train.step import StepContext, StepOutput, parameter_blocks, train_step
from dist_seg.train.tracking import RunLog
from dist_seg.train.validation import EarlyStop, Validator


@dataclass
class Run:
    """What _build makes of the config on this world: everything the loop steps with."""

    cfg: Config
    world: D.World
    ctx: StepContext
    shard_set: ShardSet  # the training shards: their sample count and classes
    loader: TrainLoader
    schedule: StepSchedule


def fit(cfg: Config, world: D.World, stop: StopRequest | None = None) -> dict[str, Any]:
    """Train as configured; returns the last evaluation's metrics. With `stop`, a stop signal ends the run
    with a checkpoint of the step reached and raises preemption.Preempted."""
    ckpts, saved = find_resume(cfg, world)
    if saved is not None:  # the global batch belongs to the run: keep it on this world size
        cfg = _keep_global_batch(cfg, world, saved)
    run = _build(cfg, world, stop)
    state, log = _open_run(run, saved)
    with log:  # however the run ends, the trackers get a bounded time to deliver and close their runs
        schedule, classes = run.schedule, (run.shard_set.num_classes, run.shard_set.class_names)
        checkpointer = Checkpointer(cfg, world, run.ctx, ckpts, schedule, *classes, log.run_key)
        preemption = StopSignalExit(checkpointer, stop)
        validator = Validator(cfg, world, run.ctx, log, *classes)
        early_stop = EarlyStop(cfg.train.early_stop_patience)
        blocks = [name for name, _ in run.ctx.blocks]
        meter = TrainMeter(cfg, world, log, schedule.total_steps, state.step, blocks)
        while not schedule.finished(state) and not early_stop.should_stop(state):
            run.loader.set_position(state.data_position(schedule.grad_accum))
            batches = Prefetcher(iter(run.loader), world.device, TRAIN_TENSORS)  # copies ahead during a step
            while not schedule.epoch_done(state) and not schedule.finished(state):
                out = _optimizer_step(run, batches, state, meter)
                epoch_done = schedule.epoch_done(state)
                if epoch_done:
                    state.next_epoch()
                preemption.exit_if_signalled(out.stop_requested, state)
                evaluated = schedule.should_evaluate(state.step, epoch_done)
                is_best = validator.evaluate(state) if evaluated else False
                preemption.exit_if_signalled(validator.stopped, state)
                stopping = early_stop.should_stop(state)
                checkpointer.save_if_due(state, epoch_done, evaluated, is_best, stopping)
                if stopping:
                    early_stop.announce(world, state)
                if stopping or epoch_done:
                    break
        metrics = validator.final_metrics(state.step)
        if world.is_main and metrics:
            reporting.report_final(cfg, log, world.world_size, metrics, state.step)
    return metrics


def _optimizer_step(run: Run, batches: Prefetcher, state: TrainState, meter: TrainMeter) -> StepOutput:
    """Steps 2 to 4 of the module docstring: one optimizer step on the next train.grad_accum batches,
    counted in `state` and metered (logged when the schedule says)."""
    cfg, world, loader = run.cfg, run.world, run.loader
    faults.on_step(state.step + 1, world.rank)
    t0 = time.perf_counter()
    step_batches = [next(batches) for _ in range(run.schedule.grad_accum)]
    t1 = time.perf_counter()
    faults.record_keys(state.step + 1, world.rank, step_batches)
    inputs = [b.model_input(cfg.train.channels_last) for b in step_batches]  # uint8 -> float, on the device
    out = train_step(run.ctx, inputs, state.step + 1)
    state.record_step(out, cfg.train.max_nonfinite)
    meter.add(out, t1 - t0, time.perf_counter() - t0, loader.skipped, loader.remote_retries)
    if run.schedule.should_log(state.step):
        meter.log(state.step, state.epoch, run.ctx.optimizer)
    return out


def _keep_global_batch(cfg: Config, world: D.World, saved: Saved) -> Config:
    """`cfg` with the train.grad_accum that keeps the checkpoint's global batch on this world size."""
    cfg, note = resume.keep_global_batch(cfg, saved[1], world.world_size)
    if note:
        print_main(world, note)
    return cfg


def _build(cfg: Config, world: D.World, stop: StopRequest | None) -> Run:
    """Model, optimizer, scheduler, scaler, loss, the train loader and the schedule, ready to step."""
    shard_set = dataset_classes(
        cfg.data.train_shards, cfg.model.num_classes, RemoteOptions.from_config(cfg.data)
    )
    num_classes, t = shard_set.num_classes, cfg.train
    model, optimizer = _model_and_optimizer(cfg, world, num_classes)
    loader = build_train_loader(cfg.data, world.rank, world.world_size, t.seed)
    steps_per_epoch = _steps_per_epoch(cfg, world, loader, shard_set)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    weights = load_class_weights(cfg.loss.class_weights, shard_set.class_stats, num_classes)
    ctx = StepContext(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.sched, total_steps),
        scaler=torch.amp.GradScaler(world.device.type) if t.amp == "fp16" else None,
        loss_fn=build_loss(cfg.loss, num_classes, weights, cfg.model.aux_loss).to(world.device),
        device=world.device,
        amp_dtype=AMP_DTYPES[t.amp],
        clip_grad=t.clip_grad,
        max_nonfinite=t.max_nonfinite,
        params=[p for p in model.parameters() if p.requires_grad],
        blocks=parameter_blocks(model),
        ema=WeightEMA(model, t.ema_decay) if t.ema_decay is not None else None,
        stop=stop,
    )
    schedule = StepSchedule.from_config(cfg, steps_per_epoch, total_steps, world.world_size)
    return Run(cfg, world, ctx, shard_set, loader, schedule)


def _model_and_optimizer(
    cfg: Config, world: D.World, num_classes: int
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model as it trains (SyncBN, channels_last, DDP, torch.compile as configured) and its optimizer."""
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg.model, num_classes).to(world.device)
    if (summary := pretrained_summary(model, str(cfg.model.pretrained))) is not None:
        print_main(world, summary)
    # prepared before the optimizer is built, so the optimizer holds the parameters that train
    t = cfg.train
    compression = (t.grad_compression, (t.powersgd_rank, t.powersgd_start_step))
    model = D.prepare_model(model, world, t.sync_bn, t.channels_last, t.compile, *compression)
    optimizer, groups = build_optimizer(model, cfg.optim)
    print_main(world, format_groups(groups))
    return model, optimizer


def _steps_per_epoch(cfg: Config, world: D.World, loader: TrainLoader, shard_set: ShardSet) -> int:
    """Optimizer steps per epoch: the loader's batches per rank over train.grad_accum; at least one."""
    steps = loader.steps_per_epoch // cfg.train.grad_accum
    if steps < 1:
        raise ValueError(
            f"{shard_set.total_samples} training samples are fewer than one optimizer step needs "
            f"(data.batch_size={cfg.data.batch_size} x {world.world_size} ranks x "
            f"train.grad_accum={cfg.train.grad_accum})"
        )
    return steps


def _open_run(run: Run, saved: Saved | None) -> tuple[TrainState, RunLog]:
    """Restore the saved checkpoint (or start at step 0), write the run directory's config.yaml, and start
    the trackers (a resume continues the tracked runs the checkpoint names, without repeating a step)."""
    cfg, world, shard_set, schedule = run.cfg, run.world, run.shard_set, run.schedule
    out = Path(cfg.train.out_dir)
    state = TrainState(global_batch=schedule.global_batch, samples=shard_set.total_samples)
    if saved is not None:
        _restore(run, saved, state)
    state.geometry = run.loader.geometry.as_dict()
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        clear_marker(out)  # this run goes on from where a preempted one stopped
        save_config(redacted_config(cfg), out / "config.yaml")  # URLs without their credentials
        if saved is not None:
            reporting.trim_history(out, state.step)
    resumed = (state.step, run_key(saved[1])) if saved is not None else (None, None)
    log = RunLog.start(cfg, world, *resumed)  # the trackers of train.loggers, on rank 0
    log.config(cfg, state.step)
    print_main(
        world,
        f"{world.world_size} process(es) on {world.device}; {shard_set.total_samples} training samples; "
        f"{schedule.steps_per_epoch} steps/epoch x global batch {schedule.global_batch}; "
        f"{schedule.total_steps} steps",
    )
    return state, log


def _restore(run: Run, saved: Saved, state: TrainState) -> None:
    """Load the checkpoint into the model, optimizer, scheduler, scaler, EMA, this rank's RNG and `state`,
    and carry its data position over to this run's geometry (dist_seg.train.resume)."""
    (path, ck), ctx, world = saved, run.ctx, run.world
    resume.check_same_dataset(ck["train_state"], run.shard_set, str(path))
    args = (ctx.model, ctx.optimizer, ctx.scheduler, ctx.scaler, world.rank, ctx.ema)
    saved_state, ema_note = restore_training(ck, path, run.cfg, run.shard_set.num_classes, *args)
    state.load_state_dict(saved_state)
    if ema_note:
        print_main(world, ema_note)
    state.global_batch = run.schedule.global_batch
    if ck["train_state"].get("batch_in_epoch") and "epoch_step" not in ck["train_state"]:
        print_main(world, f"warning: {path} predates global data positions; epoch {state.epoch} restarts")
    geometry, saved_cfg = run.loader.geometry, ck.get("config", {})
    order = (run.cfg.train.seed, run.cfg.data.shuffle_shards)
    note = resume.continue_epoch(state, geometry, saved_cfg, run.shard_set, *order)
    print_main(
        world,
        f"resumed from {path} at step {state.step} (epoch {state.epoch}, step {state.epoch_step} of it)",
    )
    if note:
        print_main(world, note)
