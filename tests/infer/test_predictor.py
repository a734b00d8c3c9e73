"""The Predictor (dist_seg.infer.predictor): padding, flip and scale TTA, sliding windows and ensembles against
hand computations; loading an ensemble and the shared options' errors. The real runs (CLI, torchrun) are in
tests/test_evaluate.py and tests/test_predict.py."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from conftest import REPO
from numerics import U32, chain_error_bound, gamma, resize_error_bound, softmax_error_bound
from torch import nn

from dist_seg.checkpoint import save_checkpoint
from dist_seg.config.loading import load_config
from dist_seg.config.schema import to_dict
from dist_seg.infer.options import check_inference_args, inference_defaults, parse_tta
from dist_seg.infer.predictor import Predictor, SlideWindow, load_models
from dist_seg.models import build_model

CPU = torch.device("cpu")


# Tolerances: every probability is compared with a float64 reference under a bound derived from the float32
# arithmetic (tests/numerics.py): chain_error_bound for the convolutions (any kernel, any padding or batch),
# softmax_error_bound for the softmax, resize_error_bound for the antialiased resize, and a gamma term for
# each average the Predictor takes. A wrong view, scale, flip, window or average moves probabilities by far
# more than these bounds (1e-6 to 1e-4 of a probability).
def _layers(model: nn.Module) -> list[nn.Module]:
    return [model.conv, *model.head] if isinstance(model, _FlipEquivariant) else list(model)


def _probs64(
    model: nn.Module, x: torch.Tensor, x_err: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 probabilities of the model on x, and a componentwise bound on any float32 evaluation of them
    (x_err: a bound on the float32 input's own error)."""
    z, e = chain_error_bound(_layers(model), x, x_err)
    return softmax_error_bound(z, e)


def _within(got: torch.Tensor, ref64: torch.Tensor, bound: torch.Tensor) -> None:
    err = (got.double() - ref64).abs()
    assert (err <= bound).all(), f"error / bound up to {float((err / bound).max()):.3g}"


def _view_probs64(
    model: nn.Module, x: torch.Tensor, scale: float, flip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One TTA view as the Predictor takes it: resize by `scale`, flip, probabilities, flip back, resize back;
    float64, with the bound carried through each step (a flip moves values, exactly)."""
    h, w = x.shape[-2:]
    size = (round(h * scale), round(w * scale))
    xs, xe = x.double(), torch.zeros_like(x, dtype=torch.float64)
    if size != (h, w):
        xs, xe = resize_error_bound(xs, xe, size)
    if flip:
        xs, xe = xs.flip(-1), xe.flip(-1)
    p, pb = _probs64(model, xs, xe)
    if flip:
        p, pb = p.flip(-1), pb.flip(-1)
    if size != (h, w):
        p, pb = resize_error_bound(p, pb, (h, w))
    return p, pb


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
    # the bottom/right padding (0) reads like the conv's own zero padding: the padded run and the model on
    # the unpadded input have the same exact values, so both lie within the same bound of them
    p64, b = _probs64(model, x)
    _within(plain, p64, b)
    with torch.inference_mode():
        _within(model(x).softmax(1), p64, b)
    flipped = Predictor(model, torch.device("cpu"), flip=True)(x)
    # the mirrored view's exact probabilities are the plain ones (the kernels are exactly symmetric in
    # float32: fl((a + b)/2) == fl((b + a)/2)), so it is within b of p64 too; the Predictor averages the two
    # views with one rounded addition (u |p1 + p2|) and an exact halving
    _within(flipped, p64, b * (1 + 2 * U32) + U32 * p64)
    assert torch.equal(flipped.argmax(1), plain.argmax(1))


def test_scale_tta_averages_probabilities_resized_to_the_input() -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 4, 1))  # pointwise: padding-blind
    model.size_divisor, model.min_size = 16, 16
    x = torch.randn(3, 3, 40, 56)
    scales = (0.5, 1.0, 1.5)
    got = Predictor(model, torch.device("cpu"), scales=scales)(x)
    views = [_view_probs64(model, x, s, flip=False) for s in scales]
    tot, totb = sum(p for p, _ in views), sum(pb for _, pb in views)
    # three views, each within its bound: two rounded additions and a division by 3, gamma(3) of the sum of
    # the computed views (<= tot + totb); gamma(4) covers that and the float64 reference's division
    _within(got, tot / 3, totb / 3 * (1 + gamma(4)) + gamma(4) * tot / 3)
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
    total64, totalb = (torch.zeros(2, 3, 40, 56, dtype=torch.float64) for _ in range(2))
    count = torch.zeros(40, 56, dtype=torch.float64)
    for y in (0, 16):
        for x0 in (0, 16, 32):
            # each window is padded to 64x64 (min_size) with zeros, which read like the conv's own padding
            p, pb = _probs64(model, x[..., y : y + 24, x0 : x0 + 24])
            total64[..., y : y + 24, x0 : x0 + 24] += p
            totalb[..., y : y + 24, x0 : x0 + 24] += pb
            count[y : y + 24, x0 : x0 + 24] += 1
    assert count.min() >= 1 and count.max() == 4
    # a pixel's <= 4 window values, each within its bound, summed into zeros (<= 3 rounded additions) and
    # divided by the exact count: gamma(4) of the computed sum; gamma(5) also covers the float64 division
    ref64 = total64 / count
    bw = totalb / count * (1 + gamma(5)) + gamma(5) * ref64
    _within(got, ref64, bw)
    # windows see less context: somewhere they differ from the whole image by more than both bounds, so
    # their exact values differ (not just their rounding)
    whole = Predictor(model, CPU)(x)
    whole64, wb = _probs64(model, x)
    _within(whole, whole64, wb)
    assert ((got.double() - whole.double()).abs() > bw + wb).any()
    pointwise = _pointwise()  # no context at all: windows change nothing but the rounding of the average
    p64, pb = _probs64(pointwise, x)
    _within(
        Predictor(pointwise, CPU, slide=SlideWindow(24, 16))(x), p64, pb * (1 + gamma(5)) + gamma(5) * p64
    )
    _within(Predictor(pointwise, CPU)(x), p64, pb)


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
    refs, bounds = [], []
    for model in (a, b):
        views = [_view_probs64(model, x, s, flip) for s in (1.0, 0.5) for flip in (False, True)]
        refs.append(sum(p for p, _ in views) / 4)
        bounds.append(sum(pb for _, pb in views) / 4)
    ref64 = (refs[0] + refs[1]) / 2
    # per model: 4 views (3 rounded additions, an exact division by 4); then 2 models (1 addition, exact
    # halving): gamma(4) of the computed sums, gamma(6) with the float64 reference's own roundings
    bound = (bounds[0] + bounds[1]) / 2 * (1 + gamma(6)) + gamma(6) * ref64
    _within(got, ref64, bound)
    # the 4 class probabilities sum to 1 within their bounds and the float32 sum's rounding (gamma(3) of a
    # sum <= 1 + its bound; gamma(4) also covers the float64 reference's sum)
    _within(got.sum(1), torch.ones(2, 40, 56, dtype=torch.float64), bound.sum(1) * (1 + gamma(4)) + gamma(4))


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
