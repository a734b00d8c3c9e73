"""Rounding bounds the tests derive their tolerances from.

The suite's rule: a numerical tolerance is derived from what the computation can do -- the format's rounding,
a float64 reference, an analytical bound -- never fitted to one machine (CI runs on different CPUs, whose
kernels sum in different orders). The helpers here are the standard forward-error bounds, in the notation of
Higham, Accuracy and Stability of Numerical Algorithms (2nd ed.): u is the unit roundoff of a format (round to
nearest: |fl(x) - x| <= u|x| away from the subnormal range), and gamma(n) = n u / (1 - n u) bounds the
relative error of any n-term sum or dot product, whatever the summation order, blocking or FMA use of the
kernel (Higham §3.1, Lemma 3.1 and (3.5)):

    |fl(sum a_i b_i) - sum a_i b_i| <= gamma(n) sum |a_i b_i|.

Products of at most n factors (1 + d_i), |d_i| <= u, are within gamma(n) of 1 (Lemma 3.1), which is what
makes a bound written with gamma exact rather than first order. Where a helper neglects a second-order term
its docstring says so and covers it by a stated slack.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

U64, U32, UBF16 = 2.0**-53, 2.0**-24, 2.0**-8  # unit roundoff of float64, float32, bfloat16


def gamma(n: int, u: float = U32) -> float:
    """gamma_n = n u / (1 - n u): the relative error of an n-term sum or dot product in any order."""
    assert n * u < 0.1, (n, u)  # the helpers below also rely on n u being small (second-order terms)
    return n * u / (1 - n * u)


# ----------------------------------------------------------------------------------- conv / linear chains
@torch.no_grad()
def chain_error_bound(
    layers: list[nn.Module], x: torch.Tensor, e_in: torch.Tensor | None = None, u: float = U32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y64, e): a chain's output computed in float64, and a componentwise bound e on |fl(y) - y64| for ANY
    float32 evaluation of it: zero padding added by the caller, another batch size, any kernel that computes
    each output as a dot product (direct or GEMM convolution, with or without FMA; not Winograd/FFT, which
    torch's CPU backends use for float32 only through NNPACK at batch >= 16).

    Layers: Conv2d (zero padding, any stride/dilation/groups), Linear, ReLU. A conv output is a dot product
    of K = in/groups x kh x kw weights with the input plus the bias, K + 1 terms, so with the float32 input
    a_hat within e of the exact a (|a_hat| <= |a| + e), and the float32 weights used exactly by both passes:

        |fl(W * a_hat + b) - (W * a + b)| <= |W| * e + gamma(K + 1) (|W| * (|a| + e) + |b|)

    (the first term carries the input's error through the exact map, the second is the dot product's own
    rounding, Higham (3.5); the bound is rigorous, not first order). ReLU is 1-Lipschitz and exact, so it
    carries e unchanged. e_in: a bound on the input's own error (default: the input is exact)."""
    a = x.double()
    e = torch.zeros_like(a) if e_in is None else e_in.double()
    for m in layers:
        if isinstance(m, nn.Conv2d):
            k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            w = m.weight.double()
            b = m.bias.double() if m.bias is not None else None

            def conv(
                t: torch.Tensor, w_: torch.Tensor, b_: torch.Tensor | None, m: nn.Conv2d = m
            ) -> torch.Tensor:
                return F.conv2d(t, w_, b_, m.stride, m.padding, m.dilation, m.groups)

            y = conv(a, w, b)
            mag = conv(a.abs() + e, w.abs(), b.abs() if b is not None else None)
            e = conv(e, w.abs(), None) + gamma(k + 1, u) * mag
            a = y
        elif isinstance(m, nn.Linear):
            w = m.weight.double()
            b = m.bias.double() if m.bias is not None else None
            y = F.linear(a, w, b)
            mag = F.linear(a.abs() + e, w.abs(), b.abs() if b is not None else None)
            e = F.linear(e, w.abs()) + gamma(m.in_features + 1, u) * mag
            a = y
        elif isinstance(m, nn.ReLU):
            a = a.clamp_min(0)
        else:
            raise TypeError(f"chain_error_bound: no rule for {type(m).__name__}")
    return a, e


