"""Run under torchrun: each rank normalises its half of a batch with CpuSyncBatchNorm; the result must equal
plain BatchNorm over the whole batch (outputs, input gradients, summed weight gradients, running stats)."""

import sys

import torch
import torch.distributed as dist
from torch import nn

from dist_seg.runtime import distributed as D

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
    checks = {
        "output": torch.allclose(y.detach(), y_ref.detach()[part], atol=1e-5),
        "input_grad": torch.allclose(x.grad, x_ref.grad[part], atol=1e-5),
        "weight_grad": torch.allclose(wgrad, ref.weight.grad, atol=1e-4),
        "bias_grad": torch.allclose(bgrad, ref.bias.grad, atol=1e-4),
        "running_mean": torch.allclose(bn.running_mean, ref.running_mean, atol=1e-6),
        "running_var": torch.allclose(bn.running_var, ref.running_var, atol=1e-5),
    }
    bad = [k for k, ok in checks.items() if not ok]
    print(f"rank {world.rank}: {'OK' if not bad else 'MISMATCH ' + ','.join(bad)}", flush=True)
    sys.exit(1 if bad else 0)
finally:
    D.cleanup()
