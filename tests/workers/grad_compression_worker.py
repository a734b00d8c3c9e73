"""The same 2-rank training (FCN-8s, DDP, SGD) with each train.grad_compression hook, one after another in one
process group; rank 0 writes {run: [loss per step]} to OUT.json.

torchrun --nproc_per_node=2 tests/workers/grad_compression_worker.py OUT.json
"""

import json
import sys

import torch
import torch.nn.functional as F

from dist_seg.config.schema import LossConfig, ModelConfig, OptimConfig, SchedConfig
from dist_seg.models import build_model
from dist_seg.runtime import distributed as D
from dist_seg.train.losses import build_loss
from dist_seg.train.optim import build_optimizer, build_scheduler
from dist_seg.train.step import StepContext, train_step

STEPS, B, CLASSES, POWERSGD_START, LR = 12, 2, 4, 3, 0.05
world = D.init_distributed("cpu", timeout_s=120)
try:
    assert world.world_size == 2
    torch.manual_seed(0)
    # smooth random fields, labelled by the signs of two channels: blobs a model can learn in a few steps
    coarse = torch.randn(STEPS * 2 * B, 3, 8, 8)
    images = F.interpolate(coarse, size=(64, 64), mode="bilinear").view(STEPS, 2 * B, 3, 64, 64)
    masks = (images[:, :, 0] > 0).long() + 2 * (images[:, :, 1] > 0).long()
    part = slice(world.rank * B, (world.rank + 1) * B)
    losses = {}
    for hook in ("none", "fp16", "bf16", "powersgd"):
        torch.manual_seed(1)
        model = build_model(ModelConfig(name="fcn8s", width_mult=0.0625), CLASSES)
        model = D.prepare_model(model, world, True, False, False, hook, (1, POWERSGD_START))
        opt, _ = build_optimizer(model, OptimConfig(name="sgd", lr=LR, momentum=0.9, weight_decay=0.0))
        ctx = StepContext(
            model, opt, build_scheduler(opt, SchedConfig(name="constant"), STEPS), None,
            build_loss(LossConfig(), CLASSES), world.device, None, None, 3,
            [p for p in model.parameters() if p.requires_grad],
        )  # fmt: skip
        losses[hook] = []
        for s in range(STEPS):
            out = train_step(ctx, [(images[0, part], masks[0, part])], s + 1)  # one batch: a smooth descent
            losses[hook].append(D.mean_across_ranks(float(out.loss), world.device))
    if world.is_main:
        with open(sys.argv[1], "w") as f:
            json.dump(losses, f)
finally:
    D.cleanup()
