"""Inference benchmark: time and memory of TTA, ensembles and sliding windows against one model on whole images.

    .venv/bin/python benchmarks/inference.py                        # CPU, 512x512, width 0.25, 4 images
    .venv/bin/python benchmarks/inference.py --device cuda --width 1 --images 16 --amp bf16

Each variant runs in its own process (so that peak memory is its own; times are CPU seconds of one thread on
CPU, which other jobs on a shared machine barely move, wall-clock seconds on CUDA): build the models (random weights; the
cost does not depend on them), one warm-up image, then --images images one at a time through
dist_seg.infer.predictor.Predictor. Reported per variant: seconds per image, its ratio to the baseline (one
DeconvNet, whole image) measured in the same run, and peak memory *above the loaded models*: CUDA's
max_memory_allocated, or on CPU the growth of the process's peak RSS (ru_maxrss) over its value after loading.
An ensemble should cost about the sum of its members' times and the activations of its largest member, not
the sum of their activations (members run one at a time).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch

VARIANTS: dict[str, dict] = {
    "deconvnet (baseline)": {"models": ["deconvnet"]},
    "deconvnet + flip": {"models": ["deconvnet"], "flip": True},
    "deconvnet + flip,scales 0.75/1/1.25": {
        "models": ["deconvnet"],
        "flip": True,
        "scales": [0.75, 1.0, 1.25],
    },
    "ensemble deconvnet+fcn8s": {"models": ["deconvnet", "fcn8s"]},
    "ensemble deconvnet+fcn8s+deeplab_v1": {"models": ["deconvnet", "fcn8s", "deeplab_v1"]},
    "deconvnet slide 256/170": {"models": ["deconvnet"], "slide": [256, 170]},
    "deconvnet slide 256/128": {"models": ["deconvnet"], "slide": [256, 128]},
}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_variant(spec: dict, args: argparse.Namespace) -> dict:
    from dist_seg.config.schema import ModelConfig
    from dist_seg.infer.predictor import Predictor, SlideWindow
    from dist_seg.models import build_model

    torch.manual_seed(0)
    device = torch.device(args.device)
    models = [
        build_model(ModelConfig(name=n, width_mult=args.width), args.classes).to(device).eval()
        for n in spec["models"]
    ]
    slide = SlideWindow(*spec["slide"]) if "slide" in spec else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    predictor = Predictor(
        models, device, dtype, flip=spec.get("flip", False), scales=spec.get("scales", [1.0]), slide=slide
    )
    x = torch.randn(1, 3, args.size, args.size)
    if device.type == "cuda":  # the baseline: models and input loaded, nothing run yet
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_rss_bytes()
    predictor(x)  # warm-up (kernel selection, allocator pools); its memory counts in the peak
    if device.type == "cuda":
        torch.cuda.synchronize()
    # CPU seconds of this process on one thread (--threads 1): what other jobs on a shared machine barely
    # move; on CUDA, wall-clock time after a synchronize
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    t0 = clock()
    for _ in range(args.images):
        predictor(x).argmax(1).cpu()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss_bytes() - base
    return {"s_per_image": (clock() - t0) / args.images, "peak_above_models_mb": peak / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--classes", type=int, default=11)
    p.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print json
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.variant is not None:
        print(json.dumps(run_variant(VARIANTS[args.variant], args)))
        return
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, device {args.device}, width {args.width}, {args.size}x{args.size}, "
        f"{args.images} images, amp {args.amp}"
    )
    print(f"{'variant':<40} {'s/image':>9} {'ratio':>7} {'peak MB above models':>21}")
    base = None
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", name, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        base = base or r["s_per_image"]
        print(
            f"{name:<40} {r['s_per_image']:>9.3f} {r['s_per_image'] / base:>7.2f} {r['peak_above_models_mb']:>21.0f}"
        )


if __name__ == "__main__":
    main()
