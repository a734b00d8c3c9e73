"""DDP equivalence: k train_steps on 2 ranks x batch B (SyncBN, DDP) vs 1 process x batch 2B, same data.

    python tests/workers/ddp_equiv_worker.py OUT.pt              # reference, one process
    torchrun --nproc_per_node=2 tests/workers/ddp_equiv_worker.py OUT.pt
Rank 0 saves the final weights; the test compares the two files.
"""

import sys

import torch

from dist_seg import distributed as D
from dist_seg.config import LossConfig, ModelConfig, OptimConfig, SchedConfig
from dist_seg.engine import StepContext, train_step
from dist_seg.losses import build_loss
from dist_seg.models import build_model, unwrap
from dist_seg.optim import build_optimizer, build_scheduler

STEPS, B, CLASSES = int(__import__("os").environ.get("EQ_STEPS", 3)), 2, 4
world = D.init_distributed("cpu", timeout_s=120)
try:
    torch.manual_seed(0)
    # float64 so that the comparison checks the math, not float32 rounding amplified by 29 BatchNorms
    torch.set_default_dtype(torch.float64)
    images = torch.randn(STEPS, 2 * B, 3, 224, 224)
    masks = torch.randint(0, CLASSES, (STEPS, 2 * B, 224, 224))
    model = build_model(ModelConfig(name="deconvnet", width_mult=0.0625), CLASSES)
    model = D.prepare_model(model, world, sync_bn=True)
    opt, _ = build_optimizer(model, OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4))
    ctx = StepContext(
        model,
        opt,
        build_scheduler(opt, SchedConfig(name="constant"), STEPS),
        None,
        build_loss(LossConfig(), CLASSES),
        world.device,
        None,
        1.0,
        False,
        3,
        [p for p in model.parameters() if p.requires_grad],
    )
    part = slice(world.rank * B, (world.rank + 1) * B) if world.world_size > 1 else slice(0, 2 * B)
    for s in range(STEPS):
        train_step(ctx, [(images[s, part], masks[s, part])], s + 1)
    if world.is_main:
        torch.save(unwrap(model).state_dict(), sys.argv[1])
finally:
    D.cleanup()
