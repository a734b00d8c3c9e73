"""Model benchmark: training throughput at a small width and FLOPs of the full-width models.

    .venv/bin/python benchmarks/models.py                      # all models, CPU, width 0.125, 224x224, batch 2
    .venv/bin/python benchmarks/models.py --device cuda --width 1 --size 512 --batch 8 --amp bf16

1. forward+backward images/s of each model (VGG models at --width; torchvision models cannot be width-reduced
   and run at width 1), with the ratio to DeconvNet measured in the same run as the baseline;
2. parameters and forward GMAC per image at 512x512 for every model at full width, counted with
   torch.utils.flop_counter on the meta device (no memory, no compute), and DeconvNet's count against the
   ~192 GMAC expected from its layer list.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dist_seg.config.schema import ModelConfig
from dist_seg.data.loading.transforms import padded_size
from dist_seg.models import MODEL_NAMES, VGG_MODELS, build_model, input_constraints

DECONVNET_EXPECTED_GMAC = 192.0
NUM_CLASSES = 21


def throughput(name: str, width: float, size: int, batch: int, iters: int, device: str, amp: str) -> float:
    """Training images/s: forward, cross-entropy, backward, SGD step, after one warm-up iteration."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, width_mult=width), NUM_CLASSES).to(device).train()
    h, w = padded_size(size, size, *input_constraints(model))
    x = torch.randn(batch, 3, h, w, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch, h, w), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def step() -> None:
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return batch * iters / (time.perf_counter() - t0)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def full_width_cost(name: str, size: int) -> tuple[int, int]:
    """(parameters, forward MACs for one image at size x size) at width 1, on the meta device."""
    with torch.device("meta"):
        model = build_model(ModelConfig(name=name), NUM_CLASSES).eval()
        x = torch.empty(1, 3, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODEL_NAMES))
    ap.add_argument("--width", type=float, default=0.125, help="width_mult of the VGG models for throughput")
    ap.add_argument(
        "--size", type=int, default=224, help="square input side (rounded up to each model's needs)"
    )
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    ap.add_argument("--flops-size", type=int, default=512)
    ap.add_argument("--json", help="also write the results to this json file")
    args = ap.parse_args()
    names = args.models.split(",")

    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}"
    )
    print(
        f"## training throughput: batch {args.batch}, {args.size}x{args.size}, {args.iters} iters, amp {args.amp}"
    )
    results: dict[str, dict] = {}
    for name in names:
        width = args.width if name in VGG_MODELS else 1.0
        ips = throughput(name, width, args.size, args.batch, args.iters, args.device, args.amp)
        results[name] = {"width": width, "images_per_s": ips}
    base = results.get("deconvnet", {}).get("images_per_s")
    print(f"{'model':<28}{'width':>7}{'img/s':>9}{'vs deconvnet':>14}")
    for name, r in results.items():
        ratio = f"{r['images_per_s'] / base:.2f}x" if base else "-"
        print(f"{name:<28}{r['width']:>7}{r['images_per_s']:>9.2f}{ratio:>14}")

    print(
        f"\n## full width, {NUM_CLASSES} classes, forward cost of one {args.flops_size}x{args.flops_size} image"
    )
    print(f"{'model':<28}{'params (M)':>11}{'GMAC':>9}")
    for name in names:
        params, macs = full_width_cost(name, args.flops_size)
        results[name].update(params=params, gmac=macs / 1e9)
        print(f"{name:<28}{params / 1e6:>11.1f}{macs / 1e9:>9.1f}")
    if "deconvnet" in results and args.flops_size == 512:
        got = results["deconvnet"]["gmac"]
        print(
            f"\nDeconvNet at 512x512: {got:.1f} GMAC vs {DECONVNET_EXPECTED_GMAC} expected "
            f"({(got / DECONVNET_EXPECTED_GMAC - 1) * 100:+.2f}%)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
