"""The training loop: fit() -> epochs of train_step(), _validate() (inference.compute_confusion on the val
shards), checkpoints. Read it top to bottom.

Step arithmetic: one optimizer step consumes train.grad_accum loader batches on every rank, i.e.
data.batch_size x world_size x train.grad_accum images. Every rank runs exactly the same number of steps
(the loader guarantees the batch count), so DDP never waits on a rank that ran out of data.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from dist_seg.checkpoint import (
    CheckpointManager,
    load_checkpoint,
    restore_training,
    training_checkpoint,
)
from dist_seg.config.schema import Config, save_config, to_yaml
from dist_seg.data.format.remote import RemoteOptions
from dist_seg.data.format.shards import ShardSet, dataset_classes
from dist_seg.data.loading.colour import Prefetcher
from dist_seg.data.loading.eval_loader import build_eval_loader
from dist_seg.data.loading.train_loader import TRAIN_TENSORS, TrainLoader, build_train_loader
from dist_seg.infer.scoring import compute_confusion
from dist_seg.models import build_model, input_constraints, pretrained_summary, unwrap
from dist_seg.runtime import distributed as D
from dist_seg.runtime import fault_injection as faults
from dist_seg.runtime.precision import AMP_DTYPES, autocast
from dist_seg.runtime.preemption import Preempted, StopRequest, clear_marker
from dist_seg.runtime.rng_state import capture_rng_state
from dist_seg.train import reporting, resume
from dist_seg.train.ema import WeightEMA
from dist_seg.train.losses import build_loss, load_class_weights
from dist_seg.train.optim import build_optimizer, build_scheduler, format_groups
from dist_seg.train.state import Plan, TrainState
from dist_seg.train.tensorboard import TBLogger


@dataclass
class StepContext:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    loss_fn: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    clip_grad: float | None
    channels_last: bool
    max_nonfinite: int
    params: list[nn.Parameter] = field(default_factory=list)
    ema: WeightEMA | None = None  # train.ema_decay: moved after every step that updated the weights
    stop: StopRequest | None = None  # set by a stop signal; every rank learns of it at the next step


@dataclass
class StepOutput:
    loss: torch.Tensor  # 0-dim, on the device: read back only when a progress line is logged
    grad_norm: torch.Tensor  # 0-dim, on the device
    skipped: bool  # no optimizer update this step (non-finite loss or gradients on some rank)
    loss_scale: float
    nonfinite_loss: bool  # the loss itself was non-finite on some rank (fp16 scale tuning alone is not)
    stop_requested: bool = False  # a stop signal reached some rank: checkpoint and exit


def to_device(t: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    t = t.to(device, non_blocking=True)
    return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


def train_step(ctx: StepContext, batches: list[tuple[torch.Tensor, torch.Tensor]], step: int) -> StepOutput:
    """One optimizer step over len(batches) micro-batches (gradient accumulation)."""
    ctx.model.train()
    total = torch.zeros((), device=ctx.device)
    for i, (images, masks) in enumerate(batches):
        images, masks = to_device(images, ctx.device, ctx.channels_last), to_device(masks, ctx.device)
        # gradients are all-reduced only on the last micro-step
        with D.no_sync_if(ctx.model, i < len(batches) - 1), autocast(ctx.device, ctx.amp_dtype):
            loss = ctx.loss_fn(ctx.model(images), masks) / len(batches)
            loss = faults.poison_loss(loss, step)
            (ctx.scaler.scale(loss) if ctx.scaler is not None else loss).backward()
        total += loss.detach().float()
    if ctx.scaler is not None:
        ctx.scaler.unscale_(ctx.optimizer)
    max_norm = ctx.clip_grad if ctx.clip_grad is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(ctx.params, max_norm)
    # every rank takes the same branch: a rank that stepped alone would desynchronise the replicas. The
    # flags are made and all-reduced on the device, and read back once: the step's one host sync
    stop = ctx.stop is not None and ctx.stop.requested
    local = torch.stack(
        [~torch.isfinite(total), ~torch.isfinite(grad_norm), torch.full((), stop, device=ctx.device)]
    )
    flags = D.any_rank_flags_tensor(local)
    nonfinite, bad_loss = flags[0] or flags[1], flags[0]
    if nonfinite:
        if ctx.scaler is not None:
            _skip_scaler_step(ctx.scaler)
    elif ctx.scaler is not None:
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        ctx.optimizer.step()
    if ctx.ema is not None and not nonfinite:
        ctx.ema.update(ctx.model)
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.scheduler.step()
    # fp16 only: GradScaler reads its found-inf flag back every step anyway
    scale = ctx.scaler.get_scale() if ctx.scaler is not None else 1.0
    return StepOutput(total, grad_norm.detach(), nonfinite, float(scale), bad_loss, flags[2])


def _skip_scaler_step(scaler: torch.amp.GradScaler) -> None:
    """What GradScaler.update() does after an inf/NaN: back off the scale and restart the growth count
    (the skip is decided across ranks, so this scaler's own found-inf record may be clean)."""
    scaler.update(scaler.get_scale() * scaler.get_backoff_factor())  # also clears the per-step unscale record
    state = scaler.state_dict()
    state["_growth_tracker"] = 0
    scaler.load_state_dict(state)


def _log(world: D.World, msg: str) -> None:
    if world.is_main:
        print(msg, flush=True)


def _save(
    cfg: Config,
    world: D.World,
    ctx: StepContext,
    state: TrainState,
    ckpts: CheckpointManager,
    is_best: bool,
    num_classes: int,
    names: list[str],
) -> None:
    """A collective (the RNG states of every rank are gathered); rank 0 writes."""
    rng = D.all_gather_object(capture_rng_state())  # every rank's RNG, so each restores its own
    ck = training_checkpoint(
        cfg,
        ctx.model,
        ctx.optimizer,
        ctx.scheduler,
        ctx.scaler,
        state.state_dict(),
        rng,
        num_classes,
        names,
        ctx.ema,
    )
    if world.is_main:
        ckpts.save(ck, state.step, is_best)


def _build(cfg: Config, world: D.World) -> tuple[StepContext, ShardSet, TrainLoader, Plan]:
    """Model, optimizer, scheduler, scaler, loss, the train loader and the plan, ready to step."""
    shard_set = dataset_classes(
        cfg.data.train_shards, cfg.model.num_classes, RemoteOptions.from_config(cfg.data)
    )
    num_classes = shard_set.num_classes
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg.model, num_classes).to(world.device)
    if (summary := pretrained_summary(model, str(cfg.model.pretrained))) is not None:
        _log(world, summary)
    # prepared before the optimizer is built, so the optimizer holds the parameters that train
    t = cfg.train
    compression = (t.grad_compression, (t.powersgd_rank, t.powersgd_start_step))
    model = D.prepare_model(model, world, t.sync_bn, t.channels_last, t.compile, *compression)
    optimizer, groups = build_optimizer(model, cfg.optim)
    _log(world, format_groups(groups))
    loader = build_train_loader(cfg.data, world.rank, world.world_size, cfg.train.seed)
    steps_per_epoch = loader.steps_per_epoch // cfg.train.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"{shard_set.total_samples} training samples are fewer than one optimizer step needs "
            f"(data.batch_size={cfg.data.batch_size} x {world.world_size} ranks x train.grad_accum={cfg.train.grad_accum})"
        )
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    amp_dtype = AMP_DTYPES[cfg.train.amp]
    weights = load_class_weights(cfg.loss.class_weights, shard_set.class_stats, num_classes)
    ctx = StepContext(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.sched, total_steps),
        scaler=torch.amp.GradScaler(world.device.type) if cfg.train.amp == "fp16" else None,
        loss_fn=build_loss(cfg.loss, num_classes, weights).to(world.device),
        device=world.device,
        amp_dtype=amp_dtype,
        clip_grad=cfg.train.clip_grad,
        channels_last=cfg.train.channels_last,
        max_nonfinite=cfg.train.max_nonfinite,
        params=[p for p in model.parameters() if p.requires_grad],
        ema=WeightEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay is not None else None,
    )
    return ctx, shard_set, loader, Plan.from_config(cfg, steps_per_epoch, total_steps, world.world_size)


