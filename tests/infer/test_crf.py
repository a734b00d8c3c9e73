"""dist_seg.infer.crf: the fast dense CRF (float32, what users run) against the exact O(N^2) float64 reference on
tiny images, awkward inputs, the behaviour users rely on (it cleans up noisy labels along colour edges,
iterations=0 is the identity, bad input is refused by name), and, where pydensecrf is installed, against
Krähenbühl's own implementation on a real photo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import shared_dataset
from numerics import gamma
from PIL import Image

from dist_seg.infer import crf
from dist_seg.infer.crf import CRFParams, Permutohedral, dense_crf, dense_crf_reference

SPATIAL_ONLY = CRFParams(bilateral_weight=0.0)
BILATERAL_ONLY = CRFParams(gaussian_weight=0.0)


def _sums_to_one(q: torch.Tensor) -> bool:
    """The CRF's output is a float32 softmax over the C classes (dim 0): each pixel's values are exps divided by
    their float32 sum (gamma(C - 1) of it, one rounding per division), here summed again in float32
    (gamma(C - 1)): the sum is within gamma(2C) of 1, whatever the exps' own rounding."""
    return bool(((q.sum(0).double() - 1).abs() <= gamma(2 * q.shape[0])).all())


def _two_regions(h: int, w: int, noise: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 image [3,H,W]: a red left part and a blue right part with a slanted edge and pixel noise,
    true labels [H,W]: 0 left, 1 right)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    labels = (xs > w // 2 + (ys - h // 2) // 3).long()
    colours = torch.tensor([[190, 40, 30], [30, 60, 200]])
    img = colours[labels].permute(2, 0, 1) + torch.randint(-noise, noise + 1, (3, h, w), generator=g)
    return img.clamp(0, 255).to(torch.uint8), labels


def _noisy_probs(
    labels: torch.Tensor, classes: int, signal: float, noise: float, seed: int = 0
) -> torch.Tensor:
    """softmax(signal * one_hot(labels) + noise * N(0, 1)) [C,H,W] float32."""
    g = torch.Generator().manual_seed(seed)
    logits = signal * F.one_hot(labels, classes).permute(2, 0, 1).float()
    return torch.softmax(logits + noise * torch.randn(logits.shape, generator=g), dim=0)


def _textured(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth random uint8 image: colour varies on a few-pixel scale, like a photo's texture."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, h // 4 + 2, w // 4 + 2, generator=g) * 255
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)[0].round().to(torch.uint8)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(0) == b.argmax(0)).double().mean())


# --------------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("shape", [(12, 16), (6, 40)])  # (6, 40): shifted adds along W, matrix along H
def test_separable_spatial_term_matches_the_exact_kernel(shape: tuple[int, int]) -> None:
    h, w = shape
    probs = torch.softmax(2 * torch.randn(4, h, w, generator=torch.Generator().manual_seed(1)), 0)
    image = _textured(h, w)
    fast, exact = dense_crf(probs, image, SPATIAL_ONLY), dense_crf_reference(probs, image, SPATIAL_ONLY)
    assert fast.dtype == torch.float32 and exact.dtype == torch.float64
    # separable and exact but for float32 and the 4-std truncation (~6e-5 of the kernel's mass)
    tol = 2e-4
    assert (fast.double() - exact).abs().max() < tol
    # so the label maps are equal wherever the exact top-2 gap exceeds 2 tol: check that this is everywhere,
    # so that a near-tie fails here, loudly, instead of by luck below (measured: smallest gap 1.5e-3)
    top2 = exact.topk(2, 0).values
    assert (top2[0] - top2[1] > 2 * tol).all()
    assert _agreement(fast, exact) == 1.0


