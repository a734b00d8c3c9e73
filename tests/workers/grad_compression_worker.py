"""train.grad_compression on 2 real gloo ranks (FCN-8s, DDP), checked where a bound can be derived.

Part 1, one backward per hook from identical weights (DDP broadcasts rank 0's), each rank on its own images:
every parameter's local float32 gradient is captured by a tensor hook as autograd hands it to DDP (exactly
the values DDP copies into its bucket), the two ranks' local gradients are all-gathered (an all-gather moves
bits unchanged) and their mean taken in float64. What each hook delivers (param.grad after backward) is
compared, element by element, with that mean under a bound derived from the hook's arithmetic (see
compressed_mean_bound, plain_mean_bound, powersgd_bound). The reference is built from the very gradients the
hook received, so the check does not depend on how this CPU's BLAS rounds the forward and backward.

Part 2, 12 SGD steps on one batch with each hook: learning guards only (see the test), and the PowerSGD
warm-up losses, which are bitwise those of the plain all-reduce for 2 ranks (see the test's comment).

Rank 0 writes {"grads": {check: {...}}, "losses": {hook: [loss per step]}} to OUT.json.

torchrun --nproc_per_node=2 tests/workers/grad_compression_worker.py OUT.json
"""

import gc
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_seg.config.schema import LossConfig, ModelConfig, OptimConfig, SchedConfig
from dist_seg.models import build_model
from dist_seg.runtime import distributed as D
from dist_seg.train.losses import build_loss
from dist_seg.train.optim import build_optimizer, build_scheduler
from dist_seg.train.step import StepContext, train_step

STEPS, B, CLASSES, POWERSGD_START, LR = 12, 2, 4, 3, 0.05
HOOKS = ("none", "fp16", "bf16", "powersgd")
U32 = 2.0**-24  # float32 unit roundoff (round to nearest)
U64 = 2.0**-53
# (unit roundoff, half the spacing of the format's subnormals, largest finite value) of the compressed formats
FORMATS = {"fp16": (2.0**-11, 2.0**-25, 65504.0), "bf16": (2.0**-8, 2.0**-134, 3.38e38)}
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def compressed_mean_bound(g0: torch.Tensor, g1: torch.Tensor, mean: torch.Tensor, fmt: str) -> torch.Tensor:
    """Elementwise bound on |delivered - mean| for torch's fp16/bf16_compress_hook on 2 ranks (float64 in/out).

    The hook (torch/distributed/algorithms/ddp_comm_hooks/default_hooks.py, _compress_hook) computes on each
    rank b_r = fl(fl(g_r) / 2) in the format, all-reduces SUM in the format, and copies the result back into
    the float32 bucket (exact: every fp16/bf16 value is a float32). With u the format's unit roundoff and
    t half the spacing of its subnormals, |fl(x) - x| <= u|x| + t for any rounding to nearest, so
      |fl(g_r) - g_r| <= u|g_r| + t              (the cast)
      |b_r - fl(g_r)/2| <= t                     (halving is exact above the subnormal range)
    hence e_in := sum_r |b_r - g_r/2| <= (u(|g0| + |g1|) + 2t)/2 + 2t. gloo adds two fp16/bf16 values in
    float32 and rounds the float32 sum to the format (two roundings): |s - (b0 + b1)| <= (u + u32 + u u32)
    |b0 + b1| + t with |b0 + b1| <= |mean| + e_in. The float64 reference (g0 + g1)/2 is itself within
    u64|mean| of the exact mean. The bound uses |g_r|, not |mean|: where the ranks' gradients cancel, the
    error of each rank's cast survives the cancellation. Valid while no |g_r| overflows the format (checked).
    """
    u, t, _ = FORMATS[fmt]
    e_in = (u * (g0.abs() + g1.abs()) + 2 * t) / 2 + 2 * t
    return e_in + (u + U32 + u * U32) * (mean.abs() + e_in) + t + U64 * mean.abs()


def plain_mean_bound(mean: torch.Tensor) -> torch.Tensor:
    """The plain all-reduce (DDP's reducer multiplies each gradient by 1/world_size = 0.5 while copying it into
    the bucket, then gloo sums in float32) and PowerSGD's vanilla all-reduce (_allreduce_fut: divide by 2,
    sum; after warm-up, uncompressed tensors: sum, divide by 2): halving is exact in float32 and the sum of
    two float32 values is rounded once, so delivered = fl32(mean): within u32|mean|, and the float64
    reference within u64|mean|. In float32's subnormal range (< 2^-126) halving rounds too: each of the two
    halvings and the sum add at most half the smallest subnormal spacing, 2^-150 (a run with gradients
    perturbed into that range measured exactly 2 x 2^-150 where the bound said 2^-150)."""
    return (U32 + U64) * mean.abs() + 3 * 2.0**-150


