"""The model contract: what every segmentation model declares, and the checks that hold it to it.

A model is an `nn.Module` subclass of `SegmentationModel`, built as `cls(num_classes, width_mult=...)`, whose
forward takes normalised images [N, 3, H, W] and returns logits [N, num_classes, H, W] at the input size (in
training mode a model built with an auxiliary head returns a `TrainOutput` of both heads' logits). The
rest of the package relies on what the class declares, so each declaration is checked when the model is
registered (dist_seg.models.registry.register) rather than defaulted where it is read:

- `size_divisor`, `min_size`: evaluation, prediction, export and `dist-seg info` pad every input to
  dist_seg.data.loading.transforms.padded_size(h, w, size_divisor, min_size). A missing divisor once read as 1,
  and a model with skip connections then failed on the first 500x375 validation image.
- `param_groups`: the top-level modules that own every parameter. `optim.groups` patterns (`encoder.*`) and
  the optimizer's start-up table (dist_seg.train.optim) name parameters by them.
- `pretrained_fc`, `pretrained_notes`, `load_pretrained`: what `model.pretrained` loads and what it cannot.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

from torch import Tensor, nn


class TrainOutput(NamedTuple):
    """What forward returns in training mode for a model built with an auxiliary head (`model.aux_loss` > 0):
    the logits and the head's logits, both [N, num_classes, H, W] at the input size. Every other forward,
    evaluation included, returns the logits tensor alone; the training loss takes either
    (dist_seg.train.losses.WithAuxLoss)."""

    logits: Tensor
    aux: Tensor


class ContractError(TypeError):
    """A model class or instance does not meet the contract: a programming error, not a user error (so not a
    ValueError, which the command lines print as a one-line config error)."""


class SegmentationModel(nn.Module):
    """Base class of every registered model. Subclasses set each class attribute below; none has a default,
    so a forgotten one is caught by `register` instead of silently meaning something. The constructor is
    `cls(num_classes, width_mult=1.0)`; a model that cannot scale its width raises ValueError naming
    model.width_mult for any other value."""

    model_name: ClassVar[str]
    """The name the model is registered under (`model.name`); set by `register`."""

    size_divisor: ClassVar[int]
    """H and W of an input must be multiples of this (>= 1): the output stride of the deepest features, or
    what skip connections, unpooling switches or upsampling need to line up."""

    min_size: ClassVar[int]
    """H and W of an input must be at least this (>= 1), e.g. DeconvNet's unpadded 7x7 fc6 needs 224."""

    param_groups: ClassVar[tuple[str, ...]]
    """The top-level modules that hold the parameters, e.g. ("encoder", "fc6", "fc7", "decoder", "classifier")
    for the VGG models, ("backbone", "classifier") for torchvision's: every parameter name starts with one of
    them plus a dot, and each holds at least one parameter (checked by `check_parameter_names`). An instance
    may extend it with modules it was built with (the VGG models' optional `aux` head)."""

    pretrained_fc: ClassVar[Mapping[str, str]]
    """Pretrained-file key prefix -> model module prefix for the weights besides the encoder/backbone, e.g.
    {"classifier.0": "fc6.0"}: VGG's fully connected fc6 reshaped into a 7x7 conv. {} when none fit."""

    pretrained_notes: ClassVar[tuple[str, ...]]
    """Sentences the pretrained-load report adds: what could not be loaded and why."""

    def load_pretrained(self, source: str) -> dict[str, Any]:
        """Load `model.pretrained` (a file path, or `torchvision` to download) into the model; return the
        report {loaded, missing, unexpected, notes} (model keys loaded, model keys left at initialisation,
        file keys unused, notes). ValueError naming the file or key when the weights do not fit."""
        raise NotImplementedError(f"{type(self).__name__} does not say how to load pretrained weights")

    def check_input(self, x: Tensor, why: str = "") -> None:
        """ValueError unless H and W of `x` meet size_divisor and min_size (for forwards that would otherwise
        fail deep inside with a shape error, or silently misalign)."""
        h, w = x.shape[-2:]
        # no min(h, w): under torch.export's symbolic sizes it would guard on how H and W compare
        if h % self.size_divisor or w % self.size_divisor or h < self.min_size or w < self.min_size:
            raise ValueError(
                f"{type(self).__name__} input {h}x{w}: H and W must be multiples of {self.size_divisor} and "
                f">= {self.min_size}" + (f" ({why})" if why else "")
            )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _names(value: Any) -> bool:
    return (
        isinstance(value, tuple)
        and bool(value)
        and all(isinstance(g, str) and g and "." not in g for g in value)
    )


def _texts(value: Any) -> bool:
    return isinstance(value, tuple) and all(isinstance(n, str) for n in value)


def _str_map(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


# attribute -> (its check, what it must be)
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "size_divisor": (_positive_int, "an int >= 1"),
    "min_size": (_positive_int, "an int >= 1"),
    "param_groups": (_names, "a non-empty tuple of top-level module names"),
    "pretrained_fc": (_str_map, "a mapping of str to str"),
    "pretrained_notes": (_texts, "a tuple of str"),
}
CONTRACT_ATTRIBUTES: tuple[str, ...] = tuple(_CHECKS)


def check_contract(cls: type, name: str) -> None:
    """ContractError naming the model and the attribute when class `cls` does not meet the contract."""
    where = f"model {name!r} ({cls.__module__}.{cls.__qualname__})"
    if not (isinstance(cls, type) and issubclass(cls, SegmentationModel)):
        raise ContractError(f"{where}: must be a subclass of dist_seg.models.base.SegmentationModel")
    for attr, (ok, what) in _CHECKS.items():
        if not hasattr(cls, attr):
            raise ContractError(f"{where}: missing class attribute {attr} (see dist_seg.models.base)")
        if not ok(getattr(cls, attr)):
            raise ContractError(f"{where}: {attr} must be {what}, not {getattr(cls, attr)!r}")
    # fc weights land in modules the model declares, so the optimizer groups see them
    outside = [v for v in cls.pretrained_fc.values() if v.split(".")[0] not in cls.param_groups]
    if outside:
        raise ContractError(
            f"{where}: pretrained_fc maps into {outside}, outside param_groups {cls.param_groups}"
        )
    if cls.load_pretrained is SegmentationModel.load_pretrained:
        raise ContractError(f"{where}: does not implement load_pretrained (see dist_seg.models.base)")


def constraint(model: nn.Module, attr: str) -> int:
    """`model.size_divisor` or `model.min_size`, checked (ContractError naming the model when missing or not a
    positive int: a silent default of 1 would pad too little and fail, or misalign, on an awkward size)."""
    value = getattr(model, attr, None)
    if not _positive_int(value):
        raise ContractError(
            f"{type(model).__name__}.{attr} is {value!r}: every model declares size_divisor and min_size as "
            "ints >= 1 (see dist_seg.models.base.SegmentationModel)"
        )
    return int(value)


def check_parameter_names(model: SegmentationModel) -> None:
    """ContractError when a parameter lies outside the model's declared `param_groups`, or a declared group
    holds none (then `optim.groups` patterns written from the declaration would match nothing)."""
    groups, name = model.param_groups, getattr(model, "model_name", type(model).__name__)
    tops = {n.split(".")[0] for n, _ in model.named_parameters()}
    outside, empty = sorted(tops - set(groups)), [g for g in groups if g not in tops]
    if outside or empty:
        raise ContractError(
            f"model {name!r}: parameters under {outside} are outside param_groups {groups}"
            if outside
            else f"model {name!r}: param_groups {groups} declares {empty}, which hold no parameter"
        )
