"""The model contract and the registry: registration checks every declared attribute and names what is
wrong; the registry is what `model.name` may be; a new model is one registered class."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from dist_seg.config.reference import field_docs
from dist_seg.config.schema import ModelConfig
from dist_seg.models import MODEL_NAMES, build_model, input_constraints, registry
from dist_seg.models.base import CONTRACT_ATTRIBUTES, ContractError, SegmentationModel


class _Toy(SegmentationModel):
    """The smallest model meeting the contract: a 1x1 conv, with a decoder that needs a multiple of 4."""

    size_divisor = 4
    min_size = 8
    param_groups = ("encoder", "classifier")
    pretrained_fc: dict[str, str] = {}
    pretrained_notes = ("nothing to load",)

    def __init__(self, num_classes: int, width_mult: float = 1.0) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(3, 4, 3, padding=1)
        self.classifier = nn.Conv2d(4, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.classifier(self.encoder(x))

    def load_pretrained(self, source: str) -> dict[str, Any]:
        return {"loaded": [], "missing": [], "unexpected": [], "notes": list(self.pretrained_notes)}


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations in a test stay in the test."""
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))


def _without(attr: str) -> type:
    """_Toy with `attr` missing (a subclass cannot delete an inherited attribute, so build the class anew)."""
    body = {k: v for k, v in vars(_Toy).items() if k not in (attr, "__dict__", "__weakref__", "__qualname__")}
    return type("Broken", (SegmentationModel,), body)


@pytest.mark.parametrize("attr", CONTRACT_ATTRIBUTES)
def test_registration_refuses_a_model_missing_an_attribute_naming_it(
    attr: str, scratch_registry: None
) -> None:
    with pytest.raises(ContractError, match=rf"model 'broken' .*Broken.*missing class attribute {attr}\b"):
        registry.register("broken")(_without(attr))
    assert "broken" not in registry.model_names()


@pytest.mark.parametrize(
    ("attr", "value"),
    [
        ("size_divisor", 0),
        ("size_divisor", 32.0),
        ("min_size", True),
        ("param_groups", ()),
        ("param_groups", ("encoder.features",)),
        ("param_groups", ["encoder"]),
        ("pretrained_fc", {"classifier.0": 1}),
        ("pretrained_notes", "a str, not a tuple"),
    ],
)
def test_registration_refuses_an_invalid_attribute_naming_it(
    attr: str, value: Any, scratch_registry: None
) -> None:
    bad = type("Bad", (_Toy,), {attr: value})
    with pytest.raises(ContractError, match=rf"model 'bad' .*: {attr} must be"):
        registry.register("bad")(bad)


def test_registration_refuses_other_contract_breaches(scratch_registry: None) -> None:
    with pytest.raises(ContractError, match=r"must be a subclass of .*SegmentationModel"):
        registry.register("plain")(nn.Conv2d)
    with pytest.raises(ContractError, match=r"pretrained_fc maps into \['fc6.0'\], outside param_groups"):
        registry.register("fc")(type("Fc", (_Toy,), {"pretrained_fc": {"classifier.0": "fc6.0"}}))
    with pytest.raises(ContractError, match=r"does not implement load_pretrained"):
        registry.register("noload")(_without("load_pretrained"))
    with pytest.raises(ContractError, match=r"model 'deconvnet' is registered twice"):
        registry.register("deconvnet")(_Toy)


def test_a_new_model_is_one_registered_class(scratch_registry: None) -> None:
    """Registered, it builds from a config, declares its constraints and pads like the others."""
    registry.register("toy")(_Toy)
    model = build_model(ModelConfig(name="toy"), 3)
    assert model.model_name == "toy" and input_constraints(model) == (4, 8)
    assert model(torch.zeros(1, 3, 8, 12)).shape == (1, 3, 8, 12)
    with pytest.raises(ValueError, match=r"_Toy input 8x10: H and W must be multiples of 4 and >= 8"):
        model(torch.zeros(1, 3, 8, 10))
    assert build_model(ModelConfig(name="toy", pretrained="x.pth"), 3).pretrained_report["notes"] == [
        "nothing to load"
    ]


def test_parameters_outside_the_declared_groups_are_refused_at_build(scratch_registry: None) -> None:
    registry.register("stray")(type("Stray", (_Toy,), {"param_groups": ("encoder",)}))
    with pytest.raises(ContractError, match=r"model 'stray': parameters under \['classifier'\] are outside"):
        build_model(ModelConfig(name="stray"), 3)
    registry.register("extra")(type("Extra", (_Toy,), {"param_groups": ("encoder", "decoder", "classifier")}))
    with pytest.raises(ContractError, match=r"declares \['decoder'\], which hold no parameter"):
        build_model(ModelConfig(name="extra"), 3)


def test_model_names_come_from_the_registry() -> None:
    assert MODEL_NAMES == registry.model_names()
    assert MODEL_NAMES[:3] == ("deconvnet", "deeplab_v1", "fcn8s")
    for name in MODEL_NAMES:
        assert registry.model_class(name).model_name == name
    with pytest.raises(ValueError, match=r"model.name='segnet': expected one of deconvnet, deeplab_v1"):
        registry.model_class("segnet")


def test_the_model_name_docstring_names_exactly_the_registered_models() -> None:
    """The docstring is the README's config reference row, so users read the true list there."""
    doc = field_docs(ModelConfig)["name"]
    assert tuple(doc.removesuffix(".").split(" | ")) == MODEL_NAMES, (
        f"dist_seg/config/schema.py ModelConfig.name says {doc!r}; the registry has {' | '.join(MODEL_NAMES)}"
    )
