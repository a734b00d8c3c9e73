"""Run under torchrun: each rank normalises its half of a batch with CpuSyncBatchNorm; the result must equal
BatchNorm over the whole batch (outputs, input gradients, summed weight gradients, running stats).

"Equal" within the rounding a float32 BatchNorm step can do, whatever its reduction order or rank count:
every quantity is compared, element by element, with the float64 formula under
numerics.bn_train_error_bounds (derived there, with its one stated assumption). torch's own float32
BatchNorm over the whole batch must satisfy the same bounds (a cross-check of the bounds and of that
assumption). Measured: both within 0.0045 of the bounds; a per-rank statistic is off by orders of magnitude.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dist_seg.runtime import distributed as D

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/numerics.py
from numerics import bn_train_error_bounds  # noqa: E402

world = D.init_distributed("cpu", timeout_s=60)
try:
    torch.manual_seed(0)
    full = torch.randn(6, 3, 5, 4, dtype=torch.float64).float() * 3 + 1
    weight = torch.rand(3) + 0.5
    bias = torch.randn(3)
    gout = torch.randn(6, 3, 5, 4)
    ref = nn.BatchNorm2d(3, momentum=0.3)
    ref.weight.data.copy_(weight), ref.bias.data.copy_(bias)
    x_ref = full.clone().requires_grad_(True)
    y_ref = ref(x_ref)
    y_ref.backward(gout)

    bn = D.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3, momentum=0.3)), world.device)[0]
    assert isinstance(bn, D.CpuSyncBatchNorm)
    bn.weight.data.copy_(weight), bn.bias.data.copy_(bias)
    part = slice(3 * world.rank, 3 * world.rank + 3)
    x = full[part].clone().requires_grad_(True)
    y = bn(x)
    y.backward(gout[part])
    wgrad = bn.weight.grad.clone()
    bgrad = bn.bias.grad.clone()
    dist.all_reduce(wgrad), dist.all_reduce(bgrad)
    bounds = bn_train_error_bounds(full, weight, bias, gout, eps=ref.eps, momentum=0.3)
    ours = {
        "output": y.detach(),
        "input_grad": x.grad,
        "weight_grad": wgrad,
        "bias_grad": bgrad,
        "running_mean": bn.running_mean,
        "running_var": bn.running_var,
    }
    theirs = {
        "output": y_ref.detach()[part],
        "input_grad": x_ref.grad[part],
        "weight_grad": ref.weight.grad,
        "bias_grad": ref.bias.grad,
        "running_mean": ref.running_mean,
        "running_var": ref.running_var,
    }
    bad = []
    for k, got in ours.items():
        r64, bound = bounds[k]
        if k in ("output", "input_grad"):  # this rank's half of the batch
            r64, bound = r64[part], bound[part]
        used = {
            w: float(((v.double() - r64).abs() / bound).max())
            for w, v in (("ours", got), ("torch", theirs[k]))
        }
        print(
            f"rank {world.rank} {k}: error / bound: ours {used['ours']:.3g}, torch {used['torch']:.3g}",
            flush=True,
        )
        if not max(used.values()) <= 1:
            bad.append(k)
    print(f"rank {world.rank}: {'OK' if not bad else 'MISMATCH ' + ','.join(bad)}", flush=True)
    sys.exit(1 if bad else 0)
finally:
    D.cleanup()