def powersgd_bound(n: int, s: float) -> float:
    """Bound on ||D - v v^T M||_F for one matrix compressed by torch's powerSGD_hook (rank 1) at its first
    compressed step (error feedback still zero), 2 ranks. M = (M0 + M1)/2 is the mean of the ranks' n x m
    gradient matrices, D what the hook delivers, v the unit top left singular vector of D (float64 SVD),
    s = (||M0||_F + ||M1||_F)/2.

    The hook (powerSGD_hook.py) all-reduces P = sum_r M_r Q0, normalises it to h (vector_norm and a division:
    | ||h|| - 1 | <= (n/2 + 3)u32), computes Q_r = M_r^T h on each rank (dot products of length n, each within
    gamma_n = n u32/(1 - n u32) of |M_r|^T |h| whatever the summation order or FMA use of the BLAS), all-reduces
    and halves them: ||q - M^T h|| <= (1 + u32) gamma_n s ||h|| + u32 ||M||_2 ||h||; and delivers D = fl(h q^T)
    (one product per element, ||D - h q^T||_F <= u32 ||h|| ||q||). D is rank 1 up to that rounding, so its top
    left singular vector v is within sin(theta) <= u32/(1 - 2 u32) of h/||h|| (Wedin). Adding the three terms
    with ||M||_2 <= ||M||_F <= s gives (2n + 10) u32 s to first order; (2n + 16) u32 s covers the second-order
    terms while n u32 <= 1e-3 (asserted). P's own rounding does not enter: it only chooses h, and the
    reference uses the h the hook chose (read back from D)."""
    assert n * U32 <= 1e-3, n
    return (2 * n + 16) * U32 * s


def gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def one_backward(model, images, masks, loss_fn):
    """(names, local float32 gradients, delivered gradients) of one DDP backward."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    local: dict[str, torch.Tensor] = {}
    # a tensor hook sees the gradient before AccumulateGrad stores it (grad is None: stored as is) and
    # before DDP's reducer, which runs after AccumulateGrad, copies it into its bucket
    handles = [p.register_hook(lambda g, n=n: local.__setitem__(n, g.detach().clone())) for n, p in named]
    model.zero_grad(set_to_none=True)
    model.train()
    loss_fn(model(images), masks).backward()
    for h in handles:
        h.remove()
    return [n for n, _ in named], [local[n] for n, _ in named], [p.grad.detach().clone() for _, p in named]


def elementwise(kind: str, local: list[torch.Tensor], delivered: list[torch.Tensor]) -> dict:
    """Worst |delivered - mean64| / bound over all elements, and format facts, for the plain/fp16/bf16 paths."""
    g = torch.cat([t.reshape(-1) for t in local])
    d = torch.cat([t.reshape(-1) for t in delivered])
    g0, g1 = (x.double() for x in gather(g))
    d0, d1 = gather(d)
    mean = (g0 + g1) / 2
    bound = plain_mean_bound(mean) if kind == "none" else compressed_mean_bound(g0, g1, mean, kind)
    err = (d.double() - mean).abs()
    ratio = err / bound
    out = {
        "max_ratio": float(ratio.max()),
        "mean_ratio": float(ratio.mean()),
        "max_abs_err": float(err.max()),
        "max_abs_grad": float(torch.maximum(g0.abs(), g1.abs()).max()),
        "numel": d.numel(),
        "same_on_ranks": bool(torch.equal(d0, d1)),
        # fl32(g0 * 0.5 + g1 * 0.5): what the plain path computes, evaluated here by torch's float32 add
        "equals_fl32_mean": bool(torch.equal(d, g0.float() * 0.5 + g1.float() * 0.5)),
    }
    for fmt, dtype in HALF_DTYPES.items():
        # every delivered value, or twice it, is a value of the format: the sum was rounded to the format
        # (whether the hook halves before the all-reduce, in the format, as torch's does, or after it)
        in_fmt = (d == d.to(dtype).float()) | (2 * d == (2 * d).to(dtype).float())
        out[f"sum_in_{fmt}"] = bool(in_fmt.all())
    if kind in FORMATS:
        out["no_overflow"] = float(torch.maximum(g0.abs(), g1.abs()).max()) < FORMATS[kind][2]
        # gloo's arithmetic, emulated: cast, halve in the format, add in float32, round to the format
        dt = HALF_DTYPES[kind]
        b0, b1 = (x.float().to(dt) / 2 for x in (g0, g1))
        out["equals_emulation"] = bool(torch.equal(d, (b0.float() + b1.float()).to(dt).float()))
    return out


def powersgd_compressed(names, local, delivered, min_rate: float) -> dict:
    """Checks of the first compressed PowerSGD step: each compressed matrix is delivered as (numerically)
    rank 1, identical on both ranks, and equal to the projection of the ranks' mean gradient onto its
    column space within powersgd_bound; the tensors PowerSGD leaves uncompressed within plain_mean_bound."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

    worst_proj = worst_rank1 = worst_plain = 0.0
    compressed, same = 0, True
    unc_local, unc_delivered = [], []
    for _name, g, d in zip(names, local, delivered, strict=True):
        n, m = g.shape[0], g.numel() // g.shape[0]
        if g.dim() < 2 or not _should_compress(n, m, min(n, m, 1), min_rate)[0]:
            unc_local.append(g)
            unc_delivered.append(d)
            continue
        compressed += 1
        m0, m1 = (x.double().reshape(n, m) for x in gather(g))
        d0, d1 = gather(d)
        same &= bool(torch.equal(d0, d1))
        dd = d.double().reshape(n, m)
        mean = (m0 + m1) / 2
        u_, sv, _ = torch.linalg.svd(dd, full_matrices=False)
        fro = float(torch.linalg.matrix_norm(dd))
        # rank 1: D_ij = fl(h_i q_j) = h_i q_j (1 + d_ij), so sigma_2(D) <= ||D - h q^T||_F <= u32/(1-u32) ||D||_F;
        # float64's SVD adds at most ~1e-13 ||D|| (slack 2^-40)
        if len(sv) > 1:
            worst_rank1 = max(worst_rank1, float(sv[1]) / ((U32 / (1 - U32) + 2.0**-40) * fro))
        v = u_[:, :1]
        s = (float(torch.linalg.matrix_norm(m0)) + float(torch.linalg.matrix_norm(m1))) / 2
        proj_err = float(torch.linalg.matrix_norm(dd - v @ (v.T @ mean)))
        worst_proj = max(worst_proj, proj_err / powersgd_bound(n, s))
    if unc_local:
        worst_plain = elementwise("none", unc_local, unc_delivered)["max_ratio"]
    return {
        "compressed_matrices": compressed,
        "same_on_ranks": same,
        "max_rank1_ratio": worst_rank1,
        "max_projection_ratio": worst_proj,
        "uncompressed_max_ratio": worst_plain,
    }


