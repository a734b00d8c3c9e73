"""The device half of the input pipeline (dist_seg.data.loading.colour): uint8 + per-sample colour rows -> normalised
float32 against a float64 torchvision reference, at float32 and under bf16 autocast, on awkward inputs;
padding; the eval normalisation; the prefetcher's pass-through on CPU."""

from __future__ import annotations

import random

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from numerics import U32, U64, gamma

from dist_seg.config.schema import DataConfig
from dist_seg.data.loading.colour import (
    colour_range,
    denormalize,
    jitter_colour,
    plain_colour,
    to_model_input,
)
from dist_seg.data.loading.transforms import TrainTransform


def _colour_bound(u8: torch.Tensor, colour: torch.Tensor, mean, std) -> torch.Tensor:
    """Componentwise bound on |to_model_input - float64 reference| for one image u8 [3, H, W] and its float32
    colour rows [COLOUR_ROWS, 3] (A, bias): out_j = sum_k p_k A_kj + bias_j, clipped.

    The rows are float64 arithmetic (jitter_colour, plain_colour) rounded once to float32 (u relative each),
    the pixels are exact, and each output is a 3-term dot product plus the bias (gamma(4)): together
    (gamma(4) + 2u) (sum_k p_k |A_kj| + |bias_j|). The contrast's grey level is a float32 mean of exact
    integer sums (< 2^24), rounded once, which moves the bias by at most u |grey| / std_j <= u / std_j; the
    clip bounds are Python floats rounded to float32 too (<= u (|mean_j| + 1) / std_j), and the clip is
    1-Lipschitz: 2u (|mean_j| + 1) / std_j covers both. The float64 reference's own ~15 roundings: 16 u64 of
    the same magnitudes."""
    a, b = colour[:3].double(), colour[3].double()
    terms = torch.einsum("kc,khw->chw", a.abs(), u8.double()) + b.abs().view(3, 1, 1)
    extra = ((torch.tensor(mean).double().abs() + 1) / torch.tensor(std).double()).view(3, 1, 1)
    return (gamma(4) + 2 * U32) * terms + 2 * U32 * extra + 16 * U64 * (terms + extra)


def _reference(
    u8: torch.Tensor, factors: tuple[float, float, float], cfg: DataConfig, sub_mean_img
) -> torch.Tensor:
    """float64: torchvision's brightness, contrast (around the grey mean of `sub_mean_img`), saturation,
    one clip to 0..1, then normalisation: what the CPU path computed before the work moved to the device."""
    b, c, s = factors
    x = u8.double() / 255
    x = x * b  # TF.adjust_brightness without its clamp (the pipeline clips once, at the end)
    grey = (0.2989 * sub_mean_img[0] + 0.587 * sub_mean_img[1] + 0.114 * sub_mean_img[2]) / 255 * b
    x = c * x + (1 - c) * grey
    lum = 0.2989 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    x = s * x + (1 - s) * lum
    x = x.clamp(0, 1)
    mean, std = torch.tensor(cfg.mean, dtype=torch.float64), torch.tensor(cfg.std, dtype=torch.float64)
    return (x - mean.view(3, 1, 1)) / std.view(3, 1, 1)


