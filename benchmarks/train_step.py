"""Framework overhead of step.train_step vs a bare hand-written loop, multi-process CPU throughput, GPU table.

    python benchmarks/train_step.py                    # CPU: overhead + images/s for 1 and 2 processes
    python benchmarks/train_step.py --gpu --steps 20   # the GPU section alone, one call on a GPU machine
    python benchmarks/train_step.py --gpu-smoke        # the GPU section's code on CPU, tiny: a check

GPU section: img/s and model-FLOPs utilisation of full-width DeconvNet at 512x512 bf16 for batch 4/8/16,
with and without channels_last and torch.compile; then the real input path (synthetic shards, 8 loader
workers, pinned memory, side-stream prefetch, colour on the device) with its data-wait share and the host
syncs of one training step counted by CUDA's sync debug mode.

Overhead: the same model, batch, precision and in-memory data go through (a) a bare loop (autocast forward,
cross-entropy, backward, optimizer step) and (b) dist_seg's train_step (which adds the gradient norms,
global and per model block, the non-finite check, the scheduler and the GradScaler plumbing). The two are interleaved step by
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

from dist_seg.config.schema import LossConfig, ModelConfig, OptimConfig, SchedConfig  # noqa: E402
from dist_seg.models import build_model  # noqa: E402
from dist_seg.runtime import distributed as D  # noqa: E402
from dist_seg.runtime.precision import AMP_DTYPES, autocast  # noqa: E402
from dist_seg.train.losses import build_loss  # noqa: E402
from dist_seg.train.optim import build_optimizer, build_scheduler  # noqa: E402
from dist_seg.train.step import StepContext, parameter_blocks, train_step  # noqa: E402

# dense bf16 tensor-core peak, TFLOP/s, for the model-FLOPs utilisation
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def make(name: str, width: float, classes: int, amp: str, device: torch.device, channels_last: bool = False):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, width_mult=width), classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt, _ = build_optimizer(model, OptimConfig(name="sgd", lr=0.01))
    return model, opt


def ctx_for(model, opt, amp: str, device: torch.device, classes: int) -> StepContext:
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
        5,
        [p for p in model.parameters() if p.requires_grad],
        blocks=parameter_blocks(model),  # as the trainer's loop builds it: per-block gradient norms
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


def pipeline_run(dev: torch.device, width: float, size: int, batch: int, steps: int, workers: int) -> str:
    """The real input path: synthetic 512x512 polygon shards -> loader workers (uint8 geometry) -> Prefetcher
    (side-stream copy) -> to_model_input (colour on the device) -> train_step. Reports img/s and the share of
    step time spent waiting for data, and the host syncs of one step (CUDA's sync debug mode)."""
    import tempfile
    import warnings

    from dist_seg.config.schema import DataConfig
    from dist_seg.data.loading.prefetch import Prefetcher
    from dist_seg.data.loading.train_loader import TRAIN_TENSORS, build_train_loader
    from dist_seg.data.prep.convert import ConvertOptions, convert
    from dist_seg.data.prep.synth.dataset import generate

    with tempfile.TemporaryDirectory() as t:
        g = generate(Path(t) / "synth", images=max(64, 2 * batch), val_images=0, size=512, seed=0)
        convert(
            ConvertOptions(
                str(g["train_json"]), str(g["images_dir"]), f"{t}/shards", min_shards=8, progress=False
            )
        )
        cfg = DataConfig(
            train_shards=f"{t}/shards", crop_size=size, batch_size=batch, num_workers=workers,
            pin_memory=dev.type == "cuda", shuffle_buffer=16,
        )  # fmt: skip
        model, opt = make("deconvnet", width, 11, "bf16", dev, True)
        ctx = ctx_for(model, opt, "bf16", dev, 11)
        loader = build_train_loader(cfg, 0, 1, seed=0)
        done, syncs = 0, None
        _sync(dev)
        t0 = time.perf_counter()
        while done < steps:
            it = Prefetcher(iter(loader), dev, TRAIN_TENSORS)
            for b in it:
                images, masks = b.model_input(channels_last=True)
                if dev.type == "cuda" and done == 3:  # one step in the middle, under the sync detector
                    torch.cuda.set_sync_debug_mode("warn")
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        train_step(ctx, [(images, masks)], done + 1)
                    torch.cuda.set_sync_debug_mode(0)
                    syncs = len(caught)
                else:
                    train_step(ctx, [(images, masks)], done + 1)
                done += 1
                if done >= steps:
                    break
        _sync(dev)
        total = time.perf_counter() - t0
    # data wait: the share of the run the same steps on in-memory tensors would not have needed
    step_only = _model_only_ips(dev, width, size, batch, steps)
    ips = done * batch / total
    wait_share = max(0.0, 1.0 - ips / step_only) if step_only else float("nan")
    return (
        f"pipeline deconvnet w{width} {size}px bf16 channels_last batch {batch}, {workers} workers: {ips:.1f} img/s, "
        f"data-wait share {wait_share:.0%} (vs {step_only:.1f} img/s on in-memory tensors)"
        + (f", host syncs in one step: {syncs}" if syncs is not None else "")
    )


def _model_only_ips(dev: torch.device, width: float, size: int, batch: int, steps: int, compile_: bool = False,
                    channels_last: bool = True) -> float:  # fmt: skip
    model, opt = make("deconvnet", width, 11, "bf16", dev, channels_last)
    ctx = ctx_for(torch.compile(model) if compile_ else model, opt, "bf16", dev, 11)
    x = torch.randn(batch, 3, size, size, device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 11, (batch, size, size), device=dev)
    for i in range(3):
        train_step(ctx, [(x, y)], i + 1)
    _sync(dev)
    t = time.perf_counter()
    for i in range(steps):
        train_step(ctx, [(x, y)], i + 4)
    _sync(dev)
    return steps * batch / (time.perf_counter() - t)


def gpu_section(steps: int, dev: torch.device | None = None, width: float = 1.0, size: int = 512) -> None:
    """img/s and model-FLOPs utilisation of DeconvNet, bf16, for batch sizes x channels_last x torch.compile,
    then the real input path's data-wait share. `dev`/`width`/`size` let a CPU smoke run exercise the code."""
    dev = dev or torch.device("cuda")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke run)"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    print(f"GPU: {name}")
    # forward MACs of DeconvNet at 512^2 (benchmarks/models.py) x 2 FLOPs x 3 (forward + backward)
    flops_per_img = 3 * 2 * 192.0e9 * (size / 512) ** 2 * width**2
    for batch, cl, comp in (
        (4, True, False),
        (8, False, False),
        (8, True, False),
        (8, True, True),
        (16, True, False),
    ):
        ips = _model_only_ips(dev, width, size, batch, steps, comp, cl)
        mfu = f", MFU {ips * flops_per_img / (peak * 1e12):.1%}" if peak else ""
        print(
            f"deconvnet {size}px bf16 batch {batch} channels_last={cl} compile={comp}: {ips:.1f} img/s{mfu}"
        )
        if dev.type == "cuda":
            print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.empty_cache()
    workers = min(8, os.cpu_count() or 1)
    print(pipeline_run(dev, width, size, 8, max(steps, 20), workers))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deconvnet")
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    p.add_argument("--gpu", action="store_true")
    p.add_argument(
        "--gpu-smoke", action="store_true", help="run the GPU section's code on CPU, tiny (a check)"
    )
    p.add_argument("--ddp-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ddp_child:
        return ddp_child(args)
    torch.set_num_threads(os.cpu_count() or 1)
    if args.gpu_smoke:
        return gpu_section(2, torch.device("cpu"), width=0.0625, size=224)
    if args.gpu:  # the GPU section alone: one call on a lent GPU machine (~5 min on an H100-class GPU)
        if not torch.cuda.is_available():
            sys.exit("--gpu: CUDA is not available here (try --gpu-smoke for a CPU check of the code)")
        gpu_section(args.steps)
        ratio = overhead("deconvnet", 1.0, 512, 8, "bf16", args.steps, torch.device("cuda"))
        print(f"gpu_overhead={ratio:.2f}")
        return None
    processes(args)
    ratio = overhead(args.model, args.width, args.size, args.batch, args.amp, args.steps, torch.device("cpu"))
    print(f"overhead={ratio:.2f}")


if __name__ == "__main__":
    main()
