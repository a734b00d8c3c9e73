"""DeepLab v1's fully connected CRF (Chen et al., ICLR 2015): post-processing of softmax probabilities.

Krähenbühl & Koltun's model (NIPS 2011): unary -log P_i(l) from the network, a Potts term between every
pair of pixels with an appearance kernel w1 exp(-|p_i-p_j|^2 / 2 theta_alpha^2 - |I_i-I_j|^2 / 2 theta_beta^2)
and a smoothness kernel w2 exp(-|p_i-p_j|^2 / 2 theta_gamma^2), and a fixed number of mean-field updates
    Q_i(l) ∝ exp(log P_i(l) + sum_k w_k m^k_i(l)),   m^k = D_k K_k D_k Q,   D_k = diag(K_k 1)^-1/2.
This is the inference of Krähenbühl's densecrf 2.x code, which DeepLab and pydensecrf ship: messages
normalised NORMALIZE_SYMMETRIC (its default), every kernel sum including j = i (a lattice cannot leave the
self term out cheaply, and DeepLab's weights were tuned with it in). Potts w [l_i != l_j] = w - w [l_i == l_j]
and the constant cancels in the softmax, hence the plus sign: agreeing labels are rewarded.

Exact messages cost O(N^2) in the N pixels; here, in plain PyTorch (float32, CPU or CUDA):
- smoothness: the 2-D Gaussian over positions is separable, so a filter along the rows then the columns;
  exact up to cutting the kernel at GAUSSIAN_TRUNCATE stds (~6e-5 of its mass; not cut at all where it
  runs as a dense matrix product);
- appearance: the permutohedral lattice (Adams, Baek & Davis, Eurographics 2010) in the 5-D space
  (x, y, r, g, b) / std, built as Krähenbühl's `Permutohedral::init` builds it: splat each pixel onto the
  d+1 vertices of its simplex with barycentric weights, blur [1, 2, 1] along each of the d+1 lattice
  directions, slice back with the same weights. The hash table is torch.unique over vertex keys packed
  into one int64 (mixed radix); neighbours are found by searchsorted. An approximation (a few % on the
  messages, tests/test_crf.py); on real photos it reproduces pydensecrf's appearance term to float32.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

# pydensecrf.utils.unary_from_softmax's default clip: a probability that underflowed to 0 would make its
# label impossible (infinite unary) however strongly the image argues for it.
PROB_FLOOR = 1e-5
GAUSSIAN_TRUNCATE = 4.0  # smoothness kernel radius, in stds
Message = Callable[[Tensor], Tensor]  # Q [C,H,W] -> the normalised kernel sum D K D Q, [C,H,W]
REFERENCE_MAX_PIXELS = 4096  # dense_crf_reference holds N x N float64 kernels: 128 MiB each at this size


@dataclass(frozen=True)
class CRFParams:
    """Kernel weights and widths. Defaults: DeepLab-LargeFOV's published PASCAL VOC 2012 values (the
    DeepLab v1 release lists "FOV: bi_w = 4, bi_xy_std = 121, bi_rgb_std = 5, pos_w = 3, pos_xy_std = 3",
    10 mean-field iterations; Chen et al. 2015 fix w2 = 3, theta_gamma = 3 and cross-validate the rest on
    VOC val). Tuned for VOC's ~500x375 photos and a stride-8 network: retune for other data."""

    iterations: int = 10
    bilateral_weight: float = 4.0  # w1
    bilateral_xy_std: float = 121.0  # theta_alpha, pixels
    bilateral_rgb_std: float = 5.0  # theta_beta, 0..255 intensity units
    gaussian_weight: float = 3.0  # w2
    gaussian_xy_std: float = 3.0  # theta_gamma, pixels

    def __post_init__(self) -> None:  # refused when built, so a bad config fails before any model runs
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"CRFParams.iterations={self.iterations!r}: must be an int >= 0")
        for name in [f.name for f in fields(self)][1:]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"CRFParams.{name}={value!r}: must be a finite number")
            if name.endswith("_std") and value <= 0:
                raise ValueError(f"CRFParams.{name}={value!r}: must be > 0 (a kernel width)")
            if name.endswith("_weight") and value < 0:
                raise ValueError(f"CRFParams.{name}={value!r}: must be >= 0 (0 switches the kernel off)")


