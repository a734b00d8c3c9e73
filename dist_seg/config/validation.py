"""The value checks of a Config that its types cannot express: choices, ranges, combinations of keys; each
failure is a ValueError naming the dotted key (raised by dist_seg.config.loading before any process group)."""

from __future__ import annotations

import math
import re
from typing import Any

from dist_seg.config.schema import CHOICES, Config, TrainConfig
from dist_seg.runtime.preemption import parse_signals

_POSITIVE: tuple[str, ...] = (
    "data.crop_size",
    "data.batch_size",
    "data.eval_batch_size",
    "train.log_every",
    "train.grad_accum",
    "train.max_nonfinite",
    "train.timeout_s",
    "train.powersgd_rank",
)


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> Config:
    """Check value ranges and choices that the type system cannot; raise ValueError naming the key."""
    parse_signals(cfg.train.stop_signals)  # names a signal a process can catch
    for key, choices in CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ValueError(f"config key {key}={_get(cfg, key)!r}: expected one of {', '.join(choices)}")
    for key in _POSITIVE:
        if _get(cfg, key) < 1:
            raise ValueError(f"config key {key}={_get(cfg, key)!r}: must be >= 1")
    if cfg.data.num_workers < 0:
        raise ValueError(f"config key data.num_workers={cfg.data.num_workers}: must be >= 0")
    if not 0 < cfg.data.scale_min <= cfg.data.scale_max:
        raise ValueError(
            f"config keys data.scale_min={cfg.data.scale_min}, data.scale_max={cfg.data.scale_max}: "
            "need 0 < scale_min <= scale_max"
        )
    if cfg.train.early_stop_patience is not None and cfg.train.early_stop_patience < 1:
        raise ValueError(
            f"config key train.early_stop_patience={cfg.train.early_stop_patience}: must be >= 1 or null"
        )
    if cfg.train.early_stop_patience is not None and not cfg.data.val_shards:
        raise ValueError(
            f"config key train.early_stop_patience={cfg.train.early_stop_patience} needs data.val_shards: "
            "early stopping watches the validation mIoU"
        )
    if cfg.train.powersgd_start_step < 2:
        # torch's PowerSGD needs >= 2 plain steps: DDP rebuilds its buckets after the first iteration
        raise ValueError(
            f"config key train.powersgd_start_step={cfg.train.powersgd_start_step}: must be >= 2"
        )
    _validate_loggers(cfg.train)
    if cfg.train.ema_decay is not None and not 0.0 < cfg.train.ema_decay < 1.0:
        raise ValueError(f"config key train.ema_decay={cfg.train.ema_decay}: must be in (0, 1) or null")
    if cfg.crf.iterations < 0:
        raise ValueError(f"config key crf.iterations={cfg.crf.iterations}: must be >= 0")
    for key in ("crf.bilateral_xy_std", "crf.bilateral_rgb_std", "crf.gaussian_xy_std"):
        if _get(cfg, key) <= 0:
            raise ValueError(f"config key {key}={_get(cfg, key)!r}: must be > 0")
    if cfg.data.remote_retries < 0:
        raise ValueError(f"config key data.remote_retries={cfg.data.remote_retries}: must be >= 0")
    for key in ("data.remote_timeout_s", "data.cache_max_gb"):
        if _get(cfg, key) <= 0:
            raise ValueError(f"config key {key}={_get(cfg, key)!r}: must be > 0")
    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3:
        raise ValueError("config keys data.mean and data.std need 3 values (RGB)")
    if cfg.model.width_mult <= 0:
        raise ValueError(f"config key model.width_mult={cfg.model.width_mult}: must be > 0")
    if not (math.isfinite(cfg.model.aux_loss) and cfg.model.aux_loss >= 0):
        raise ValueError(
            f"config key model.aux_loss={cfg.model.aux_loss}: must be a finite weight >= 0 (0 = none)"
        )
    if cfg.model.num_classes is not None and not 2 <= cfg.model.num_classes <= 255:
        raise ValueError(f"config key model.num_classes={cfg.model.num_classes}: must be in 2..255")
    if cfg.train.max_steps is not None and cfg.train.max_steps < 1:
        raise ValueError(f"config key train.max_steps={cfg.train.max_steps}: must be >= 1 or null")
    if cfg.train.epochs < 1:
        raise ValueError(f"config key train.epochs={cfg.train.epochs}: must be >= 1")
    if cfg.loss.name == "focal" and cfg.loss.label_smoothing != 0.0:
        # the focal loss has no smoothed-target form here; ignoring the key silently would change the recipe
        raise ValueError(
            f"config keys loss.name=focal and loss.label_smoothing={cfg.loss.label_smoothing}: the focal loss "
            "does not support label smoothing; set loss.label_smoothing=0 or use loss.name=ce / ce+dice"
        )
    if len(cfg.optim.betas) != 2:
        raise ValueError(f"config key optim.betas={cfg.optim.betas}: needs two values")
    return cfg


# train.loggers names; dist_seg.train.tracking.BUILTIN builds each (a test keeps the two the same)
BUILTIN_LOGGERS = ("tensorboard", "mlflow", "wandb")


def _validate_loggers(t: TrainConfig) -> None:
    """train.loggers: built-in names or `module:Class`, each once (whether they import is the preflight's)."""
    for name in t.loggers:
        if name not in BUILTIN_LOGGERS and not re.fullmatch(r"[\w.]+:\w+", name):
            raise ValueError(
                f"config key train.loggers={t.loggers}: {name!r} is neither one of "
                f"{', '.join(BUILTIN_LOGGERS)} nor `package.module:Class`"
            )
    if len(set(t.loggers)) != len(t.loggers):
        raise ValueError(f"config key train.loggers={t.loggers}: a logger is named twice")
    if t.logger_timeout_s <= 0:
        raise ValueError(f"config key train.logger_timeout_s={t.logger_timeout_s}: must be > 0")
