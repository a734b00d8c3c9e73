"""Models: `build_model(cfg.model, num_classes)`, `input_constraints(model)` and the registry's names.

Every model is a dist_seg.models.base.SegmentationModel registered with dist_seg.models.registry.register in
its own module: forward takes [N, 3, H, W] floats and returns logits [N, num_classes, H, W] at the input size
(in training mode, a VGG model built with `model.aux_loss` > 0 returns a TrainOutput of both heads' logits);
the class declares size_divisor and min_size (evaluation and prediction pad inputs to meet them), the
top-level modules holding its parameters (VGG-based models: `encoder.*` with the VGG16-BN convs, `fc6.*`,
`fc7.*`, `decoder.*`, `classifier.*`; torchvision models: `backbone.*`, `classifier.*`) and how it loads
pretrained weights. Importing this package imports every module in it, so each model registers itself.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil

from torch import nn

from dist_seg.config.schema import ModelConfig
from dist_seg.models.base import TrainOutput, check_parameter_names, constraint
from dist_seg.models.registry import model_class, model_names, registered
from dist_seg.models.vgg import VGGSegmenter, format_load_report, load_pretrained_vgg

logger = logging.getLogger(__name__)

# Every module of the package, so that a new model file needs no import list edited here to register.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

MODEL_NAMES: tuple[str, ...] = model_names()
VGG_MODELS: dict[str, type[nn.Module]] = {
    name: cls for name, cls in registered().items() if issubclass(cls, VGGSegmenter)
}  # the models on the VGG16-BN encoder: their width scales with model.width_mult


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The model `cfg.name` with `num_classes` outputs, width-scaled by cfg.width_mult, with an auxiliary head
    when cfg.aux_loss > 0 (VGG models only), with cfg.pretrained loaded when set (the load report is logged and kept as `model.pretrained_report`)."""
    if num_classes < 2:
        raise ValueError(f"model.num_classes={num_classes}: need at least 2 classes (background + one)")
    cls = model_class(cfg.name)
    if cfg.aux_loss > 0 and not issubclass(cls, VGGSegmenter):
        raise ValueError(
            f"model.aux_loss={cfg.aux_loss}: only the VGG16-BN models ({', '.join(VGG_MODELS)}) have an "
            f"auxiliary head; set model.aux_loss=0 for model.name={cfg.name}"
        )
    extra = {"aux_loss": True} if cfg.aux_loss > 0 else {}
    model = cls(num_classes, width_mult=cfg.width_mult, **extra)
    check_parameter_names(model)  # cheap, and optimizer groups are written against these names
    if cfg.pretrained is not None:
        model.pretrained_report = model.load_pretrained(cfg.pretrained)
    return model


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
    """(size_divisor, min_size) of a (possibly wrapped) model: H and W must be multiples of size_divisor and
    at least min_size; pad with dist_seg.data.loading.transforms.padded_size. A model that does not declare
    them is a ContractError (no default: a divisor silently taken as 1 fails on an awkward image size)."""
    inner = unwrap(model)
    return constraint(inner, "size_divisor"), constraint(inner, "min_size")


__all__ = [
    "MODEL_NAMES",
    "TrainOutput",
    "VGG_MODELS",
    "build_model",
    "input_constraints",
    "load_pretrained_vgg",
    "pretrained_summary",
    "unwrap",
]
