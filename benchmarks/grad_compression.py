"""Bytes each optimizer step all-reduces, per model and train.grad_compression, and what they cost on paper.

    .venv/bin/python benchmarks/grad_compression.py                       # the README's multi-node figures
    .venv/bin/python benchmarks/grad_compression.py --batch 8 --img-per-s 400 --internode-gbps 45

Gradient sizes are counted on the full-width models (built on the meta device: no memory, no compute):
fp32 = 4 bytes per trainable parameter; fp16/bf16 = 2; PowerSGD as torch's hook sends it (each tensor of
2+ dims viewed as rows x cols, compressed to rank x (rows + cols) values when that is at least
min_compression_rate=2 times smaller, else sent whole; 1-d tensors sent whole), in fp32. The time is the
ring all-reduce's 2 (n - 1) / n x bytes / bus bandwidth with n GPUs, against the step's compute time
batch / (images/s per GPU); it ignores DDP's overlap of communication with the backward pass.
"""

from __future__ import annotations

import argparse

import torch

from dist_seg.config.schema import ModelConfig
from dist_seg.models import VGG_MODELS, build_model


def powersgd_values(shapes: list[torch.Size], rank: int, min_rate: float = 2.0) -> int:
    total = 0
    for shape in shapes:
        if len(shape) < 2:
            total += shape.numel()
            continue
        rows, cols = shape[0], shape.numel() // shape[0]
        compressed = rank * (rows + cols)
        total += compressed if compressed * min_rate < rows * cols else rows * cols
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=11)
    p.add_argument("--batch", type=int, default=8, help="images per GPU per step")
    p.add_argument("--img-per-s", type=float, default=400.0, help="training images/s per GPU")
    p.add_argument("--gpus", type=int, default=16, help="GPUs in the all-reduce (2 nodes x 8)")
    p.add_argument("--nvlink-gbps", type=float, default=400.0, help="in-node bus bandwidth, GB/s per GPU")
    p.add_argument("--internode-gbps", type=float, default=45.0, help="cross-node bandwidth, GB/s per GPU")
    p.add_argument("--powersgd-rank", type=int, default=1)
    args = p.parse_args()
    step_ms = 1e3 * args.batch / args.img_per_s
    ring = 2 * (args.gpus - 1) / args.gpus
    print(
        f"# {args.classes} classes; step compute {step_ms:.0f} ms (batch {args.batch} at {args.img_per_s:.0f} "
        f"img/s/GPU); ring all-reduce over {args.gpus} GPUs at {args.nvlink_gbps:.0f} GB/s (in node) and "
        f"{args.internode_gbps:.0f} GB/s (across nodes)"
    )
    print(f"{'model':<11} {'params':>12} {'hook':<9} {'MB/step':>9} {'in-node ms':>10} {'cross-node ms':>13}")
    for name in VGG_MODELS:
        with torch.device("meta"):
            model = build_model(ModelConfig(name=name, width_mult=1.0), args.classes)
        shapes = [p.shape for p in model.parameters() if p.requires_grad]
        n = sum(s.numel() for s in shapes)
        sizes = {
            "none": 4 * n,
            "fp16/bf16": 2 * n,
            f"powersgd{args.powersgd_rank}": 4 * powersgd_values(shapes, args.powersgd_rank),
        }
        for hook, nbytes in sizes.items():
            t_node = 1e3 * ring * nbytes / (args.nvlink_gbps * 1e9)
            t_cross = 1e3 * ring * nbytes / (args.internode_gbps * 1e9)
            print(f"{name:<11} {n:>12,} {hook:<9} {nbytes / 1e6:>9.1f} {t_node:>10.1f} {t_cross:>13.1f}")


if __name__ == "__main__":
    main()
