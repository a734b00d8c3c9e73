"""Model registry: `build_model(cfg.model, num_classes)` and `input_constraints(model)`.

Every model's forward takes [N, 3, H, W] floats and returns logits [N, num_classes, H, W] at the input size.
Models carry `size_divisor` and `min_size`: the H/W multiple and minimum they need; evaluation and prediction
pad inputs to satisfy them. Parameter names: VGG-based models keep their VGG16-BN convs under `encoder.*`
(fc6/fc7 are `fc6.*`/`fc7.*`), the rest under `decoder.*` and `classifier.*`; torchvision models keep
`backbone.*` and `classifier.*`.
"""

from __future__ import annotations

import logging

from torch import nn

from dist_seg.config.schema import ModelConfig
from dist_seg.models.deconvnet import DeconvNet
from dist_seg.models.deeplab import DeepLabV1LargeFOV
from dist_seg.models.fcn import FCN8s
from dist_seg.models.tv import TORCHVISION_MODELS, build_torchvision
from dist_seg.models.vgg import format_load_report, load_pretrained_vgg

logger = logging.getLogger(__name__)

VGG_MODELS: dict[str, type[nn.Module]] = {
    "deconvnet": DeconvNet,
    "deeplab_v1": DeepLabV1LargeFOV,
    "fcn8s": FCN8s,
}
MODEL_NAMES: tuple[str, ...] = tuple(VGG_MODELS) + TORCHVISION_MODELS


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The model `cfg.name` with `num_classes` outputs, width-scaled by cfg.width_mult, with cfg.pretrained
    loaded when set (the load report is logged and kept as `model.pretrained_report`)."""
    if num_classes < 2:
        raise ValueError(f"model.num_classes={num_classes}: need at least 2 classes (background + one)")
    if cfg.name in VGG_MODELS:
        model = VGG_MODELS[cfg.name](num_classes, width_mult=cfg.width_mult)
        if cfg.pretrained is not None:
            model.pretrained_report = load_pretrained_vgg(model, cfg.pretrained)
        return model
    if cfg.name in TORCHVISION_MODELS:
        return build_torchvision(cfg.name, num_classes, cfg.width_mult, cfg.pretrained)
    raise ValueError(f"model.name={cfg.name!r}: expected one of {', '.join(MODEL_NAMES)}")


def pretrained_summary(model: nn.Module, source: str) -> str | None:
    """The pretrained-weights load report of a built model as log lines (None when nothing was loaded)."""
    report = getattr(unwrap(model), "pretrained_report", None)
    return format_load_report(report, source) if report is not None else None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def input_constraints(model: nn.Module) -> tuple[int, int]:
    """(size_divisor, min_size): H and W must be multiples of size_divisor and at least min_size."""
    inner = unwrap(model)
    return int(getattr(inner, "size_divisor", 1)), int(getattr(inner, "min_size", 1))


def padded_side(size: int, model: nn.Module) -> int:
    """The smallest square side >= `size` that satisfies the model's input constraints (one int; the
    loaders' per-image (h, w) rounding is dist_seg.data.loading.transforms.padded_size)."""
    divisor, min_size = input_constraints(model)
    size = max(size, min_size)
    return -(-size // divisor) * divisor


__all__ = [
    "MODEL_NAMES",
    "build_model",
    "input_constraints",
    "padded_side",
    "pretrained_summary",
    "unwrap",
    "load_pretrained_vgg",
]