@pytest.mark.parametrize(
    ("name", "low", "high", "mean", "std"),
    [
        ("natural", 0, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ("near-white, tiny spread", 250, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ("large mean offset, tiny std", 120, 124, (0.99, 0.01, 0.5), (0.004, 0.004, 0.004)),
    ],
)
def test_training_colour_matches_a_float64_reference(name: str, low: int, high: int, mean, std) -> None:
    """Scale fixed at 1 and the crop the image's size, so the test can replay the sample's random draws
    (scale, crop place, flip, then the three jitter factors) and know the factors it got."""
    jitter = 0.4
    cfg = DataConfig(crop_size=40, scale_min=1.0, scale_max=1.0, hflip_prob=0.5, color_jitter=jitter)
    cfg.mean, cfg.std = list(mean), list(std)
    t = TrainTransform(cfg)
    g = torch.Generator().manual_seed(0)
    for seed in range(12):
        image = torch.randint(low, high, (3, 40, 40), dtype=torch.uint8, generator=g)
        out = torch.empty(1, 40, 40, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
        colour, size = t.apply(
            image,
            torch.zeros(40, 40, dtype=torch.uint8),
            random.Random(seed),
            out[0],
            torch.empty(40, 40, dtype=torch.uint8),
        )
        assert size == (40, 40)
        replay = random.Random(seed)
        replay.uniform(1.0, 1.0), replay.randint(0, 0), replay.randint(0, 0), replay.random()
        factors = tuple(replay.uniform(1 - jitter, 1 + jitter) for _ in range(3))
        clip = colour_range(cfg.mean, cfg.std)
        got = to_model_input(out, colour[None], torch.tensor([size]), clip=clip)[0]
        assert got.dtype == torch.float32
        content = out[0]
        ref = _reference(content, factors, cfg, content[:, ::4, ::4].double().mean((1, 2)))
        # per element, within the float32 colour step's rounding (_colour_bound); measured <= 0.25 of it
        # (the bound is ~5e-6 here, 2.4e-4 in the tiny-std case, whose values reach |x| ~ 250). A brightness
        # factor off by 0.1% exceeds it about 1000-fold wherever the pixels are not clipped
        err = (got.double() - ref).abs()
        bound = _colour_bound(content, colour, cfg.mean, cfg.std)
        assert (err <= bound).all(), f"{name}, seed {seed}: error / bound {float((err / bound).max()):.3g}"
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what train.amp=bf16 wraps the step in
            amp = to_model_input(out, colour[None], torch.tensor([size]), clip=clip)[0]
        assert amp.dtype == torch.float32 and torch.equal(amp, got)


def test_eval_normalisation_is_plain_and_pads_with_zero() -> None:
    cfg = DataConfig()
    images = torch.randint(0, 256, (2, 3, 8, 12), dtype=torch.uint8)
    plain = plain_colour(cfg.mean, cfg.std)
    got = to_model_input(images, plain[None], torch.tensor([[8, 12], [5, 7]]))
    ref = TF.normalize(images.double() / 255, cfg.mean, cfg.std)
    # within the colour step's rounding of the float64 normalisation (_colour_bound), content only
    bound = torch.stack([_colour_bound(im, plain, cfg.mean, cfg.std) for im in images])
    assert ((got[0].double() - ref[0]).abs() <= bound[0]).all()
    assert ((got[1, :, :5, :7].double() - ref[1, :, :5, :7]).abs() <= bound[1, :, :5, :7]).all()
    assert torch.all(got[1, :, 5:] == 0) and torch.all(got[1, :, :, 7:] == 0)
    whole = to_model_input(images, plain[None])
    assert ((whole.double() - ref).abs() <= bound).all()
    # the accelerators' single batched product (per-sample colour rows) equals the CPU's loop: the same
    # float32 rows and clip values, each a 4-term sum within gamma(4) of the exact one (the clip is
    # 1-Lipschitz), so within 2 gamma(4) of each other (measured: equal, the same addmm)
    colour = plain[None].repeat(2, 1, 1) * torch.tensor([1.0, 0.5]).view(2, 1, 1)
    clip = colour_range(cfg.mean, cfg.std)
    loop = to_model_input(images, colour, [(8, 12), (5, 7)], clip=clip, batched=False)
    one = to_model_input(images, colour, [(8, 12), (5, 7)], clip=clip, batched=True)
    terms = (
        torch.einsum("bkc,bkhw->bchw", colour[:, :3].abs(), images.float())
        + colour[:, 3].abs()[..., None, None]
    )
    assert ((one - loop).abs() <= 2 * gamma(4) * terms).all()
    assert to_model_input(images, plain_colour(cfg.mean, cfg.std)[None], channels_last=True).is_contiguous(
        memory_format=torch.channels_last
    )


def test_denormalize_inverts_the_colour_step() -> None:
    cfg = DataConfig()
    image = torch.randint(0, 256, (1, 3, 17, 23), dtype=torch.uint8)
    plain = plain_colour(cfg.mean, cfg.std)
    x = to_model_input(image, plain[None])
    # x is within E = _colour_bound of x* = (p/255 - mean)/std; denormalize computes (x std + mean) in float32
    # with std and mean rounded to float32, then * 255: <= 4 roundings (gamma(4)) of terms |x*| std + mean,
    # and E std carried (the clamp to 0..1 is 1-Lipschitz and leaves the exact p/255 in place)
    mean = torch.tensor(cfg.mean).double().view(3, 1, 1)
    std = torch.tensor(cfg.std).double().view(3, 1, 1)
    exact = (image[0].double() / 255 - mean) / std
    e = _colour_bound(image[0], plain, cfg.mean, cfg.std)
    bound = 255 * (e * std * (1 + gamma(4)) + gamma(4) * (exact.abs() * std + mean))
    got = denormalize(x, cfg)[0] * 255
    assert ((got.double() - image[0].double()).abs() <= bound).all()


@pytest.mark.parametrize("factors", [(1.0, 1.0, 1.0), (1.2, 0.8, 1.1), (0.85, 1.15, 0.75)])
def test_jitter_colour_equals_torchvision_jitter_then_normalise(factors: tuple[float, float, float]) -> None:
    cfg = DataConfig()
    mean, std = torch.tensor(cfg.mean, dtype=torch.float64), torch.tensor(cfg.std, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    # mid-range pixels, so that no step clips and torchvision's per-step clamping changes nothing
    image = torch.randint(90, 160, (3, 20, 30), dtype=torch.uint8, generator=g)
    b, c, s = factors
    # torchvision's chain in float64 (its definitions; exact up to float64 rounding), then normalisation
    x = image.double() / 255
    expected = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, b), c), s)
    expected = (expected - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    pixels = image.permute(1, 2, 0).reshape(-1, 3).float()
    # the grey level from a float32 mean of exact integer sums, rounded once: as _colour_bound assumes
    rows = jitter_colour(pixels.mean(0).tolist(), factors, cfg.mean, cfg.std)
    bound = _colour_bound(image, rows, cfg.mean, cfg.std)
    got = (pixels @ rows[:3] + rows[3]).view(20, 30, 3).permute(2, 0, 1)
    assert ((got.double() - expected).abs() <= bound).all()
    # the same rows through the colour step itself (no padding, no clip: mid-range pixels)
    step = to_model_input(image[None], rows[None])[0]
    assert ((step.double() - expected).abs() <= bound).all()