def test_lattice_messages_are_close_to_the_exact_gaussian() -> None:
    """The permutohedral lattice approximates the Gaussian: its normalised message D K D v is within about
    10% of the exact one (measured 2.6-9.9% for these widths on two images; bound 12%; the error grows as
    the features get sparse in the lattice), and its width is right to ~20%: of the exact kernels with the
    features scaled by 0.7..1.4, the best fit is at a scale in 0.9..1.2 (the lattice kernel is a little
    narrower than nominal where neighbours are missing, as in Krähenbühl's code)."""
    h, w = 12, 16
    v = torch.rand(h * w, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    scales = (0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.4)
    for seed in (0, 1):
        image = _textured(h, w, seed=seed)
        for xy, rgb in [(121.0, 5.0), (5.0, 20.0), (3.0, 10.0), (121.0, 50.0), (20.0, 5.0)]:
            f = crf._bilateral_features(image, CRFParams(bilateral_xy_std=xy, bilateral_rgb_std=rgb))
            lattice = Permutohedral(f)
            norm = lattice.filter(torch.ones(h * w, 1)).double().rsqrt()
            approx = norm * lattice.filter((norm * v).float()).double()
            errors = []
            for scale in scales:
                k = crf._exact_kernel(f * scale)
                n = k.sum(1, keepdim=True).rsqrt()
                exact = n * (k @ (n * v))
                errors.append(float((approx - exact).norm() / exact.norm()))
            assert errors[scales.index(1.0)] < 0.12, (seed, xy, rgb, errors)
            assert 0.9 <= scales[errors.index(min(errors))] <= 1.2, (seed, xy, rgb, errors)


def _smooth_probs(h: int, w: int, classes: int = 4, seed: int = 0) -> torch.Tensor:
    """Network-like probabilities: smooth random logits (a coarse grid upsampled) plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = 2 * torch.randn(1, classes, h // 4 + 2, w // 4 + 2, generator=g)
    logits = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    return torch.softmax(logits + 0.5 * torch.randn(classes, h, w, generator=g), dim=0)


AWKWARD = {
    "defaults, textured": (_textured(40, 60), "smooth", CRFParams()),
    "defaults, two regions": (_two_regions(12, 16)[0], "smooth", CRFParams()),
    "narrow bilateral": (_textured(12, 16), "smooth", CRFParams(bilateral_xy_std=4, bilateral_rgb_std=15)),
    "uniform image": (torch.full((3, 12, 16), 128, dtype=torch.uint8), "smooth", CRFParams()),
    "near one-hot probs": (_textured(12, 16), "one-hot", CRFParams()),
    "one class dominant": (_textured(12, 16), "dominant", CRFParams()),
    "huge stds (kernel ~ constant)": (
        _textured(12, 16),
        "smooth",
        CRFParams(bilateral_xy_std=1e4, bilateral_rgb_std=1e4, gaussian_xy_std=1e4),
    ),
    "tiny rgb std (row hash)": (_textured(12, 16), "smooth", CRFParams(bilateral_rgb_std=0.01)),
    "one row": (_textured(4, 40)[:, :1].contiguous(), "smooth", CRFParams()),
}


def _probs_for(kind: str, h: int, w: int) -> torch.Tensor:
    if kind == "smooth":
        return _smooth_probs(h, w)
    labels = torch.randint(0, 4, (h, w), generator=torch.Generator().manual_seed(3))
    if kind == "one-hot":
        return _noisy_probs(labels, 4, signal=20.0, noise=0.1)  # others ~1e-9, below the unary floor
    p = _noisy_probs(labels, 4, signal=0.5, noise=0.3)  # "dominant": class 0 far ahead everywhere
    return torch.softmax(p.log() + torch.tensor([4.0, 0, 0, 0])[:, None, None], 0)


@pytest.mark.parametrize("case", list(AWKWARD))
def test_fast_crf_agrees_with_the_reference(case: str) -> None:
    """Label maps agree on >= 90% of pixels, probabilities within 0.05 on average. Why not closer: the
    lattice's few-% message error (above) moves pixels whose labels are nearly tied, and mean-field
    amplifies it where w1 = 4 outweighs the unary (measured here: 93.8% for the narrow kernel, 96.1-97.5%
    for the textured, two-region and one-row images, 100% elsewhere; pydensecrf's lattice is the same
    computation, see the last test)."""
    image, kind, params = AWKWARD[case]
    probs = _probs_for(kind, *image.shape[1:])
    fast, exact = dense_crf(probs, image, params), dense_crf_reference(probs, image, params)
    assert torch.isfinite(fast).all() and _sums_to_one(fast)
    assert _agreement(fast, exact) >= 0.90
    assert (fast.double() - exact).abs().mean() < 0.05
    if kind == "dominant":  # both keep the dominant class everywhere
        assert (fast.argmax(0) == 0).all() and (exact.argmax(0) == 0).all()
    if kind == "one-hot":  # unary gap log(1e5) = 11.5 > (w1 + w2) x a message (~ a local mean of Q <= 1)
        assert torch.equal(fast.argmax(0), probs.argmax(0))


def test_the_row_hash_builds_the_same_lattice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The int64 mixed-radix hash and the fallback over key rows (torch.unique(dim=0)) find the same
    lattice: the same number of points and the same filtered values."""
    image = _textured(12, 16)
    f = crf._bilateral_features(image, CRFParams())
    v = torch.rand(12 * 16, 3, generator=torch.Generator().manual_seed(4))
    packed = Permutohedral(f)
    monkeypatch.setattr(crf, "_hash_vertices", crf._hash_rows)
    rows = Permutohedral(f)
    assert packed.m == rows.m
    # non-negative values and weights throughout: each output sums <= N splatted terms, is blurred d + 1
    # times (2 roundings each) and sliced from d + 1 terms, so it is within gamma(N + 4(d + 1)) of the exact
    # filter, relative, whatever the order the lattice's points are in; the two within twice that of each
    # other (measured: equal, both hashes sort the points the same way)
    n, d = f.shape
    torch.testing.assert_close(packed.filter(v), rows.filter(v), rtol=2 * gamma(n + 4 * (d + 1)), atol=0)


# ---------------------------------------------------------------------------------------------- behaviour
def test_the_crf_cleans_noisy_labels_of_two_flat_regions() -> None:
    image, labels = _two_regions(48, 64)
    probs = _noisy_probs(labels, 3, signal=1.0, noise=1.0, seed=5)
    before = float((probs.argmax(0) == labels).double().mean())
    with torch.inference_mode():  # how predict and evaluate run it
        refined = dense_crf(probs, image)
    after = float((refined.argmax(0) == labels).double().mean())
    assert before < 0.7 and after > 0.98, (before, after)
    # the smoothness kernel alone helps less: the colour edge is what places the boundary
    smooth = float((dense_crf(probs, image, SPATIAL_ONLY).argmax(0) == labels).double().mean())
    assert before < smooth < after, (before, smooth, after)


def test_zero_iterations_is_the_identity() -> None:
    image, labels = _two_regions(10, 12)
    probs = _noisy_probs(labels, 3, signal=1.0, noise=1.0).double()
    out = dense_crf(probs, image, CRFParams(iterations=0))
    assert out.dtype == torch.float32
    assert torch.equal(out, probs.float())


def test_output_is_float32_probabilities_for_any_float_input() -> None:
    image, labels = _two_regions(10, 12)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        probs = _noisy_probs(labels, 3, signal=1.0, noise=1.0).to(dtype)
        out = dense_crf(probs, image, CRFParams(iterations=2))
        assert out.dtype == torch.float32 and out.shape == (3, 10, 12)
        assert _sums_to_one(out)


GOOD_PROBS = torch.full((3, 6, 7), 1 / 3)
GOOD_IMAGE = torch.zeros(3, 6, 7, dtype=torch.uint8)


@pytest.mark.parametrize(
    ("probs", "image", "params", "needle"),
    [
        (GOOD_PROBS, GOOD_IMAGE[:, :5], CRFParams(), "shape mismatch"),
        (GOOD_PROBS, GOOD_IMAGE.float(), CRFParams(), "image: expected a uint8"),
        (GOOD_PROBS, GOOD_IMAGE[:1], CRFParams(), "image: expected a uint8 RGB tensor [3,H,W]"),
        (GOOD_PROBS.long(), GOOD_IMAGE, CRFParams(), "probs: expected a float tensor"),
        (GOOD_PROBS[None], GOOD_IMAGE, CRFParams(), "probs: expected a float tensor [C,H,W]"),
        (GOOD_PROBS.log(), GOOD_IMAGE, CRFParams(), "not logits"),
        (GOOD_PROBS * 2, GOOD_IMAGE, CRFParams(), "must sum to 1"),
        (GOOD_PROBS.clone().fill_(float("nan")), GOOD_IMAGE, CRFParams(), "finite"),
        (GOOD_PROBS, GOOD_IMAGE, {"iterations": 10}, "params: expected CRFParams"),
    ],
)
def test_bad_inputs_raise_naming_the_problem(probs, image, params, needle: str) -> None:
    for fn in (dense_crf, dense_crf_reference):
        with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            fn(probs, image, params)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"iterations": -1}, "iterations=-1: must be an int >= 0"),
        ({"iterations": 2.5}, "iterations=2.5"),
        ({"bilateral_xy_std": 0.0}, "bilateral_xy_std=0.0: must be > 0"),
        ({"bilateral_rgb_std": -5.0}, "bilateral_rgb_std=-5.0: must be > 0"),
        ({"gaussian_xy_std": 0}, "gaussian_xy_std=0: must be > 0"),
        ({"gaussian_weight": -1.0}, "gaussian_weight=-1.0: must be >= 0"),
        ({"bilateral_weight": float("nan")}, "bilateral_weight=nan: must be a finite number"),
    ],
)
def test_bad_params_raise_naming_the_key(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        CRFParams(**kwargs)


def test_the_reference_refuses_images_it_cannot_hold() -> None:
    probs, image = torch.full((2, 80, 80), 0.5), torch.zeros(3, 80, 80, dtype=torch.uint8)
    with pytest.raises(ValueError, match="more than 4096 pixels"):
        dense_crf_reference(probs, image)


# ------------------------------------------------------------------------------- against pydensecrf
def test_matches_pydensecrf_on_a_real_photo() -> None:
    """Krähenbühl's C++ (pydensecrf2 1.1) on a TrashCAN frame (halved to 240x135) with smooth random
    5-class logits: the appearance term alone is the same computation (same lattice, same normalisation),
    so the results agree to float32 rounding; with the smoothness term (pydensecrf: a 2-D lattice, here
    exact) the labels agree on >= 99% of pixels (measured 99.8% while the CRF changes 33% of them)."""
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    _, images = shared_dataset("trashcan_subset_val")
    photo = Image.open(sorted(images.glob("*.jpg"))[0]).convert("RGB")
    rgb = np.array(photo.resize((photo.width // 2, photo.height // 2), Image.BILINEAR))  # 240x135: quick
    h, w = rgb.shape[:2]
    g = torch.Generator().manual_seed(6)
    coarse = F.interpolate(
        2 * torch.randn(1, 5, h // 16 + 1, w // 16 + 1, generator=g), size=(h, w), mode="bilinear"
    )
    probs = torch.softmax(coarse[0] + torch.randn(5, h, w, generator=g), dim=0)
    image = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()

    def theirs(params: CRFParams) -> torch.Tensor:
        d = dcrf.DenseCRF2D(w, h, 5)
        d.setUnaryEnergy(np.ascontiguousarray(-probs.clamp_min(crf.PROB_FLOOR).log().reshape(5, -1).numpy()))
        if params.gaussian_weight:
            d.addPairwiseGaussian(sxy=params.gaussian_xy_std, compat=params.gaussian_weight)
        d.addPairwiseBilateral(
            sxy=params.bilateral_xy_std,
            srgb=params.bilateral_rgb_std,
            rgbim=rgb,
            compat=params.bilateral_weight,
        )
        return torch.from_numpy(np.array(d.inference(params.iterations))).reshape(5, h, w)

    ours = dense_crf(probs, image, BILATERAL_ONLY)
    assert (ours - theirs(BILATERAL_ONLY)).abs().max() < 1e-4  # measured 2e-6
    ours, ref = dense_crf(probs, image), theirs(CRFParams())
    assert (ours.argmax(0) != probs.argmax(0)).double().mean() > 0.1  # the CRF does change labels here
    assert _agreement(ours, ref) >= 0.99
