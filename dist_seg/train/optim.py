"""Optimizer parameter groups that cannot forget a module, the optimizers, and the LR schedules.

Groups come from `optim.groups`, matched in order with fnmatch on parameter names (first match wins).
Every trainable parameter lands in exactly one torch param group: a listed group, or the implicit
`default` group at the base lr. Users once listed only `encoder.*` and the decoder silently never trained;
here the decoder falls into `default` and trains at optim.lr, and the start-up table shows it.
A pattern that matches no parameter is an error (a typo must not leave the encoder at full lr).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from dist_seg.config.schema import OptimConfig, SchedConfig

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


@dataclass
class ParamGroupSummary:
    pattern: str
    """The group's name: its pattern, `default`, a `/no_decay` suffix for the weight-decay-free copy, or
    `frozen` for parameters with requires_grad=False (those are in no optimizer group)."""
    params: int
    """Number of scalars."""
    tensors: int
    """Number of parameter tensors."""
    lr: float
    """Base lr x lr_mult (before the schedule's factor)."""
    weight_decay: float
    frozen: bool = False
    modules: list[str] = field(default_factory=list)
    """Top-level modules with parameters in this group (shows at a glance where e.g. the decoder went)."""


def _param_name(name: str) -> str:
    """Names as the user sees them in the model, without DDP's `module.` or torch.compile's `_orig_mod.`."""
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def _no_decay_names(model: nn.Module) -> set[str]:
    """Biases and the weights of normalisation layers (any module whose class name says Norm counts, so
    custom SyncBatchNorm variants are covered too)."""
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        is_norm = isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__
        for p_name, _ in module.named_parameters(recurse=False):
            if is_norm or p_name == "bias":
                names.add(_param_name(f"{mod_name}.{p_name}" if mod_name else p_name))
    return names


def build_optimizer(
    model: nn.Module, cfg: OptimConfig
) -> tuple[torch.optim.Optimizer, list[ParamGroupSummary]]:
    """The optimizer `cfg.name` over param groups built from `cfg.groups`; see the module docstring.

    Each torch param group carries `name` and `lr_mult`. The returned ParamGroupSummary list describes
    optimizer.param_groups in the same order, followed by one `frozen` entry when frozen parameters exist.
    """
    named = [(_param_name(n), p) for n, p in model.named_parameters()]
    patterns = [g.params for g in cfg.groups]
    matched: list[list[tuple[str, nn.Parameter]]] = [[] for _ in patterns]
    default: list[tuple[str, nn.Parameter]] = []
    frozen: list[tuple[str, nn.Parameter]] = []
    hits = [0] * len(patterns)  # parameters each pattern matches
    wins = [0] * len(patterns)  # parameters whose first match it is
    for name, p in named:
        first = None
        for i, pattern in enumerate(patterns):
            if fnmatchcase(name, pattern):
                hits[i] += 1
                first = i if first is None else first
        if first is not None:
            wins[first] += 1
        if not p.requires_grad:
            frozen.append((name, p))
        elif first is None:
            default.append((name, p))
        else:
            matched[first].append((name, p))
    for i, pattern in enumerate(patterns):
        if hits[i] == 0:
            raise ValueError(f"optim.groups[{i}].params={pattern!r} matches no parameter of the model")
        if wins[i] == 0:
            raise ValueError(
                f"optim.groups[{i}].params={pattern!r}: every parameter it matches is taken by an earlier "
                "group (first match wins), so this group would be empty"
            )

    no_decay = _no_decay_names(model) if cfg.no_decay_norm_and_bias else set()
    torch_groups: list[dict] = []
    summaries: list[ParamGroupSummary] = []

    def add(name: str, members: list[tuple[str, nn.Parameter]], lr_mult: float, wd: float) -> None:
        if not members:
            return
        params = [p for _, p in members]
        torch_groups.append(
            {"params": params, "lr": cfg.lr * lr_mult, "weight_decay": wd, "name": name, "lr_mult": lr_mult}
        )
        summaries.append(
            ParamGroupSummary(
                name,
                sum(p.numel() for p in params),
                len(params),
                cfg.lr * lr_mult,
                wd,
                modules=_tops(members),
            )
        )

    specs = [(g.params, m, g.lr_mult, g.weight_decay) for g, m in zip(cfg.groups, matched, strict=True)]
    specs.append(("default", default, 1.0, None))
    for name, members, lr_mult, wd in specs:
        wd = cfg.weight_decay if wd is None else wd
        add(name, [m for m in members if m[0] not in no_decay], lr_mult, wd)
        add(f"{name}/no_decay", [m for m in members if m[0] in no_decay], lr_mult, 0.0)
    if frozen:
        size = sum(p.numel() for _, p in frozen)
        summaries.append(
            ParamGroupSummary("frozen", size, len(frozen), 0.0, 0.0, frozen=True, modules=_tops(frozen))
        )

    _check_coverage(named, torch_groups)
    if not torch_groups:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    return _make_optimizer(torch_groups, cfg), summaries


def _check_coverage(named: list[tuple[str, nn.Parameter]], torch_groups: list[dict[str, Any]]) -> None:
    """Every trainable parameter in exactly one group: a real error, not an assert (`python -O` drops those),
    because a parameter left out trains silently at lr 0 (the users' decoder-left-out bug)."""
    counts: dict[int, int] = {}
    for g in torch_groups:
        for p in g["params"]:
            counts[id(p)] = counts.get(id(p), 0) + 1
    missing = [n for n, p in named if p.requires_grad and id(p) not in counts]
    twice = [n for n, p in named if counts.get(id(p), 0) > 1]
    extra = len(set(counts) - {id(p) for _, p in named if p.requires_grad})
    if missing or twice or extra:
        raise RuntimeError(
            "optimizer parameter groups do not cover the model's trainable parameters exactly once: "
            f"missing {missing[:10]}, in several groups {twice[:10]}, {extra} not trainable in the model"
        )


def _tops(members: list[tuple[str, nn.Parameter]]) -> list[str]:
    return list(dict.fromkeys(name.split(".")[0] for name, _ in members))


def _make_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=betas)
    raise ValueError(f"optim.name={cfg.name!r}: expected one of sgd, adamw, adam")