def _stop(
    cfg: Config,
    world: D.World,
    ctx: StepContext,
    state: TrainState,
    ckpts: CheckpointManager,
    num_classes: int,
    names: list[str],
) -> NoReturn:
    """Every rank at once, after a stop signal: checkpoint the step reached, then raise Preempted."""
    _save(cfg, world, ctx, state, ckpts, False, num_classes, names)
    raise Preempted(state.step, ctx.stop.signal_name if ctx.stop is not None else None)


def _open_run(
    cfg: Config,
    world: D.World,
    ctx: StepContext,
    shard_set: ShardSet,
    plan: Plan,
    loader: TrainLoader,
    saved: tuple[Path, dict[str, Any]] | None,
) -> tuple[TrainState, TBLogger]:
    """Restore the saved checkpoint (or start at step 0) and carry its data position over to this run's
    geometry, write the run directory's config.yaml, and open TensorBoard (past a resumed step, its events are
    purged so curves do not double back)."""
    out = Path(cfg.train.out_dir)
    state = TrainState(global_batch=plan.global_batch, samples=shard_set.total_samples)
    if saved is not None:
        path, ck = saved
        resume.check_same_dataset(ck["train_state"], shard_set, str(path))
        args = (ctx.model, ctx.optimizer, ctx.scheduler, ctx.scaler, world.rank, ctx.ema)
        saved_state, ema_note = restore_training(ck, path, cfg, shard_set.num_classes, *args)
        state.load_state_dict(saved_state)
        if ema_note:
            _log(world, ema_note)
        state.global_batch = plan.global_batch
        if ck["train_state"].get("batch_in_epoch") and "epoch_step" not in ck["train_state"]:
            _log(world, f"warning: {path} predates global data positions; epoch {state.epoch} restarts")
        note = resume.continue_epoch(state, loader.geometry, ck.get("config", {}), shard_set, cfg.train.seed)
        _log(
            world,
            f"resumed from {path} at step {state.step} (epoch {state.epoch}, step {state.epoch_step} of it)",
        )
        if note:
            _log(world, note)
    state.geometry = loader.geometry.as_dict()
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        clear_marker(out)  # this run goes on from where a preempted one stopped
        save_config(cfg, out / "config.yaml")
        if saved is not None:
            reporting.trim_history(out, state.step)
    tb = TBLogger(out / "tb", enabled=world.is_main, purge_step=state.step + 1 if saved is not None else None)
    tb.text("config", to_yaml(cfg), preformatted=True)
    _log(
        world,
        f"{world.world_size} process(es) on {world.device}; {shard_set.total_samples} training samples; "
        f"{plan.steps_per_epoch} steps/epoch x global batch {plan.global_batch}; {plan.total_steps} steps",
    )
    return state, tb


