"""The Predictor (dist_seg.infer.predictor): padding, flip and scale TTA, sliding windows and ensembles against
hand computations; loading an ensemble and the shared options' errors. The real runs (CLI, torchrun) are in
tests/test_evaluate.py and tests/test_predict.py."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from torch import nn

from dist_seg.checkpoint import save_checkpoint
from dist_seg.config.loading import load_config
from dist_seg.config.schema import to_dict
from dist_seg.infer.options import check_inference_args, inference_defaults, parse_tta
from dist_seg.infer.predictor import Predictor, SlideWindow, load_models
from dist_seg.models import build_model

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------- TTA exactness
class _FlipEquivariant(nn.Module):
    """A 3x3 conv with left-right symmetric kernels, then 1x1 convs: flip-equivariant by construction (also
    at the content border: the batch padding and the conv's zero padding are both 0)."""

    size_divisor, min_size = 32, 64

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_((self.conv.weight + self.conv.weight.flip(-1)) / 2)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, classes, 1))
        self.seen: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.shape[-2], x.shape[-1]))
        return self.head(self.conv(x))


def test_padding_is_cropped_back_and_flip_tta_changes_nothing_for_an_equivariant_model() -> None:
    model = _FlipEquivariant()
    x = torch.randn(2, 3, 50, 70)
    plain = Predictor(model, torch.device("cpu"))(x)
    assert model.seen == [(64, 96)]  # padded to the model's constraints ...
    assert plain.shape == (2, 5, 50, 70)  # ... and cropped back
    with torch.inference_mode():  # the bottom/right padding (0) reads like the conv's own zero padding
        torch.testing.assert_close(plain, model(x).softmax(1), rtol=0, atol=1e-6)
    flipped = Predictor(model, torch.device("cpu"), flip=True)(x)
    torch.testing.assert_close(flipped, plain, rtol=0, atol=1e-6)
    assert torch.equal(flipped.argmax(1), plain.argmax(1))


def test_scale_tta_averages_probabilities_resized_to_the_input() -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 4, 1))  # pointwise: padding-blind
    model.size_divisor, model.min_size = 16, 16
    x = torch.randn(3, 3, 40, 56)
    scales = (0.5, 1.0, 1.5)
    got = Predictor(model, torch.device("cpu"), scales=scales)(x)
    ref = torch.zeros(3, 4, 40, 56)
    with torch.inference_mode():
        for s in scales:
            size = (round(40 * s), round(56 * s))
            xs = F.interpolate(x, size=size, mode="bilinear", antialias=True) if s != 1 else x
            p = model(xs).softmax(1)
            ref += F.interpolate(p, size=(40, 56), mode="bilinear", antialias=True) if s != 1 else p
    torch.testing.assert_close(got, ref / 3, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="needs --tta scales"):
        parse_tta("flip", (0.5, 1.0))
    assert parse_tta("flip,scales", None) == (True, (0.75, 1.0, 1.25))


def _pointwise(classes: int = 4, seed: int = 0, divisor: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, classes, 1))  # padding-blind
    model.size_divisor, model.min_size = divisor, divisor
    return model


# ---------------------------------------------------------------------------------------------- sliding windows
def test_window_offsets_cover_each_side_and_end_at_the_border() -> None:
    w = SlideWindow(window=4, stride=3)
    assert w.starts(10) == [0, 3, 6]  # 6 + 4 == 10: no extra window
    assert w.starts(11) == [0, 3, 6, 7]  # the last window ends at the border
    assert w.starts(4) == [0] and w.starts(3) == [0]  # a side no longer than the window: one (clipped) window
    for bad in ((4, 5), (4, 0), (0, 1)):
        with pytest.raises(ValueError, match="need window >= 1 and 1 <= stride <= window"):
            SlideWindow(*bad)


def test_a_window_the_size_of_the_image_is_whole_image_inference() -> None:
    model = _FlipEquivariant()  # a 3x3 conv: a window border would change the logits near it
    x = torch.randn(2, 3, 64, 64)
    whole = Predictor(model, CPU)(x)
    assert torch.equal(Predictor(model, CPU, slide=SlideWindow(64, 32))(x), whole)
    small = torch.randn(1, 3, 50, 70)  # smaller than the window: one window clipped to the image
    assert torch.equal(Predictor(model, CPU, slide=SlideWindow(96, 48))(small), Predictor(model, CPU)(small))