def format_groups(summaries: list[ParamGroupSummary]) -> str:
    """The start-up table: one row per group with its pattern, size, lr and weight decay."""
    rows = [("group", "tensors", "params", "lr", "weight_decay", "modules")]
    for g in summaries:
        lr = "frozen" if g.frozen else f"{g.lr:.3g}"
        rows.append(
            (
                g.pattern,
                str(g.tensors),
                f"{g.params:,}",
                lr,
                "-" if g.frozen else f"{g.weight_decay:.3g}",
                ", ".join(g.modules),
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if c in (0, 5) else cell.rjust(w)
            for c, (cell, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]
    trainable = sum(g.params for g in summaries if not g.frozen)
    lines.append(f"trainable parameters: {trainable:,}")
    return "\n".join(lines)


def lr_factor(step: int, cfg: SchedConfig, total_steps: int) -> float:
    """Multiplier on each group's lr after `step` optimizer steps: the schedule times a linear warm-up
    (warm-up multiplies the schedule, so the curve is continuous where warm-up ends)."""
    s = min(step, total_steps)
    if cfg.name == "poly":
        f = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 - s / total_steps) ** cfg.power
    elif cfg.name == "cosine":
        f = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * s / total_steps))
    elif cfg.name == "step":
        f = cfg.gamma ** (step // cfg.step_size)
    elif cfg.name == "constant":
        f = 1.0
    else:
        raise ValueError(f"sched.name={cfg.name!r}: expected one of poly, cosine, step, constant")
    if step < cfg.warmup_steps:
        alpha = step / cfg.warmup_steps
        f *= cfg.warmup_factor * (1 - alpha) + alpha
    return f


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedConfig, total_steps: int) -> LRScheduler:
    """LambdaLR giving each group base lr x lr_mult x lr_factor(step); step it once per optimizer step.

    Its state_dict (step count, base lrs) round-trips for resume; the factor itself is rebuilt from config.
    """
    if total_steps < 1:
        raise ValueError(f"total optimizer steps must be >= 1 for the LR schedule, got {total_steps}")
    if cfg.step_size < 1:
        raise ValueError(f"sched.step_size={cfg.step_size}: must be >= 1")
    if cfg.warmup_steps < 0 or not 0 < cfg.warmup_factor <= 1:
        raise ValueError(
            f"sched.warmup_steps={cfg.warmup_steps}, sched.warmup_factor={cfg.warmup_factor}: "
            "need warmup_steps >= 0 and 0 < warmup_factor <= 1"
        )
    lr_factor(0, cfg, total_steps)  # unknown names fail here, not at the first step

    # a plain closure (not a callable object) so LambdaLR's state_dict does not pickle config into checkpoints
    def factor(step: int) -> float:
        return lr_factor(step, cfg, total_steps)

    return LambdaLR(optimizer, factor)
