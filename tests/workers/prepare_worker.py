"""Run under torchrun: the optimizer built from distributed.prepare_model's result holds exactly the
prepared model's trainable parameters, including the BatchNorm weights the CPU SyncBN converter replaced."""

import gc
import sys

import torch
from torch import nn

from dist_seg.config.schema import OptimConfig
from dist_seg.models import unwrap
from dist_seg.runtime import distributed as D
from dist_seg.train.optim import build_optimizer

world = D.init_distributed("cpu", timeout_s=60)
try:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model[0].bias.requires_grad_(False)  # a frozen parameter stays out of the optimizer
    model = D.prepare_model(model, world, sync_bn=True, channels_last=True)
    opt, _ = build_optimizer(model, OptimConfig(name="sgd", lr=0.1))
    in_opt = [id(p) for g in opt.param_groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    checks = {
        "synced": isinstance(unwrap(model)[1], D.CpuSyncBatchNorm),
        "ddp": isinstance(model, nn.parallel.DistributedDataParallel),
        "same_params": sorted(in_opt) == sorted(trainable) and len(in_opt) == len(set(in_opt)),
        "bn_in_optimizer": id(unwrap(model)[1].weight) in in_opt,
    }
    bad = [k for k, ok in checks.items() if not ok]
    print(f"rank {world.rank}: {'OK' if not bad else 'MISMATCH ' + ','.join(bad)}", flush=True)
    sys.exit(1 if bad else 0)
finally:
    # the DDP model (kept alive by reference cycles) holds the gloo process group: collect it while the
    # interpreter is whole, or gloo's threads may be torn down during finalisation (std::terminate at exit)
    model = opt = None
    gc.collect()
    D.cleanup()
