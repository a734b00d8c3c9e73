"""Output shapes, parameter counts, BatchNorm placement and input checks of every registered model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_seg.config.schema import ModelConfig
from dist_seg.data.loading.transforms import padded_size
from dist_seg.models import MODEL_NAMES, VGG_MODELS, build_model, input_constraints
from dist_seg.models.base import ContractError
from dist_seg.models.deconvnet import DECODER_STAGES, DeconvNet
from dist_seg.models.vgg import VGG16_CFG


def _test_width(name: str) -> float:
    """A small width where the model scales (torchvision models cannot be width-reduced)."""
    return 0.0625 if name in VGG_MODELS else 1.0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_logits_at_input_size(name: str) -> None:
    """A real forward at the smallest non-square size the model declares (kept small: the suite runs on CPU)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, width_mult=_test_width(name)), num_classes=5)
    divisor, min_size = input_constraints(model)
    h, w = padded_size(min_size, min_size + 1, divisor, min_size)
    assert w > h  # non-square: H and W are not mixed up
    with torch.no_grad():
        out = model(torch.randn(2, 3, h, w))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 5, h, w)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "width", "sizes"),
    [
        ("deconvnet", 0.03125, [(256, 288)]),
        ("deeplab_v1", 0.125, [(64, 64), (96, 128), (72, 40)]),
        ("fcn8s", 0.125, [(64, 64), (96, 160)]),
    ],
)
def test_more_sizes_of_the_vgg_models(name: str, width: float, sizes: list[tuple[int, int]]) -> None:
    model = build_model(ModelConfig(name=name, width_mult=width), num_classes=5)
    for h, w in sizes:
        with torch.no_grad():
            assert model(torch.randn(2, 3, h, w)).shape == (2, 5, h, w)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_an_awkward_image_size_works_once_padded_to_the_declared_constraints(name: str) -> None:
    """A 500x375 image (PASCAL VOC's most common size) padded by the one padding rule goes through every model
    (on the meta device: shapes are checked, nothing is computed), and the logits have the padded size."""
    with torch.device("meta"):
        model = build_model(ModelConfig(name=name, width_mult=_test_width(name)), num_classes=5).eval()
    divisor, min_size = input_constraints(model)
    h, w = padded_size(375, 500, divisor, min_size)
    assert (
        h % divisor == 0 and w % divisor == 0 and min(h, w) >= min_size and h - 375 < max(divisor, min_size)
    )
    with torch.no_grad():
        out = model(torch.empty(1, 3, h, w, device="meta"))
    assert out.shape == (1, 5, h, w)


def _paper_deconvnet_params(num_classes: int) -> int:
    """Parameter count written out from the paper's layer list (conv/deconv weight + bias, BN gamma + beta)."""

    def layer(cin: int, cout: int, k: int) -> int:
        return cin * cout * k * k + cout + 2 * cout

    total, cin = 0, 3
    for v in VGG16_CFG:
        if v != "M":
            total, cin = total + layer(cin, v, 3), v
    total += layer(512, 4096, 7) + layer(4096, 4096, 1) + layer(4096, 512, 7)  # fc6, fc7, deconv-fc6
    cin = 512
    for stage in DECODER_STAGES:
        for cout in stage:
            total, cin = total + layer(cin, cout, 3), cout
    return total + 64 * num_classes + num_classes


def test_deconvnet_has_the_papers_252m_parameters() -> None:
    with torch.device("meta"):  # no memory for 252M parameters, same shapes
        model = build_model(ModelConfig(name="deconvnet"), num_classes=21)
    n = sum(p.numel() for p in model.parameters())
    assert n == _paper_deconvnet_params(21)
    assert round(n / 1e6, 1) == 251.8


def test_width_mult_scales_every_channel() -> None:
    with torch.device("meta"):
        full = build_model(ModelConfig(name="deconvnet"), num_classes=21)
        eighth = build_model(ModelConfig(name="deconvnet", width_mult=0.125), num_classes=21)
    for (name, a), (_, b) in zip(full.named_modules(), eighth.named_modules(), strict=True):
        if isinstance(a, nn.Conv2d | nn.ConvTranspose2d):
            if a.in_channels != 3:
                assert b.in_channels * 8 == a.in_channels, name
            if name != "classifier":
                assert b.out_channels * 8 == a.out_channels, name


