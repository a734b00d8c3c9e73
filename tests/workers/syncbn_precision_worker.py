"""Run under torchrun: CpuSyncBatchNorm in float32 and bf16 against a float64 reference, on inputs that break a one-pass
E[x^2] - E[x]^2 variance (large mean, small spread, few values per channel).

For each case, every rank normalises its slice of a float32 batch. Every value (output, input gradient, running
mean and variance) is compared, element by element, with the float64 formula under numerics.bn_train_error_bounds:
the rounding a float32 BatchNorm step can do whatever its reduction order or rank count (derived there, with its one
stated assumption: statistics as accurate as the two-pass algorithm). bf16 cases add the final rounding of the
output and the input gradient to bf16: UBF16 (|ref| + bound). torch's own BatchNorm at the same precision over the
whole batch must satisfy the same bounds, which cross-checks them. Measured (ours / torch's, error / bound): fc_1x1
0.079 / 0.146, one_value_per_rank 0.215 / 0.215, bf16_fc 0.936 / 0.936 (bf16's output rounding, attained: bf16
keeps 8 bits).

Where the statistics' any-order error bound is not small against the variance, no bound exists for what goes
through 1/sqrt(var + eps), the output and the input gradient (the helper returns inf there): the two conv maps
(n = 200,704 and 12,544 values per channel at mean 30, std 0.5: gamma(2n) mean|x| is 1.4 and 0.09 standard
deviations) and two channels of uneven_means_per_channel (means 1e4 and -300 against spreads 0.1 and 3e-3). There
the check is relative to torch's own BatchNorm on the same values: e_ours <= 4 e_torch (a one-pass
E[x^2] - E[x]^2 measured 4 orders of magnitude worse than torch). The running statistics, linear in the
statistics' errors, keep their bounds everywhere. Prints one line per case, quantity and rank.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dist_seg.runtime import distributed as D

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/numerics.py
from numerics import UBF16, bn_train_error_bounds  # noqa: E402

# (name, full batch shape, channel mean, channel std): the second is fc6/fc7 of DeconvNet at 224 px (a 1x1
# map: the statistics of a channel come from one value per image)
# bf16 cases: what a conv under bf16 autocast feeds the norm (bf16 in, bf16 out, statistics in float32)
F32, BF16 = torch.float32, torch.bfloat16
CASES = [
    ("conv_map_mean30_std0.5", (4, 8, 224, 224), 30.0, 0.5, F32),
    ("fc_1x1_mean50_std0.05", (8, 64, 1, 1), 50.0, 0.05, F32),
    ("one_value_per_rank_mean1e3_std1e-2", (2, 16, 1, 1), 1000.0, 0.01, F32),
    ("uneven_means_per_channel", (6, 4, 3, 3), None, None, F32),
    ("bf16_conv_map_mean30_std0.5", (4, 8, 56, 56), 30.0, 0.5, BF16),
    ("bf16_fc_1x1_mean8_std0.5", (8, 64, 1, 1), 8.0, 0.5, BF16),
]


def make_input(
    shape: tuple[int, ...], mean: float | None, std: float | None, dtype: torch.dtype
) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if mean is None:  # channels with very different offsets and spreads
        base = torch.randn(shape, generator=g, dtype=torch.float64)
        offsets = torch.tensor([0.0, 1e4, -300.0, 7.0], dtype=torch.float64).view(1, -1, 1, 1)
        spreads = torch.tensor([1.0, 1e-1, 3e-3, 50.0], dtype=torch.float64).view(1, -1, 1, 1)
        return (base * spreads + offsets).to(dtype)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).abs().max())


def max_used(a: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> float:
    return float(((a.double() - ref).abs() / bound).max())


def run_case(
    name: str, shape: tuple[int, ...], mean: float | None, std: float | None, dtype: torch.dtype
) -> list[str]:
    world, rank = dist.get_world_size(), dist.get_rank()
    full = make_input(shape, mean, std, dtype)
    g = torch.Generator().manual_seed(1)
    gout = torch.randn(shape, generator=g).to(dtype)
    c = shape[1]

    # float64 reference over the whole batch, and the bounds (a fresh BatchNorm: weight 1, bias 0, eps 1e-5)
    bounds = bn_train_error_bounds(full.float(), torch.ones(c), torch.zeros(c), gout.float(), 1e-5, 0.3)

    # torch's own BatchNorm (float32 parameters) on the same inputs over the whole batch: the accuracy to match
    tbn = nn.BatchNorm2d(c, momentum=0.3)
    xt = full.clone().requires_grad_(True)
    yt = tbn(xt)
    yt.backward(gout)

    bn = D.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(c, momentum=0.3)), torch.device("cpu"))[0]
    per = shape[0] // world
    part = slice(per * rank, per * (rank + 1))
    x = full[part].clone().requires_grad_(True)
    y = bn(x)
    y.backward(gout[part])
    assert y.dtype == dtype and x.grad.dtype == dtype

    bad = []
    for what, ours, torch_own in [
        ("output", y.detach(), yt.detach()[part]),
        ("input_grad", x.grad, xt.grad[part]),
        ("running_mean", bn.running_mean, tbn.running_mean),
        ("running_var", bn.running_var, tbn.running_var),
    ]:
        reference, bound = bounds[what]
        if what in ("output", "input_grad"):
            reference, bound = reference[part], bound[part]
            if dtype == BF16:  # computed in float32, then rounded to bf16
                bound = bound + UBF16 * (reference.abs() + bound)
        used_ours, used_torch = max_used(ours, reference, bound), max_used(torch_own, reference, bound)
        ok = used_ours <= 1 and used_torch <= 1
        line = f"rank {rank} {name} {what}: error / bound: ours {used_ours:.3g} torch {used_torch:.3g}"
        unbounded = torch.isinf(bound)
        # the channels without a bound: as accurate as torch's BatchNorm (see the docstring)
        if unbounded.any():
            e_ours = max_err(ours[unbounded], reference[unbounded])
            e_torch = max_err(torch_own[unbounded], reference[unbounded])
            ok = ok and e_ours <= 4 * e_torch
            line += f"; unbounded channels' max error: ours {e_ours:.3g} torch {e_torch:.3g}"
        print(line, flush=True)
        if not ok:
            bad.append(what)
    return bad


world = D.init_distributed("cpu", timeout_s=60)
try:
    failures = []
    for case in CASES:
        failures += [f"{case[0]}:{w}" for w in run_case(*case)]
    print(f"rank {world.rank}: {'OK' if not failures else 'MISMATCH ' + ','.join(failures)}", flush=True)
    sys.exit(1 if failures else 0)
finally:
    D.cleanup()
