"""Run under torchrun: CpuSyncBatchNorm in float32 and bf16 against a float64 reference, on inputs that break a one-pass
E[x^2] - E[x]^2 variance (large mean, small spread, few values per channel).

For each case, every rank normalises its slice of a float32 batch; the float64 reference is plain BatchNorm over
the whole batch in float64. The error must be as small as torch's own BatchNorm at the same precision on the whole batch
(within a factor, plus a floor for values that are exactly representable). Prints one line per case and rank.
"""

import sys

import torch
import torch.distributed as dist
from torch import nn

from dist_seg.runtime import distributed as D

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


def run_case(
    name: str, shape: tuple[int, ...], mean: float | None, std: float | None, dtype: torch.dtype
) -> list[str]:
    world, rank = dist.get_world_size(), dist.get_rank()
    full = make_input(shape, mean, std, dtype)
    g = torch.Generator().manual_seed(1)
    gout = torch.randn(shape, generator=g).to(dtype)
    c = shape[1]

    # float64 reference over the whole batch
    ref = nn.BatchNorm2d(c, momentum=0.3).double()
    x64 = full.double().requires_grad_(True)
    y64 = ref(x64)
    y64.backward(gout.double())

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
    for what, ours, torch_fp32, reference, floor in [
        ("output", y.detach(), yt.detach()[part], y64.detach()[part], 1e-5),
        ("input_grad", x.grad, xt.grad[part], x64.grad[part], 1e-5),
        ("running_mean", bn.running_mean, tbn.running_mean, ref.running_mean, 1e-6),
        ("running_var", bn.running_var, tbn.running_var, ref.running_var, 1e-6),
    ]:
        e_ours, e_torch = max_err(ours, reference), max_err(torch_fp32, reference)
        scale = float(reference.abs().max()) or 1.0
        ok = e_ours <= 4 * e_torch + floor * max(1.0, scale)
        print(f"rank {rank} {name} {what}: ours {e_ours:.3g} torch {e_torch:.3g}", flush=True)
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