def test_overlapping_windows_average_their_probabilities() -> None:
    """40x56 image, window 24, stride 16: rows start at 0 and 16, columns at 0, 16 and 32 (listed by hand);
    each window is padded to the model's constraints (divisor 32) on its own."""
    model = _FlipEquivariant(classes=3)
    x = torch.randn(2, 3, 40, 56)
    got = Predictor(model, CPU, slide=SlideWindow(24, 16))(x)
    total, count = torch.zeros(2, 3, 40, 56), torch.zeros(40, 56)
    with torch.inference_mode():
        for y in (0, 16):
            for x0 in (0, 16, 32):
                crop = F.pad(x[..., y : y + 24, x0 : x0 + 24], (0, 64 - 24, 0, 64 - 24))  # min_size 64
                total[..., y : y + 24, x0 : x0 + 24] += model(crop)[..., :24, :24].softmax(1)
                count[y : y + 24, x0 : x0 + 24] += 1
    assert count.min() >= 1 and count.max() == 4
    torch.testing.assert_close(got, total / count, rtol=0, atol=1e-6)
    assert not torch.allclose(got, Predictor(model, CPU)(x), atol=1e-4)  # windows see less context
    pointwise = _pointwise()  # no context at all: windows change nothing
    torch.testing.assert_close(
        Predictor(pointwise, CPU, slide=SlideWindow(24, 16))(x),
        Predictor(pointwise, CPU)(x),
        rtol=0,
        atol=1e-6,
    )


# ---------------------------------------------------------------------------------------------- ensembles
def test_an_ensemble_averages_each_models_tta_probabilities_one_model_at_a_time() -> None:
    a, b = _pointwise(seed=1, divisor=16), _FlipEquivariant(classes=4)
    calls: list[str] = []
    a.register_forward_hook(lambda *_: calls.append("a"))
    b.register_forward_hook(lambda *_: calls.append("b"))
    x = torch.randn(2, 3, 40, 56)
    kw = {"flip": True, "scales": (1.0, 0.5)}
    got = Predictor([a, b], CPU, **kw)(x)
    assert calls == ["a"] * 4 + ["b"] * 4  # every view of one model before the next model starts
    ref = (Predictor(a, CPU, **kw)(x) + Predictor(b, CPU, **kw)(x)) / 2
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.sum(1), torch.ones(2, 40, 56), rtol=0, atol=1e-5)


def _checkpoint(path: Path, name: str, width: float, classes: list[str], *overrides: str) -> Path:
    cfg = load_config(
        REPO / "configs/cpu_small.yaml", [f"model.name={name}", f"model.width_mult={width}", *overrides]
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, len(classes))
    state = {
        "model": model.state_dict(),
        "model_name": name,
        "num_classes": len(classes),
        "class_names": classes,
        "config": to_dict(cfg),
        "train_state": {"step": 3},
    }
    save_checkpoint(path, state)
    return path


def test_ensemble_members_are_built_from_their_own_configs_and_must_agree(tmp_path: Path) -> None:
    names = ["Background", "bottle", "can"]
    a = _checkpoint(tmp_path / "a.pt", "deeplab_v1", 0.0625, names)
    b = _checkpoint(tmp_path / "b.pt", "fcn8s", 0.125, names)
    cfg = load_config(REPO / "configs/cpu_small.yaml", ["model.name=deconvnet"])  # names neither
    models, cks = load_models(cfg, [str(a), str(b)], CPU, None, "auto")
    assert [type(m).__name__ for m in models] == ["DeepLabV1LargeFOV", "FCN8s"]
    assert [c.model_cfg.width_mult for c in cks] == [0.0625, 0.125] and cks[1].weights == "model"
    other = _checkpoint(tmp_path / "c.pt", "fcn8s", 0.0625, ["Background", "bottle", "net"])
    with pytest.raises(
        ValueError, match=r"c.pt has classes \['Background', 'bottle', 'net'\], but .*a.pt has"
    ):
        load_models(cfg, [str(a), str(other)], CPU, None, "auto")
    shifted = _checkpoint(tmp_path / "d.pt", "fcn8s", 0.0625, names, "data.mean=[0.5,0.5,0.5]")
    with pytest.raises(ValueError, match=r"d.pt was trained with data.mean=\[0.5, 0.5, 0.5\]"):
        load_models(cfg, [str(a), str(shifted)], CPU, None, "auto")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"checkpoint": ["a.pt", "a.pt"]}, r"--checkpoint names a file twice"),
        ({"mode": "slide"}, r"--mode slide needs --window PX"),
        ({"window": 64}, r"--window and --stride need --mode slide"),
        ({"mode": "slide", "window": 64, "stride": 65}, r"--window 64 --stride 65: need"),
        ({"tta": "flop"}, r"--tta 'flop': expected none, flip, scales or flip,scales"),
        ({"checkpoint": None}, r"--checkpoint is required"),
    ],
)
def test_inference_option_errors_name_the_option(values: dict, message: str) -> None:
    args: argparse.Namespace = inference_defaults(**{"checkpoint": ["a.pt"], **values})
    with pytest.raises(ValueError, match=message):
        check_inference_args(args)