def build(world, hook: str, start: int):
    torch.manual_seed(1)
    model = build_model(ModelConfig(name="fcn8s", width_mult=0.0625), CLASSES)
    return D.prepare_model(model, world, True, False, False, hook, (1, start))


world = D.init_distributed("cpu", timeout_s=120)
try:
    assert world.world_size == 2  # the bounds above are for 2 ranks (halving is exact; a sum of 2 is one add)
    torch.manual_seed(0)
    # smooth random fields, labelled by the signs of two channels: blobs a model can learn in a few steps
    coarse = torch.randn(STEPS * 2 * B, 3, 8, 8)
    images = F.interpolate(coarse, size=(64, 64), mode="bilinear").view(STEPS, 2 * B, 3, 64, 64)
    masks = (images[:, :, 0] > 0).long() + 2 * (images[:, :, 1] > 0).long()
    part = slice(
        world.rank * B, (world.rank + 1) * B
    )  # each rank its own images: the ranks' gradients differ
    loss_fn = build_loss(LossConfig(), CLASSES)
    x, y = images[0, part], masks[0, part]

    grads = {}
    for hook in ("none", "fp16", "bf16"):
        grads[hook] = elementwise(hook, *one_backward(build(world, hook, POWERSGD_START), x, y, loss_fn)[1:])
    model = build(world, "powersgd", 2)  # 2 vanilla all-reduces (the least PowerSGD allows), then compressed
    for i in (1, 2):
        grads[f"powersgd_warmup{i}"] = elementwise("none", *one_backward(model, x, y, loss_fn)[1:])
    names, local, delivered = one_backward(model, x, y, loss_fn)
    # register_grad_compression leaves PowerSGDState's min_compression_rate at its default, 2
    grads["powersgd_compressed"] = powersgd_compressed(names, local, delivered, 2.0)

    losses = {}
    for hook in HOOKS:
        model = build(world, hook, POWERSGD_START)
        opt, _ = build_optimizer(model, OptimConfig(name="sgd", lr=LR, momentum=0.9, weight_decay=0.0))
        ctx = StepContext(
            model, opt, build_scheduler(opt, SchedConfig(name="constant"), STEPS), None, loss_fn,
            world.device, None, None, 3, [p for p in model.parameters() if p.requires_grad],
        )  # fmt: skip
        losses[hook] = []
        for s in range(STEPS):
            out = train_step(ctx, [(x, y)], s + 1)  # one batch: a smooth descent
            losses[hook].append(D.mean_across_ranks(float(out.loss), world.device))
    if world.is_main:
        with open(sys.argv[1], "w") as f:
            json.dump({"grads": grads, "losses": losses}, f, indent=1)
finally:
    # the DDP models (kept alive by reference cycles) hold the gloo process group: collect them while the
    # interpreter is whole, or gloo's threads may be torn down during finalisation (std::terminate at exit,
    # measured in 1 of 6 runs of the old worker and 1 of 10 of this one before this line)
    model = ctx = opt = None
    gc.collect()
    D.cleanup()
