"""One optimizer step: forward and backward over train.grad_accum micro-batches, the cross-rank skip decision,
optimizer.step(), the weight EMA and the scheduler.

The batches arrive as model inputs already on the device and in the model's memory format (the Prefetcher
copies them, TrainBatch.model_input makes the float images, channels_last included). The step reads nothing
back from the device but the all-reduced flags (and, under fp16, the GradScaler's scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dist_seg.models import unwrap
from dist_seg.runtime import distributed as D
from dist_seg.runtime import fault_injection as faults
from dist_seg.runtime.precision import autocast
from dist_seg.runtime.preemption import StopRequest
from dist_seg.train.ema import WeightEMA


@dataclass
class StepContext:
    """What a step trains with: built once by loop._build, shared by every step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None  # fp16 only
    loss_fn: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    clip_grad: float | None
    max_nonfinite: int
    params: list[nn.Parameter] = field(default_factory=list)  # the ones that train: clipped together
    ema: WeightEMA | None = None  # train.ema_decay: moved after every step that updated the weights
    stop: StopRequest | None = None  # set by a stop signal; every rank learns of it at the next step
    # (name, its trainable parameters) per top-level block of the model: train/grad_norm/<block>
    blocks: list[tuple[str, list[nn.Parameter]]] = field(default_factory=list)


@dataclass
class StepOutput:
    """What one step did: its loss and gradient norm, left on the device, and the flags every rank agreed
    on."""

    loss: torch.Tensor  # 0-dim, on the device: read back only when a progress line is logged
    grad_norm: torch.Tensor  # 0-dim, on the device
    skipped: bool  # no optimizer update this step (non-finite loss or gradients on some rank)
    loss_scale: float
    nonfinite_loss: bool  # the loss itself was non-finite on some rank (fp16 scale tuning alone is not)
    stop_requested: bool = False  # a stop signal reached some rank: checkpoint and exit
    # the gradient norm of each of StepContext.blocks, before clipping; on the device (None: no blocks)
    block_grad_norms: torch.Tensor | None = None


def train_step(ctx: StepContext, batches: list[tuple[torch.Tensor, torch.Tensor]], step: int) -> StepOutput:
    """One optimizer step over len(batches) micro-batches (gradient accumulation). Each batch is (float
    images, int64 masks) on ctx.device, the images in the model's memory format."""
    ctx.model.train()
    total = torch.zeros((), device=ctx.device)
    for i, (images, masks) in enumerate(batches):
        # gradients are all-reduced only on the last micro-step
        with D.no_sync_if(ctx.model, i < len(batches) - 1), autocast(ctx.device, ctx.amp_dtype):
            loss = ctx.loss_fn(ctx.model(images), masks) / len(batches)
            loss = faults.poison_loss(loss, step)
            (ctx.scaler.scale(loss) if ctx.scaler is not None else loss).backward()
        total += loss.detach().float()
    if ctx.scaler is not None:
        ctx.scaler.unscale_(ctx.optimizer)
    max_norm = ctx.clip_grad if ctx.clip_grad is not None else math.inf
    blocks = block_grad_norms(ctx.blocks, ctx.device)  # before clipping scales the gradients
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
    return StepOutput(total, grad_norm.detach(), nonfinite, float(scale), bad_loss, flags[2], blocks)


def parameter_blocks(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """The model's trainable parameters by top-level block (the first part of their name inside any DDP or
    torch.compile wrapper: encoder, fc6, fc7, decoder, classifier, aux for the VGG models), in model order."""
    blocks: dict[str, list[nn.Parameter]] = {}
    for name, p in unwrap(model).named_parameters():
        if p.requires_grad:
            blocks.setdefault(name.split(".")[0], []).append(p)
    return list(blocks.items())


def block_grad_norms(
    blocks: list[tuple[str, list[nn.Parameter]]], device: torch.device
) -> torch.Tensor | None:
    """The 2-norm of each block's gradients (0 for a block without any this step): where the gradient
    goes. A stalled DeconvNet shows a decoder that learns while the encoder's gradient, which reaches it
    only through the 1x1 fc6/fc7 code, stays small. Their root-sum-square is the global norm. Nothing is
    read back: the values stay on the device."""
    if not blocks:
        return None
    norms = []
    for _, params in blocks:
        grads = [p.grad.detach() for p in params if p.grad is not None]
        if grads:
            per_tensor = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
            norms.append(torch.linalg.vector_norm(per_tensor))
        else:
            norms.append(torch.zeros((), device=device))
    return torch.stack(norms)


def _skip_scaler_step(scaler: torch.amp.GradScaler) -> None:
    """What GradScaler.update() does after an inf/NaN: back off the scale and restart the growth count
    (the skip is decided across ranks, so this scaler's own found-inf record may be clean)."""
    scaler.update(scaler.get_scale() * scaler.get_backoff_factor())  # also clears the per-step unscale record
    state = scaler.state_dict()
    state["_growth_tracker"] = 0
    scaler.load_state_dict(state)