def dense_crf(probs: Tensor, image: Tensor, params: CRFParams = CRFParams()) -> Tensor:
    """probs float [C,H,W] (softmax, sums to 1 over C), image uint8 [3,H,W] RGB at the same H,W -> refined
    probabilities float32 [C,H,W] on probs' device; iterations=0 returns probs as float32. Memory O(N C):
    ~0.35 GB peak for a 512x512 image with 11 classes. ValueError naming a wrong shape, dtype or value."""
    _check_inputs(probs, image, params)
    probs, image = probs.float(), image.to(probs.device)
    if params.iterations == 0:
        return probs.clone()  # a new tensor, as for iterations > 0
    _, h, w = probs.shape
    messages: list[tuple[float, Message]] = []
    if params.gaussian_weight > 0:
        smooth = _SeparableGaussian(h, w, params.gaussian_xy_std, probs.device)
        messages.append((params.gaussian_weight, smooth))
    if params.bilateral_weight > 0:
        lattice = Permutohedral(_bilateral_features(image, params))
        messages.append((params.bilateral_weight, _normalised(lattice.filter, h, w, probs)))
    return _mean_field(probs, messages, params.iterations)


def dense_crf_reference(probs: Tensor, image: Tensor, params: CRFParams = CRFParams()) -> Tensor:
    """The same model with exact O(N^2) kernels in float64 (same normalisation, self term included, nothing
    truncated): ground truth for tests on images of at most REFERENCE_MAX_PIXELS pixels. Returns float64."""
    _check_inputs(probs, image, params)
    probs, image = probs.double(), image.to(probs.device)
    _, h, w = probs.shape
    if h * w > REFERENCE_MAX_PIXELS:
        raise ValueError(f"dense_crf_reference: a {h}x{w} image has more than {REFERENCE_MAX_PIXELS} pixels")
    if params.iterations == 0:
        return probs
    kernels = [_exact_kernel(_positions(h, w, probs.device) / params.gaussian_xy_std)]
    kernels.append(_exact_kernel(_bilateral_features(image, params)))
    weights = (params.gaussian_weight, params.bilateral_weight)
    messages = [(wt, _normalised(k.__matmul__, h, w, probs)) for wt, k in zip(weights, kernels, strict=True)]
    return _mean_field(probs, messages, params.iterations)


# ------------------------------------------------------------------------------------------------ shared
def _check_inputs(probs: Tensor, image: Tensor, params: CRFParams) -> None:
    if not isinstance(params, CRFParams):
        raise ValueError(f"params: expected CRFParams, got {type(params).__name__}")
    if not isinstance(probs, Tensor) or not probs.is_floating_point() or probs.dim() != 3:
        raise ValueError(f"probs: expected a float tensor [C,H,W], got {_describe(probs)}")
    if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected a uint8 RGB tensor [3,H,W], got {_describe(image)}")
    if image.shape[1:] != probs.shape[1:]:
        raise ValueError(
            f"shape mismatch: probs [C,H,W] {list(probs.shape)}, image [3,H,W] {list(image.shape)}"
        )
    if probs.numel() == 0:
        raise ValueError(f"probs: empty shape {list(probs.shape)}")
    # cheap next to the CRF, and catches logits passed by mistake (their unary would be meaningless)
    if not bool(torch.isfinite(probs).all()) or float(probs.min()) < 0:
        raise ValueError("probs: must be finite and >= 0 (softmax probabilities, not logits)")
    total = probs.float().sum(0)
    if float((total - 1).abs().max()) > (1e-2 if torch.finfo(probs.dtype).bits >= 32 else 5e-2):
        lo, hi = float(total.min()), float(total.max())
        raise ValueError(
            f"probs: must sum to 1 over the class dim 0 (softmax); the sums are {lo:.4g}..{hi:.4g}"
        )