def fit(cfg: Config, world: D.World, stop: StopRequest | None = None) -> dict[str, Any]:
    """Train as configured; returns the last evaluation's metrics. With `stop`, a stop signal ends the run
    with a checkpoint of the step reached and raises preemption.Preempted."""
    ckpts = CheckpointManager(Path(cfg.train.out_dir), cfg.train.keep_last)
    ckpts.before_rename = faults.before_checkpoint_rename
    path = resume.agree_on_checkpoint(ckpts, cfg, world)
    saved = (path, load_checkpoint(path, map_location="cpu")) if path is not None else None
    if saved is not None:  # the global batch belongs to the run: keep it on this world size
        cfg, note = resume.keep_global_batch(cfg, saved[1], world.world_size)
        if note:
            _log(world, note)
    ctx, shard_set, loader, plan = _build(cfg, world)
    num_classes, names, total_steps = shard_set.num_classes, shard_set.class_names, plan.total_steps
    state, tb = _open_run(cfg, world, ctx, shard_set, plan, loader, saved)
    ctx.stop = stop
    progress = reporting.Progress(cfg, world, tb, total_steps, state.step)
    metrics: dict[str, Any] = {}
    patience = cfg.train.early_stop_patience
    while state.step < total_steps and not state.patience_spent(patience):
        loader.set_position(state.data_position(plan.grad_accum))
        it = Prefetcher(iter(loader), world.device, TRAIN_TENSORS)  # the next batch copies during this step
        while not plan.epoch_done(state) and state.step < total_steps:
            faults.on_step(state.step + 1, world.rank)
            t0 = time.perf_counter()
            batches = [next(it) for _ in range(plan.grad_accum)]
            t1 = time.perf_counter()
            faults.record_keys(state.step + 1, world.rank, batches)
            inputs = [b.model_input(cfg.train.channels_last) for b in batches]  # uint8 -> float, on device
            out_step = train_step(ctx, inputs, state.step + 1)
            state.record_step(out_step, cfg.train.max_nonfinite)
            progress.add(out_step, t1 - t0, time.perf_counter() - t0, loader.skipped, loader.remote_retries)
            if plan.should_log(state.step):
                progress.log(state.step, state.epoch, ctx.optimizer)
            epoch_done = plan.epoch_done(state)
            if epoch_done:
                state.next_epoch()
            if out_step.stop_requested:
                _stop(cfg, world, ctx, state, ckpts, num_classes, names)
            evaluate_now = plan.should_evaluate(state.step, epoch_done)
            is_best = False
            if evaluate_now and cfg.data.val_shards:
                validated = _validate(cfg, world, ctx, tb, state.step, num_classes, names)
                if validated is None:  # a stop signal during the evaluation
                    _stop(cfg, world, ctx, state, ckpts, num_classes, names)
                metrics = validated
                is_best = state.record_eval(metrics["miou"])
            stop_early = state.patience_spent(patience)
            if plan.should_save(state.step, epoch_done, evaluate_now) or stop_early:
                _save(cfg, world, ctx, state, ckpts, is_best, num_classes, names)
            if stop_early:
                _log(
                    world,
                    f"early stop at step {state.step}: val mIoU has not improved for {patience} evaluations "
                    f"(best {state.best_miou:.4f}; train.early_stop_patience={patience})",
                )
                break
            if epoch_done:
                break
    if not metrics and cfg.data.val_shards:  # e.g. resumed from a finished run: still report its metrics
        metrics = _validate(cfg, world, ctx, tb, state.step, num_classes, names) or {}
    if world.is_main and metrics:
        reporting.report_hparams(cfg, tb, world.world_size, metrics)
    tb.close()
    return metrics