def softmax_error_bound(
    logits64: torch.Tensor, e: torch.Tensor, dim: int = 1, u: float = U32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p64, bound): softmax of float64 logits, and a componentwise bound on |p_hat - p64| for a float32
    softmax of float32 logits known to within e of logits64 (componentwise).

    torch's CPU softmax (like any careful one) subtracts the largest logit, exponentiates, sums and divides.
    The subtraction rounds each shifted logit by u |z_c - max z| (plus u times the logits' own error, 2 max e
    at most): together with e this perturbs each exponent's argument by at most eta_c. The shift itself
    cancels in the ratio, so p_hat's arguments give p_c exp(eta_c) / sum_k p_k exp(eta_k), within a factor
    e^{+-2d} of p_c, d = max_c eta_c. The arithmetic then adds, relative to p_c: exp within 2 ulp (4u; the
    vectorised Sleef exp torch uses is within 1 ulp), the C-term sum of such values (4u + gamma(C - 1)) and
    the division (u): (C + 8) u in all, so gamma(C + 8). Altogether

        |p_hat_c - p_c| <= p_c (e^{2d} (1 + gamma(C + 8)) - 1)."""
    p = logits64.softmax(dim)
    eta = e + u * ((logits64 - logits64.amax(dim, keepdim=True)).abs() + 2 * e.amax(dim, keepdim=True))
    d = eta.amax(dim, keepdim=True)
    g = gamma(logits64.shape[dim] + 8, u)
    return p, p * (torch.expm1(2 * d) * (1 + g) + g)


# -------------------------------------------------------------------------------------------- resampling
def _aa_bilinear_axis(n_in: int, n_out: int, u: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(a_over_s [n_out], taps [n_out, n_in], T) for one axis of torch's antialiased bilinear resize from n_in to
    n_out samples (align_corners=False): see resize_error_bound."""
    s = n_in / n_out
    support = max(s, 1.0)
    inv = min(1.0, 1.0 / s)
    t_max = 2 * math.ceil(support) + 1  # torch's max_interp_size
    a_over_s = torch.empty(n_out, dtype=torch.float64)
    taps = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        c = s * (i + 0.5)
        lo, hi = max(int(c - support + 0.5), 0), min(int(c + support + 0.5), n_in)
        total = sum(max(0.0, 1.0 - abs((j - c + 0.5) * inv)) for j in range(lo, hi))
        a_over_s[i] = u * (2 * c * inv + 6) / total
        taps[i, max(lo - 1, 0) : min(hi + 1, n_in)] = 1.0
    return a_over_s, taps, t_max


