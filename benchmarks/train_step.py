"""Framework overhead of engine.train_step vs a bare hand-written loop, multi-process CPU throughput, GPU table.

    python benchmarks/train_step.py                    # CPU: overhead + images/s for 1 and 2 processes
    python benchmarks/train_step.py --gpu              # also the GPU section (when CUDA is available)

Overhead: the same model, batch, precision and in-memory data go through (a) a bare loop (autocast forward,
cross-entropy, backward, optimizer step) and (b) dist_seg's train_step (which adds the gradient-norm
computation, the non-finite check, the scheduler and the GradScaler plumbing). The two are interleaved step by
step and compared by median step time. Last line: `overhead=X.XX` (train_step time / bare time).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_seg import distributed as D  # noqa: E402
from dist_seg.config import LossConfig, ModelConfig, OptimConfig, SchedConfig  # noqa: E402
from dist_seg.engine import StepContext, train_step  # noqa: E402
from dist_seg.losses import build_loss  # noqa: E402
from dist_seg.models import build_model  # noqa: E402
from dist_seg.optim import build_optimizer, build_scheduler  # noqa: E402
from dist_seg.precision import AMP_DTYPES, autocast  # noqa: E402

# dense bf16 tensor-core peak, TFLOP/s, for the model-FLOPs utilisation
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def make(name: str, width: float, classes: int, amp: str, device: torch.device, channels_last: bool = False):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, width_mult=width), classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt, _ = build_optimizer(model, OptimConfig(name="sgd", lr=0.01))
    return model, opt


def ctx_for(
    model, opt, amp: str, device: torch.device, classes: int, channels_last: bool = False
) -> StepContext:
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    return StepContext(
        model,
        opt,
        build_scheduler(opt, SchedConfig(name="poly"), 10**6),
        scaler,
        build_loss(LossConfig(), classes).to(device),
        device,
        AMP_DTYPES[amp],
        None,
        channels_last,
        5,
        [p for p in model.parameters() if p.requires_grad],
    )


def bare_step(model, opt, x, y, dtype) -> None:
    with autocast(x.device, dtype):
        loss = F.cross_entropy(model(x), y, ignore_index=255)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def overhead(
    name: str, width: float, size: int, batch: int, amp: str, steps: int, device: torch.device
) -> float:
    classes = 11
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, classes, (batch, size, size), device=device)
    m1, o1 = make(name, width, classes, amp, device)
    m2, o2 = make(name, width, classes, amp, device)
    ctx = ctx_for(m2, o2, amp, device, classes)
    bare, ours = [], []
    for i in range(steps + 2):  # two warm-up steps each
        _sync(device)
        t = time.perf_counter()
        bare_step(m1, o1, x, y, AMP_DTYPES[amp])
        _sync(device)
        t2 = time.perf_counter()
        train_step(ctx, [(x, y)], i + 1)
        _sync(device)
        t3 = time.perf_counter()
        if i >= 2:
            bare.append(t2 - t)
            ours.append(t3 - t2)
    b, o = statistics.median(bare), statistics.median(ours)
    print(
        f"{name} w={width} {size}px batch {batch} amp={amp} on {device}: bare {b * 1e3:.1f} ms/step, "
        f"train_step {o * 1e3:.1f} ms/step, ratio {o / b:.3f}"
    )
    return o / b


def ddp_child(args: argparse.Namespace) -> None:
    """Run under torchrun: global images/s of train_step with DDP (+ CPU SyncBN) on this machine."""
    world = D.init_distributed("cpu", 300)
    try:
        classes = 11
        model, _ = make(args.model, args.width, classes, "off", world.device)
        model = D.prepare_model(model, world, sync_bn=True)
        opt, _ = build_optimizer(model, OptimConfig(name="sgd", lr=0.01))
        ctx = ctx_for(model, opt, "off", world.device, classes)
        x = torch.randn(args.batch, 3, args.size, args.size)
        y = torch.randint(0, classes, (args.batch, args.size, args.size))
        for i in range(2):
            train_step(ctx, [(x, y)], i + 1)
        D.barrier()
        t = time.perf_counter()
        for i in range(args.steps):
            train_step(ctx, [(x, y)], i + 3)
        D.barrier()
        dt = time.perf_counter() - t
        if world.is_main:
            print(f"IPS {args.steps * args.batch * world.world_size / dt:.3f}")
    finally:
        D.cleanup()


def processes(args: argparse.Namespace) -> dict[int, float]:
    out = {}
    for n in (1, 2):
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // n))}
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={n}",
            __file__,
            "--ddp-child",
            "--model",
            args.model,
            "--width",
            str(args.width),
            "--size",
            str(args.size),
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=True)
        out[n] = float(next(line for line in r.stdout.splitlines() if line.startswith("IPS")).split()[1])
        print(f"{n} process(es) x batch {args.batch}: {out[n]:.2f} images/s (CPU, gloo, DDP)")
    return out


def gpu_section(steps: int) -> None:
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    print(f"GPU: {name}")
    flops_per_img = 3 * 2 * 192.0e9  # forward MACs of DeconvNet at 512^2 x 2 FLOPs x 3 (fwd + bwd)
    for amp, cl, comp in (
        ("off", False, False),
        ("bf16", False, False),
        ("bf16", True, False),
        ("bf16", True, True),
    ):
        model, opt = make("deconvnet", 1.0, 11, amp, dev, cl)
        run_model = torch.compile(model) if comp else model
        ctx = ctx_for(run_model, opt, amp, dev, 11, cl)
        x = torch.randn(8, 3, 512, 512, device=dev)
        y = torch.randint(0, 11, (8, 512, 512), device=dev)
        for i in range(3):
            train_step(ctx, [(x, y)], i + 1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(steps):
            train_step(ctx, [(x, y)], i + 4)
        torch.cuda.synchronize()
        ips = steps * 8 / (time.perf_counter() - t)
        mfu = f", MFU {ips * flops_per_img / (peak * 1e12):.1%}" if peak else ""
        print(f"deconvnet 512px batch 8 amp={amp} channels_last={cl} compile={comp}: {ips:.1f} img/s{mfu}")
        del model, opt, ctx, run_model
        torch.cuda.empty_cache()
    for batch in (2, 4, 8, 16):
        model, opt = make("deconvnet", 1.0, 11, "bf16", dev, True)
        ctx = ctx_for(model, opt, "bf16", dev, 11, True)
        torch.cuda.reset_peak_memory_stats()
        x = torch.randn(batch, 3, 512, 512, device=dev)
        y = torch.randint(0, 11, (batch, 512, 512), device=dev)
        train_step(ctx, [(x, y)], 1)
        print(
            f"deconvnet 512px bf16 batch {batch}: peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        )
        del model, opt, ctx
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deconvnet")
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--ddp-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ddp_child:
        return ddp_child(args)
    torch.set_num_threads(os.cpu_count() or 1)
    processes(args)
    if args.gpu and torch.cuda.is_available():
        gpu_section(args.steps)
        overhead("deconvnet", 1.0, 512, 8, "bf16", args.steps, torch.device("cuda"))
    ratio = overhead(args.model, args.width, args.size, args.batch, args.amp, args.steps, torch.device("cpu"))
    print(f"overhead={ratio:.2f}")


if __name__ == "__main__":
    main()