def _validate(
    cfg: Config,
    world: D.World,
    ctx: StepContext,
    tb: TBLogger,
    step: int,
    num_classes: int,
    names: list[str],
) -> dict[str, Any] | None:
    """Evaluate on the val shards and report; with a weight EMA, first the trained weights, then the EMA,
    whose metrics are returned (best.pt and early stopping follow them). metrics["weights"] names the weights.
    None when a stop signal cut an evaluation short."""
    divisor, min_size = input_constraints(ctx.model)
    evaluated = [("model", ctx.model)] + ([("ema", ctx.ema.module)] if ctx.ema is not None else [])
    metrics: dict[str, Any] = {}
    for weights, model in evaluated:
        primary = weights == evaluated[-1][0]
        D.broadcast_buffers_(unwrap(model))  # without SyncBN, rank 0's BN statistics for every rank
        loader = build_eval_loader(cfg.data, world.rank, world.world_size, divisor, min_size)
        keep = cfg.train.num_vis_images if world.is_main and primary else 0
        cm, kept = compute_confusion(
            model, loader, num_classes, world.device, ctx.amp_dtype, cfg.train.channels_last, keep, ctx.stop
        )
        if ctx.stop is not None and D.any_rank_flags([ctx.stop.requested], world.device)[0]:
            return None
        metrics = {**cm.compute(names), "weights": weights}
        if world.is_main:
            matrix = cm.matrix.cpu().numpy()
            reporting.report_eval(cfg, tb, step, metrics, matrix, kept, names, num_classes, primary)
    return metrics
