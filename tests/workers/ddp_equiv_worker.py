"""DDP equivalence: k train_steps on 2 ranks x batch B (SyncBN, DDP) vs 1 process x batch 2B, same data.

    python tests/workers/ddp_equiv_worker.py OUT.pt              # reference, one process
    torchrun --nproc_per_node=2 tests/workers/ddp_equiv_worker.py OUT.pt
Rank 0 saves the final weights and their EMA (keys "ema/..."); the test compares the two files. On 2 ranks the
worker also checks that every rank holds exactly the same EMA.

Steps: EQ_STEPS (default 1). Everything runs in float64, so the two runs differ only by float64 rounding in
different summation orders (per-rank sums, the all-reduce), amplified by the step's conditioning: BatchNorm
over 4 values per channel (fc6/fc7 at 224 px) amplifies it about 1.6e7-fold. After one step that uses 5.3e-4
of the test's tolerance (rtol 1e-7); every further step amplifies the difference 16-77x (8.5e-3 of the
tolerance after 2 steps, 0.66 after 3: measured on one AMD EPYC), so a multi-step comparison measures how chaotic
the trajectory is, not the math, and no a-priori bound exists for it. One step still runs every part of the
distributed path: SyncBN statistics and their backward, DDP's gradient average, the optimizer and the EMA.
"""

import gc
import sys

import torch

from dist_seg.config.schema import LossConfig, ModelConfig, OptimConfig, SchedConfig
from dist_seg.models import build_model, unwrap
from dist_seg.runtime import distributed as D
from dist_seg.train.ema import WeightEMA
from dist_seg.train.losses import build_loss
from dist_seg.train.optim import build_optimizer, build_scheduler
from dist_seg.train.step import StepContext, train_step

STEPS, B, CLASSES = int(__import__("os").environ.get("EQ_STEPS", 1)), 2, 4
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
        3,
        [p for p in model.parameters() if p.requires_grad],
        WeightEMA(model, 0.5),
    )
    part = slice(world.rank * B, (world.rank + 1) * B) if world.world_size > 1 else slice(0, 2 * B)
    for s in range(STEPS):
        train_step(ctx, [(images[s, part], masks[s, part])], s + 1)
    ema = {f"ema/{k}": v for k, v in ctx.ema.module.state_dict().items()}
    for r, other in enumerate(D.all_gather_object(ema)):
        bad = [k for k in ema if not torch.equal(other[k], ema[k])]
        assert not bad, f"rank {r}'s EMA differs from rank {world.rank}'s in {bad[:3]}"
    if world.is_main:
        torch.save({**unwrap(model).state_dict(), **ema}, sys.argv[1])
finally:
    # the DDP model (kept alive by reference cycles) holds the gloo process group: collect it while the
    # interpreter is whole, or gloo's threads may be torn down during finalisation (std::terminate at exit,
    # measured in 1 of 6 runs of a similar worker before this)
    model = opt = ctx = None
    gc.collect()
    D.cleanup()
