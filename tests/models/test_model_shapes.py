"""Output shapes, parameter counts, BatchNorm placement and input checks of every model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_seg.config.schema import ModelConfig
from dist_seg.models import MODEL_NAMES, build_model, input_constraints, padded_side
from dist_seg.models.deconvnet import DECODER_STAGES, DeconvNet
from dist_seg.models.vgg import VGG16_CFG

VGG_NAMES = ("deconvnet", "deeplab_v1", "fcn8s")
TV_NAMES = ("deeplabv3_resnet50", "fcn_resnet50", "lraspp_mobilenet_v3_large")


@pytest.mark.parametrize(
    ("name", "width", "sizes"),
    [
        ("deconvnet", 0.03125, [(224, 224), (256, 288)]),
        ("deeplab_v1", 0.125, [(64, 64), (96, 128), (72, 40)]),
        ("fcn8s", 0.125, [(64, 64), (96, 160)]),
        # torchvision models cannot be width-reduced: one small non-square size each keeps the suite fast
        ("deeplabv3_resnet50", 1.0, [(48, 80)]),
        ("fcn_resnet50", 1.0, [(48, 80)]),
        ("lraspp_mobilenet_v3_large", 1.0, [(64, 96)]),
    ],
)
def test_logits_at_input_size(name: str, width: float, sizes: list[tuple[int, int]]) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, width_mult=width), num_classes=5)
    divisor, min_size = input_constraints(model)
    for h, w in sizes:
        assert h % divisor == 0 and w % divisor == 0 and min(h, w) >= min_size
        with torch.no_grad():
            out = model(torch.randn(2, 3, h, w))
        assert isinstance(out, torch.Tensor)
        assert out.shape == (2, 5, h, w)
        assert torch.isfinite(out).all()


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
    assert padded_side(100, deconv) == 224
    assert padded_side(500, deconv) == 512
    assert padded_side(513, deeplab) == 520

    class Wrapper(nn.Module):  # stands in for DDP's `.module` attribute
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    assert input_constraints(Wrapper(deconv)) == (32, 224)


def test_parameter_names_follow_the_contract() -> None:
    with torch.device("meta"):
        for name in MODEL_NAMES:
            model = build_model(ModelConfig(name=name), 4)
            tops = {n.split(".")[0] for n, _ in model.named_parameters()}
            if name in VGG_NAMES:
                assert {"encoder", "fc6", "fc7", "classifier"} <= tops, name
                assert all(
                    n.startswith("encoder.features.")
                    for n, _ in model.encoder.named_parameters(prefix="encoder")
                )
            else:
                assert tops == {"backbone", "classifier"}, name
    with torch.device("meta"):
        deconv = build_model(ModelConfig(name="deconvnet"), 4)
    assert {n.split(".")[0] for n, _ in deconv.named_parameters()} == {
        "encoder",
        "fc6",
        "fc7",
        "decoder",
        "classifier",
    }


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"model.name='segnet'.*deconvnet.*lraspp_mobilenet_v3_large"):
        build_model(ModelConfig(name="segnet"), 3)


def test_torchvision_models_reject_width_mult() -> None:
    with pytest.raises(ValueError, match=r"model.width_mult=0.5.*fcn_resnet50"):
        build_model(ModelConfig(name="fcn_resnet50", width_mult=0.5), 3)


def test_too_few_classes_is_an_error() -> None:
    with pytest.raises(ValueError, match="model.num_classes=1"):
        build_model(ModelConfig(name="fcn8s", width_mult=0.125), 1)