def test_deconvnet_has_batchnorm_after_every_conv_and_deconv() -> None:
    model = build_model(ModelConfig(name="deconvnet", width_mult=0.0625), num_classes=3)
    layers = [m for m in model.modules() if not isinstance(m, nn.Sequential | nn.ModuleList)]
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    assert len(convs) == 13 + 2 + 1 + 13 + 1  # encoder, fc6/fc7, deconv-fc6, decoder, classifier
    for i in convs:
        if layers[i] is model.classifier:
            continue
        assert isinstance(layers[i + 1], nn.BatchNorm2d), f"no BN after layer {i}: {layers[i]}"
        assert layers[i + 1].num_features == layers[i].out_channels
        assert isinstance(layers[i + 2], nn.ReLU)
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in layers) == 14


@pytest.mark.parametrize(("h", "w"), [(200, 224), (224, 240), (192, 192)])
def test_deconvnet_rejects_bad_input_size(h: int, w: int) -> None:
    model = DeconvNet(num_classes=3, width_mult=0.0625)
    with pytest.raises(ValueError, match=rf"{h}x{w}.*multiples of 32 and >= 224"):
        model(torch.zeros(1, 3, h, w))


def test_input_constraints_and_padding() -> None:
    with torch.device("meta"):
        deconv = build_model(ModelConfig(name="deconvnet", width_mult=0.125), 3)
        deeplab = build_model(ModelConfig(name="deeplab_v1", width_mult=0.125), 3)
    assert input_constraints(deconv) == (32, 224)
    assert (deconv.size_divisor, deconv.min_size) == (32, 224)
    assert input_constraints(deeplab) == (8, 8)
    assert padded_size(100, 100, *input_constraints(deconv)) == (224, 224)
    assert padded_size(500, 375, *input_constraints(deconv)) == (512, 384)
    assert padded_size(513, 8, *input_constraints(deeplab)) == (520, 8)

    class Wrapper(nn.Module):  # stands in for DDP's `.module` attribute
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    assert input_constraints(Wrapper(deconv)) == (32, 224)


def test_a_model_without_constraints_is_an_error_not_a_divisor_of_1() -> None:
    plain = nn.Conv2d(3, 2, 1)
    with pytest.raises(ContractError, match=r"Conv2d.size_divisor is None"):
        input_constraints(plain)
    plain.size_divisor, plain.min_size = 8, 0
    with pytest.raises(ContractError, match=r"Conv2d.min_size is 0"):
        input_constraints(plain)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_names_fall_in_the_declared_groups(name: str) -> None:
    with torch.device("meta"):
        model = build_model(ModelConfig(name=name), 4)
    groups = type(model).param_groups
    tops = [n.split(".")[0] for n, _ in model.named_parameters()]
    assert set(tops) == set(groups), name  # every parameter in a group, every group with parameters
    if name in VGG_MODELS:
        assert groups[0] == "encoder" and groups[-1] == "classifier"
        assert all(
            n.startswith("encoder.features.") for n, _ in model.encoder.named_parameters(prefix="encoder")
        )
    else:
        assert groups == ("backbone", "classifier"), name
    if name == "deconvnet":
        assert groups == ("encoder", "fc6", "fc7", "decoder", "classifier")


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"model.name='segnet'.*deconvnet.*lraspp_mobilenet_v3_large"):
        build_model(ModelConfig(name="segnet"), 3)


def test_torchvision_models_reject_width_mult() -> None:
    with pytest.raises(ValueError, match=r"model.width_mult=0.5.*fcn_resnet50"):
        build_model(ModelConfig(name="fcn_resnet50", width_mult=0.5), 3)


def test_too_few_classes_is_an_error() -> None:
    with pytest.raises(ValueError, match="model.num_classes=1"):
        build_model(ModelConfig(name="fcn8s", width_mult=0.125), 1)