def resize_error_bound(
    x64: torch.Tensor, e: torch.Tensor, size: tuple[int, int], u: float = U32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y64, bound): F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=True) -- the
    Predictor's resize -- in float64, and a componentwise bound on the float32 result's error, for a float32
    input known to within e of x64.

    torch computes it separably, one axis at a time, an axis whose size does not change being copied exactly.
    Along an axis, output i is sum_j w_ij x_j over T <= 2 ceil(max(s, 1)) + 1 taps, s = n_in / n_out, with
    triangle weights w_ij = r_ij / S_i, r_ij = max(0, 1 - |(j - c_i + 0.5) inv|), c_i = s (i + 0.5),
    inv = min(1, 1/s), S_i = sum_j r_ij. torch computes these weights in float32 (UpSampleKernel.cpp,
    _compute_indices_min_size_weights_aa): s = fl(n_in / n_out) (u), c_i = fl(s (i + 0.5)) (within 2u c_i),
    inv = fl(1 / s) (2u), the tap's offset rounded once more, 1 - |t| rounded once. The offset's error is
    absolute, of the size of c_i's rounding: |r_hat - r| <= A_i = u (2 c_i inv + 6) for every tap (a tap
    the rounding adds or drops has |r| <= A_i on both sides, so the taps are those of the exact range
    extended by one on each side). Normalised by the float32 sum of T such values (gamma(T - 1)) and one
    division (u):

        |w_hat_ij - w_ij| <= A_i / S_i + w_ij (T A_i / S_i + gamma(T))      (first order)

    The A_i / S_i term is not proportional to w_ij |x_j|: rounding moves a little weight between taps,
    which matters where neighbouring values differ in sign. Then the T-term sum adds gamma(T) sum w_hat |x_hat|,
    and the input's error is carried by the weights (sum w_hat_ij e_j). With m = |x| + e:

        e_out <= W e + (A / S) M m + (gamma(2T) + T A / S) W m

    where W is the exact resize along the axis and M sums over the extended taps. The second axis takes the
    first's output with e_out as its error and W m + e_out as its magnitude, which bounds |y| + e whatever
    order torch takes the axes in (first order, the terms of the two orders are the same). The float64
    reference's own rounding is covered by using u + 2^-53 throughout, and the neglected second-order terms,
    relative size <= 4 T max(A / S) + gamma(2T) < 1e-2 (asserted), by a factor 1.01."""
    y = F.interpolate(x64, size=size, mode="bilinear", align_corners=False, antialias=True)
    m, err = x64.abs() + e.double(), e.double()
    for axis, n_out in ((-1, size[1]), (-2, size[0])):
        n_in = m.shape[axis]
        if n_in == n_out:
            continue
        a_over_s, taps, t = _aa_bilinear_axis(n_in, n_out, u + U64)
        g = gamma(2 * t, u + U64)
        assert 4 * t * float(a_over_s.max()) + g < 1e-2, (n_in, n_out)
        out_size = (m.shape[-2], n_out) if axis == -1 else (n_out, m.shape[-1])

        def along(v: torch.Tensor, out_size: tuple[int, int] = out_size) -> torch.Tensor:
            return F.interpolate(v, size=out_size, mode="bilinear", align_corners=False, antialias=True)

        coef = a_over_s.view(-1) if axis == -1 else a_over_s.view(-1, 1)
        over_taps = m @ taps.T if axis == -1 else torch.einsum("ij,...jw->...iw", taps, m)
        err = along(err) + coef * over_taps + (g + t * coef) * along(m)
        m = along(m) + err
    return y, err * 1.01


# ------------------------------------------------------------------------------------------------- EMA
def ema_lerp_error_bound(
    bound: torch.Tensor, ema64: torch.Tensor, new64: torch.Tensor, weight: float, u: float = U32
) -> torch.Tensor:
    """One step of a componentwise bound on |float32 EMA - float64 recurrence| for the update
    ema <- lerp(ema, new, weight) (train.ema: torch._foreach_lerp_ with a scalar weight); call it with the
    bound and the float64 ema64 before updating ema64 to ema64 + weight (new64 - ema64).

    torch's lerp computes ema + w (new - ema) for w < 0.5 and new - (new - ema)(1 - w) otherwise, in float32,
    the weight itself rounded to float32 (relative u; 1 - w of a float32 w >= 0.5 is exact). On the exact
    inputs the update is the affine map (1 - w) ema + w new, so the float32 ema's carried error is multiplied
    by (1 - w) exactly. The step adds the rounding of the difference (u), of the weight or 1 - w (u w / (1 - w)
    relative, times (1 - w)), and of the product (u), together <= 3u |new - ema|, and of the result (u |result|):
    4u |new - ema| leaves slack for the second-order terms. The float64 recurrence rounds a few times per step
    (8 u64 |result| covers it, and its accumulation, which the recurrence carries like the float32 error)."""
    result = ema64 + weight * (new64 - ema64)
    return (1 - weight) * bound + u * result.abs() + 4 * u * (new64 - ema64).abs() + 8 * U64 * result.abs()


# ------------------------------------------------------------------------------------------- BatchNorm
def bn_train_error_bounds(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    dy: torch.Tensor,
    eps: float,
    momentum: float,
    u: float = U32,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{quantity: (float64 reference, bound)} for one training-mode BatchNorm2d step evaluated in float32 from
    the float32 input x [N, C, H, W] and output gradient dy, whatever the reduction order or the number of
    ranks the statistics are combined over (per-rank statistics combined in float32 or float64). Quantities:
    output, input_grad, weight_grad, bias_grad, running_mean, running_var (starting from 0 and 1).
    n = N H W per channel.

    Assumption (the one thing taken from the literature, not re-derived here): the statistics are as accurate
    as the two-pass algorithm, with gamma(2n) in place of gamma(n) to cover Welford's extra operation per
    element (Chan, Golub & LeVeque 1983: both err by O(n u kappa)):
      |mean_hat - mean| <= Em = gamma(2n) mean|x|,
      |var_hat - var|   <= Ev = gamma(2n + 4) var + 2 Em mean|x - mean| + Em^2.
    torch's own float32 BatchNorm satisfies every bound below too, which cross-checks that assumption.
    Then r = (var + eps)^-1/2 to within Er = Ev / (2 (var + eps)) + 6u relative (eps added, rsqrt within
    2 ulp), xhat = (x - mean) r to within Exh = r Em + |xhat| (Er + 2u), and
      y  = w xhat + b (or its fused form x (w r) + (b - mean w r)): Ey <= |w| Exh + 3u |w| r (|x| + |mean|) + 2u |b|
      dx = w r (dy - A - xhat B), A = mean(dy), B = mean(dy xhat):
           |dA| <= gamma(n + 2) mean|dy|, |dB| <= gamma(n + 2) mean(|dy||xhat|) + mean(|dy| Exh),
           Edx <= |w| r (|dA| + Exh |B| + |xhat| |dB| + 5u (|dy| + |A| + |xhat B|)) + |dx| Er
      dw = sum dy xhat: gamma(n + 2) sum |dy xhat| + sum |dy| Exh;  db = sum dy: gamma(n + 2) sum |dy|
      running_mean = (1 - m) 0 + m mean: m Em + 3u m |mean|
      running_var  = (1 - m) 1 + m var n/(n - 1): m Ev n/(n - 1) + 4u ((1 - m) + m var n/(n - 1)).
    The running statistics and the bias gradient are linear in the statistics' errors (or free of them), and
    their bounds hold as written, up to products of roundings (the factor 1.25). The output and the input and
    weight gradients go through r, and their bounds are first order in the statistics' errors, valid while
    those are small against the variance: with x = Ev / (var + eps) <= 0.1, |r_hat / r - 1| <=
    (x/2) (1 - x)^{-3/2} <= 1.17 (x/2), and the other neglected products are <= x/2 relative, so the factor
    1.25 covers them. In a channel where the any-order statistics error is larger (many values far from zero
    against their spread: gamma(2n) mean|x| near the standard deviation) no bound of this kind exists: those
    three bounds are inf there, and a caller must check such channels another way (the SyncBN workers compare
    with torch's BatchNorm there)."""
    x64, dy64 = x.double(), dy.double()
    w, b = weight.double().view(1, -1, 1, 1), bias.double().view(1, -1, 1, 1)
    dims = (0, 2, 3)
    n = x64.numel() // x64.shape[1]
    mean = x64.mean(dims, keepdim=True)
    var = ((x64 - mean) ** 2).mean(dims, keepdim=True)
    em = gamma(2 * n, u) * x64.abs().mean(dims, keepdim=True)
    ev = gamma(2 * n + 4, u) * var + 2 * em * (x64 - mean).abs().mean(dims, keepdim=True) + em**2
    r = (var + eps).rsqrt()
    er = ev / (2 * (var + eps)) + 6 * u
    xh = (x64 - mean) * r
    exh = r * em + xh.abs() * (er + 2 * u)
    y = w * xh + b
    ey = w.abs() * exh + 3 * u * w.abs() * r * (x64.abs() + mean.abs()) + 2 * u * b.abs()
    a_, b_ = dy64.mean(dims, keepdim=True), (dy64 * xh).mean(dims, keepdim=True)
    da = gamma(n + 2, u) * dy64.abs().mean(dims, keepdim=True)
    db_ = gamma(n + 2, u) * (dy64.abs() * xh.abs()).mean(dims, keepdim=True)
    db_ = db_ + (dy64.abs() * exh).mean(dims, keepdim=True)
    dx = w * r * (dy64 - a_ - xh * b_)
    edx = (
        w.abs()
        * r
        * (da + exh * b_.abs() + xh.abs() * db_ + 5 * u * (dy64.abs() + a_.abs() + (xh * b_).abs()))
    )
    edx = edx + dx.abs() * er
    dw = (dy64 * xh).sum(dims)
    edw = gamma(n + 2, u) * (dy64 * xh).abs().sum(dims) + (dy64.abs() * exh).sum(dims)
    dbias = dy64.sum(dims)
    edb = gamma(n + 2, u) * dy64.abs().sum(dims)
    m = momentum
    rm = m * mean.flatten()
    erm = m * em.flatten() + 3 * u * m * mean.abs().flatten()
    unb = var.flatten() * n / (n - 1)
    rv = (1 - m) * 1.0 + m * unb
    erv = m * ev.flatten() * n / (n - 1) + 4 * u * ((1 - m) + m * unb)
    through_r = torch.where(ev / (var + eps) <= 0.1, 1.25, torch.inf)  # [1, C, 1, 1]: inf outside the regime
    slack = 1.25
    return {
        "output": (y, ey * through_r),
        "input_grad": (dx, edx * through_r),
        "weight_grad": (dw, edw * through_r.flatten()),
        "bias_grad": (dbias, edb * slack),
        "running_mean": (rm, erm * slack),
        "running_var": (rv, erv * slack),
    }
