"""Loading torchvision-format vgg16_bn weights: every tensor lands where it should, fc6/fc7 surgery, errors.

Files are written with torchvision's own key names (its `make_layers` builds the `features` part) and random
values, at a reduced width so they stay small; the classifier keys have torchvision's layout at that width.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from numerics import U64, gamma
from torch import Tensor
from torchvision.models import mobilenet_v3_large
from torchvision.models.vgg import make_layers

from dist_seg.config.schema import ModelConfig
from dist_seg.models import build_model
from dist_seg.models.vgg import VGG16_CFG, load_pretrained_vgg, scaled

WIDTH = 0.125


def torchvision_vgg16_bn_state(width: float, batch_norm: bool = True) -> dict[str, Tensor]:
    """A random state dict with torchvision vgg16_bn's keys, shapes scaled by `width`."""
    torch.manual_seed(0)
    cfg = [v if v == "M" else scaled(v, width) for v in VGG16_CFG]
    features = make_layers(cfg, batch_norm=batch_norm)
    state = {f"features.{k}": v.clone() for k, v in features.state_dict().items()}
    for k in state:  # BN buffers get random values too, so a swapped buffer would show
        if "running" in k:
            state[k] = torch.rand_like(state[k]) + 0.5
        elif state[k].is_floating_point():
            state[k] = torch.randn_like(state[k])
    c5, fc = scaled(512, width), scaled(4096, width)
    for i, (cin, cout) in {0: (c5 * 49, fc), 3: (fc, fc), 6: (fc, 1000)}.items():
        state[f"classifier.{i}.weight"] = torch.randn(cout, cin)
        state[f"classifier.{i}.bias"] = torch.randn(cout)
    return state


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Tensor]]:
    state = torchvision_vgg16_bn_state(WIDTH)
    path = tmp_path_factory.mktemp("weights") / "vgg16_bn.pth"
    torch.save(state, path)
    return path, state


def test_every_encoder_tensor_lands_in_place(vgg_file: tuple[Path, dict[str, Tensor]]) -> None:
    path, state = vgg_file
    model = build_model(ModelConfig(name="deconvnet", width_mult=WIDTH, pretrained=str(path)), 5)
    ours = model.state_dict()
    feature_keys = [k for k in state if k.startswith("features.")]
    assert feature_keys
    for k in feature_keys:
        assert torch.equal(ours[f"encoder.{k}"], state[k]), k
    report = model.pretrained_report
    assert set(report["loaded"]) >= {f"encoder.{k}" for k in feature_keys}
    assert report["unexpected"] == ["classifier.6.bias", "classifier.6.weight"]
    assert any(k.startswith("decoder.") for k in report["missing"])
    assert not any(k.startswith("encoder.") for k in report["missing"])


