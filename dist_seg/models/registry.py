"""The model registry: `@register("name")` on a SegmentationModel subclass checks its contract and makes it
buildable as `model.name=name`.

Adding a model: one new module in dist_seg/models/ (dist_seg.models imports every module of the package, so
the registration runs), one `@register`, a config, and the name in the `model.name` docstring of
dist_seg.config.schema (a test keeps that docstring and the registry equal).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from dist_seg.models.base import ContractError, SegmentationModel, check_contract

M = TypeVar("M", bound=type[SegmentationModel])

# name -> class, in registration order (the order of MODEL_NAMES and of error messages)
_MODELS: dict[str, type[SegmentationModel]] = {}


def register(name: str) -> Callable[[M], M]:
    """Class decorator: check the class against the contract (ContractError naming the model and the
    missing or invalid attribute) and register it as `name`; sets `cls.model_name = name`."""

    def add(cls: M) -> M:
        check_contract(cls, name)
        if name in _MODELS and _MODELS[name] is not cls:
            raise ContractError(f"model {name!r} is registered twice: {_MODELS[name]} and {cls}")
        # one name per class: the class's model_name is what checkpoints and messages call it
        other = next((n for n, c in _MODELS.items() if c is cls and n != name), None)
        if other is not None:
            raise ContractError(f"{cls} is registered as {other!r} already; not also as {name!r}")
        cls.model_name = name
        _MODELS[name] = cls
        return cls

    return add


def model_names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_MODELS)


def model_class(name: str) -> type[SegmentationModel]:
    """The class registered as `name`; ValueError naming model.name and listing the registered models."""
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"model.name={name!r}: expected one of {', '.join(_MODELS)}") from None


def registered() -> dict[str, type[SegmentationModel]]:
    """name -> class of every registered model (a copy)."""
    return dict(_MODELS)