def _describe(x: object) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _mean_field(probs: Tensor, messages: list[tuple[float, Message]], iterations: int) -> Tensor:
    """Krähenbühl's `DenseCRF::inference`: Q = softmax(-unary), then `iterations` updates. probs [C,H,W]."""
    log_p = probs.clamp_min(PROB_FLOOR).log()
    q = torch.softmax(log_p, dim=0)
    for _ in range(iterations):
        energy = log_p.clone()
        for weight, message in messages:
            energy.add_(message(q), alpha=weight)
        q = torch.softmax(energy, dim=0)
    return q


def _normalised(filter_: Callable[[Tensor], Tensor], h: int, w: int, like: Tensor) -> Message:
    """NORMALIZE_SYMMETRIC: Q -> D K D Q, D = diag(K 1)^-1/2, for a filter_ v [N, C] -> K v (pixels as rows).
    Constant factors in the filter (the lattice blur's and slice's scaling) cancel."""
    norm = (filter_(like.new_ones(h * w, 1)) + 1e-20).rsqrt()

    def message(q: Tensor) -> Tensor:
        c = q.shape[0]
        return (filter_(norm * q.reshape(c, h * w).t()) * norm).t().reshape(c, h, w)

    return message


def _positions(h: int, w: int, device: torch.device) -> Tensor:
    """[N, 2] float64 (x, y) of each pixel, row-major like pydensecrf's features (x = column)."""
    i = torch.arange(h * w, device=device)
    return torch.stack([i % w, i // w], dim=1).double()


def _bilateral_features(image: Tensor, params: CRFParams) -> Tensor:
    """[N, 5] float64 (x, y) / theta_alpha, (r, g, b) / theta_beta: the kernel is exp(-|f_i - f_j|^2 / 2)."""
    _, h, w = image.shape
    pos = _positions(h, w, image.device) / params.bilateral_xy_std
    rgb = image.reshape(3, h * w).t().double() / params.bilateral_rgb_std
    return torch.cat([pos, rgb], dim=1)


def _exact_kernel(f: Tensor) -> Tensor:
    """exp(-|f_i - f_j|^2 / 2) for all pairs, diagonal (the self term) included: [N, N] float64."""
    sq = (f * f).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * f @ f.t()).clamp_min(0)
    return torch.exp(-0.5 * d2)


class _SeparableGaussian:
    """Normalised smoothness message on [C, H, W]: exp(-|p_i - p_j|^2 / 2 std^2) as a filter along the rows
    then the columns, centre tap included, nothing beyond the border (pixels outside the image do not
    exist). An axis of n pixels runs as 2r+1 shifted adds, O(r) per pixel, the kernel cut at r =
    GAUSSIAN_TRUNCATE stds (on CPU 5-7x faster than a product with the n x n Gaussian matrix at n = 512);
    when 2r+1 >= n (a kernel wider than the axis) as that product instead: O(n) <= O(r), and exact."""

    def __init__(self, h: int, w: int, std: float, device: torch.device) -> None:
        self.axes = [self._axis(n, dim, std, device) for n, dim in ((w, -1), (h, -2))]
        self.norm = (self._blur(torch.ones(1, h, w, device=device)) + 1e-20).rsqrt()

    @staticmethod
    def _axis(n: int, dim: int, std: float, device: torch.device) -> tuple[int, Tensor | list[float]]:
        radius = math.ceil(GAUSSIAN_TRUNCATE * std)
        if 2 * radius + 1 < n:
            k = torch.arange(-radius, radius + 1, dtype=torch.float64)
            return dim, torch.exp(-0.5 * (k / std) ** 2).tolist()
        i = torch.arange(n, device=device, dtype=torch.float64)
        return dim, torch.exp(-0.5 * ((i[:, None] - i[None, :]) / std) ** 2).float()

    def _blur(self, x: Tensor) -> Tensor:
        for dim, kernel in self.axes:
            if isinstance(kernel, Tensor):  # symmetric: x @ G filters the rows, G @ x the columns
                x = x @ kernel if dim == -1 else kernel @ x
                continue
            n, r = x.shape[dim], len(kernel) // 2
            padded = F.pad(x, (r, r) if dim == -1 else (0, 0, r, r))
            x = padded.narrow(dim, 0, n) * kernel[0]
            for t in range(1, 2 * r + 1):
                x.add_(padded.narrow(dim, t, n), alpha=kernel[t])
        return x

    def __call__(self, q: Tensor) -> Tensor:
        return self.norm * self._blur(self.norm * q)


# ---------------------------------------------------------------------------------------- the lattice
class Permutohedral:
    """Gaussian filtering exp(-|f_i - f_j|^2 / 2) of values at N points with features f [N, d] (Adams et al.
    2010), built as Krähenbühl's densecrf `Permutohedral::init` builds it. `filter(v)`: [N, C] -> [N, C]
    float32, the self term included, up to a constant factor (which the symmetric normalisation cancels)."""

    def __init__(self, features: Tensor) -> None:
        f = features.double()  # construction in float64: rounding to the lattice is then stable
        n, d = f.shape
        dev = f.device
        # Elevate onto the plane sum(x) = 0 of R^(d+1), scaled so that the lattice blur has std 1 in feature
        # units (Adams et al. p. 5-6): elevated[j] = sum_{k >= j} cf_k - j cf_(j-1)
        inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
        i = torch.arange(1, d + 1, device=dev, dtype=torch.float64)
        cf = f * (inv_std / torch.sqrt(i * (i + 1)))
        elevated = torch.cat([cf.flip(1).cumsum(1).flip(1), cf.new_zeros(n, 1)], dim=1)  # [N, d+1]
        elevated[:, 1:] -= i * cf
        # the nearest remainder-0 lattice point (coordinates multiples of d+1), ties rounded down as densecrf
        v = elevated / (d + 1)
        up, down = torch.ceil(v) * (d + 1), torch.floor(v) * (d + 1)
        rem0 = torch.where(up - elevated < elevated - down, up, down)
        total = torch.round(rem0.sum(1) / (d + 1)).long()
        # rank[i]: place of coordinate i in the descending order of elevated - rem0, ties: lower index first
        order = torch.argsort(elevated - rem0, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(d + 1, device=dev).expand(n, -1))
        # points off the plane (total != 0) come back by a cyclic shift of the ranks
        rank = rank + total[:, None]
        low, high = rank < 0, rank > d
        rank = torch.where(low, rank + d + 1, torch.where(high, rank - d - 1, rank))
        rem0 = torch.where(low, rem0 + d + 1, torch.where(high, rem0 - d - 1, rem0))
        # barycentric coordinates (Adams et al. p. 10): the weight of simplex vertex r
        delta = (elevated - rem0) / (d + 1)
        bary = f.new_zeros(n, d + 2).scatter_add_(1, d - rank, delta).scatter_add_(1, d - rank + 1, -delta)
        bary[:, 0] += 1.0 + bary[:, d + 1]
        offsets, self.m, self.neighbours = _hash_vertices(rem0.round().long(), rank)
        # splat and slice as sparse matrices: one pass each instead of gathering [N, d+1, C] temporaries
        weights = bary[:, : d + 1].float()
        offsets, by_point = offsets.sort(dim=1)
        weights = weights.gather(1, by_point)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are basic
            warnings.simplefilter("ignore", UserWarning)
            crow = torch.arange(0, n * (d + 1) + 1, d + 1, device=dev)
            self._slice = torch.sparse_csr_tensor(
                crow, offsets.reshape(-1), weights.reshape(-1), (n, self.m + 1)
            )
            flat = offsets.reshape(-1)
            order = torch.argsort(flat, stable=True)  # by lattice point, then pixel
            counts = torch.bincount(flat, minlength=self.m + 1)
            crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            self._splat = torch.sparse_csr_tensor(
                crow, order // (d + 1), weights.reshape(-1)[order], (self.m + 1, n)
            )

    def filter(self, values: Tensor) -> Tensor:
        """[N, C] -> [N, C] float32: splat, blur with [1, 2, 1] along each lattice direction, slice."""
        lat = self._splat @ values.float()  # [M + 1, C]; row M (the absent neighbour) stays 0
        for n1, n2 in self.neighbours:
            blurred = lat.index_select(0, n1).add_(lat.index_select(0, n2)).mul_(0.5).add_(lat[: self.m])
            lat = torch.cat([blurred, lat[self.m :]])
        return self._slice @ lat


def _hash_vertices(rem0: Tensor, rank: Tensor) -> tuple[Tensor, int, Tensor]:
    """The lattice points of every pixel's simplex vertices: (ids [N, d+1], M, neighbours [d+1, 2, M]), ids
    in 0..M-1 and M for a blur neighbour that no pixel touches. Vertex r of a pixel has the d free
    coordinates rem0_k + canonical[r, rank_k], canonical[r, j] = r - (d+1) [j > d - r] (densecrf)."""
    n, d1 = rank.shape
    d = d1 - 1
    dev = rank.device
    # mixed-radix int64 code of a key; the margin keeps every vertex and its neighbours (keys differ by at
    # most d+1 per coordinate) inside the radix, so a neighbour's code is the point's code plus a constant
    lo = rem0[:, :d].min(0).values - (2 * d + 1)
    span = (rem0[:, :d].max(0).values + (2 * d + 1) - lo + 1).tolist()
    if math.prod(span) >= 2**62:  # coordinates too spread for one int64 (tiny stds): hash the rows
        return _hash_rows(rem0, rank)
    radix = [math.prod(span[k + 1 :]) for k in range(d)]
    rad = torch.tensor(radix, device=dev)
    base = ((rem0[:, :d] - lo) * rad).sum(1)
    # sum_k radix_k [rank_k > d - r] for each r, from the radix mass at each rank
    mass = torch.zeros(n, d1, dtype=torch.long, device=dev).scatter_add_(1, rank[:, :d], rad.expand(n, -1))
    above = torch.cat([mass.flip(1).cumsum(1).flip(1)[:, 1:], mass.new_zeros(n, 1)], dim=1).flip(1)
    r = torch.arange(d1, device=dev)
    codes = base[:, None] + r * sum(radix) - d1 * above  # [N, d+1]
    points, inverse = torch.unique(codes, sorted=True, return_inverse=True)
    m = points.numel()
    # neighbours along direction j: every free coordinate -1, coordinate j +d (j = d: only the -1s); and -
    step = torch.tensor([(d1 * radix[j] if j < d else 0) - sum(radix) for j in range(d1)], device=dev)
    nbrs = torch.stack([_find(points, points + step[:, None]), _find(points, points - step[:, None])], 1)
    return inverse, m, nbrs


def _find(points: Tensor, queries: Tensor) -> Tensor:
    """Index of each query code in the sorted `points`, len(points) where absent."""
    idx = torch.searchsorted(points, queries).clamp_max(points.numel() - 1)
    return torch.where(points[idx] == queries, idx, points.numel())


def _hash_rows(rem0: Tensor, rank: Tensor) -> tuple[Tensor, int, Tensor]:
    """`_hash_vertices` on the key rows themselves (torch.unique(dim=0)): slower, for any coordinate range."""
    n, d1 = rank.shape
    d = d1 - 1
    dev = rank.device
    r = torch.arange(d1, device=dev)
    canonical = torch.where(r[None, :] <= d - r[:, None], r[:, None], r[:, None] - d1)  # [r, j]
    keys = rem0[:, None, :d] + canonical[:, rank[:, :d]].permute(1, 0, 2)  # [N, d+1, d]
    points, inverse = torch.unique(keys.reshape(-1, d), dim=0, return_inverse=True)
    m = points.shape[0]
    queries = []
    for j in range(d1):
        step = torch.full((d,), -1, dtype=torch.long, device=dev)
        if j < d:
            step[j] += d1
        queries += [points + step, points - step]
    every, ids = torch.unique(torch.cat([points, *queries]), dim=0, return_inverse=True)
    table = torch.full((every.shape[0],), m, dtype=torch.long, device=dev)
    table[ids[:m]] = torch.arange(m, device=dev)
    return inverse.view(n, d1), m, table[ids[m:]].view(d1, 2, m)