def test_encoder_computes_what_torchvision_features_compute(vgg_file: tuple[Path, dict[str, Tensor]]) -> None:
    path, state = vgg_file
    model = build_model(ModelConfig(name="fcn8s", width_mult=WIDTH, pretrained=str(path)), 5).eval()
    tv = make_layers([v if v == "M" else scaled(v, WIDTH) for v in VGG16_CFG], batch_norm=True).eval()
    tv.load_state_dict({k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        # bitwise: the same modules (Conv2d, BatchNorm2d, ReLU, MaxPool2d, in torchvision's order) with the same
        # weights on the same input run the same kernels (measured: equal). With random weights the values
        # reach ~1e13, where a default tolerance says little.
        assert torch.equal(model.encoder(x).feats[-1], tv(x))


def test_fc6_fc7_surgery_equals_the_linear_layers(vgg_file: tuple[Path, dict[str, Tensor]]) -> None:
    path, state = vgg_file
    for name in ("deconvnet", "fcn8s"):
        model = build_model(ModelConfig(name=name, width_mult=WIDTH, pretrained=str(path)), 5)
        fc6, fc7 = model.fc6[0], model.fc7[0]
        assert fc6.kernel_size == (7, 7) and fc7.kernel_size == (1, 1)
        # float64: with the weights moved correctly, the two layers sum the same K products and the bias in
        # different orders, each within gamma(K + 1) (u = 2^-53) of sum |w x| + |b|: within twice that of
        # each other. A misplaced weight changes a value by ~ one |w x| term, ~10^8 times the bound.
        w6, b6 = state["classifier.0.weight"].double(), state["classifier.0.bias"].double()
        pool5 = torch.randn(2, scaled(512, WIDTH), 7, 7, dtype=torch.float64)  # torchvision flattens C, H, W
        fc6_conv = F.conv2d(
            pool5, fc6.weight.double(), fc6.bias.double()
        )  # unpadded 7x7: one output per image
        bound6 = 2 * gamma(w6.shape[1] + 1, U64) * F.linear(pool5.flatten(1).abs(), w6.abs(), b6.abs())
        assert ((fc6_conv.flatten(1) - F.linear(pool5.flatten(1), w6, b6)).abs() <= bound6).all()
        h = torch.randn(2, scaled(4096, WIDTH), dtype=torch.float64)
        w7, b7 = state["classifier.3.weight"].double(), state["classifier.3.bias"].double()
        fc7_conv = F.conv2d(h[:, :, None, None], fc7.weight.double(), fc7.bias.double())
        bound7 = 2 * gamma(w7.shape[1] + 1, U64) * F.linear(h.abs(), w7.abs(), b7.abs())
        assert ((fc7_conv.flatten(1) - F.linear(h, w7, b7)).abs() <= bound7).all()
        assert {"fc6.0.weight", "fc6.0.bias", "fc7.0.weight", "fc7.0.bias"} <= set(
            model.pretrained_report["loaded"]
        )
        assert "fc6.1.weight" in model.pretrained_report["missing"]  # fc6's BN has no pretrained values


def test_deeplab_reports_that_fc6_cannot_be_loaded(vgg_file: tuple[Path, dict[str, Tensor]]) -> None:
    path, _ = vgg_file
    model = build_model(ModelConfig(name="deeplab_v1", width_mult=WIDTH, pretrained=str(path)), 5)
    report = model.pretrained_report
    assert {"classifier.0.weight", "classifier.3.weight"} <= set(report["unexpected"])
    assert "fc6.0.weight" in report["missing"]
    assert any("cannot take VGG's fc6" in note for note in report["notes"])


def test_width_mismatch_names_the_key(vgg_file: tuple[Path, dict[str, Tensor]]) -> None:
    path, _ = vgg_file
    with pytest.raises(ValueError, match=r"shape mismatch for 'features.0.weight'.*width_mult"):
        build_model(ModelConfig(name="deconvnet", width_mult=2 * WIDTH, pretrained=str(path)), 5)


def test_wrong_architecture_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "vgg16_no_bn.pth"
    torch.save(torchvision_vgg16_bn_state(WIDTH, batch_norm=False), path)  # plain vgg16: no BN at features.1
    with pytest.raises(ValueError, match=r"no key 'features.1.weight'.*wrong architecture"):
        build_model(ModelConfig(name="deconvnet", width_mult=WIDTH, pretrained=str(path)), 5)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(ValueError, match=r"model.pretrained: file not found: .*nope.pth"):
        build_model(ModelConfig(name="fcn8s", width_mult=WIDTH, pretrained=str(missing)), 5)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"cannot read .*junk.pth"):
        build_model(ModelConfig(name="fcn8s", width_mult=WIDTH, pretrained=str(junk)), 5)


def _network_reachable() -> bool:
    try:
        socket.create_connection(("download.pytorch.org", 443), timeout=2).close()
        return True
    except OSError:
        return False


def test_torchvision_download_offline_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if _network_reachable():
        pytest.skip("network is reachable: this test would download 528 MB of vgg16_bn weights")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache, so torchvision must download
    model = build_model(ModelConfig(name="deconvnet", width_mult=WIDTH), 5)
    with pytest.raises(
        ValueError, match=r"needs network access.*model.pretrained=/path/to/vgg16_bn-6c64b313.pth"
    ):
        load_pretrained_vgg(model, "torchvision")


def test_torchvision_mobilenet_backbone_from_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    classifier_net = mobilenet_v3_large(weights=None)
    state = classifier_net.state_dict()
    path = tmp_path / "mobilenet_v3_large.pth"
    torch.save(state, path)
    model = build_model(ModelConfig(name="lraspp_mobilenet_v3_large", pretrained=str(path)), 4)
    ours = model.state_dict()
    report = model.pretrained_report
    for key in report["loaded"]:
        assert key.startswith("backbone.")
        assert torch.equal(ours[key], state["features." + key[len("backbone.") :]]), key
    assert any(k.startswith("features.") for k in state)
    assert report["missing"] and all(k.startswith("classifier.") for k in report["missing"])
    assert any(k.startswith("classifier.") for k in report["unexpected"])  # the ImageNet head
