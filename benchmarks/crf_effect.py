"""What DeepLab v1's dense CRF (dist_seg.infer.crf) does to a trained checkpoint's mIoU, and what it costs.

    .venv/bin/python benchmarks/crf_effect.py --config configs/deeplab_v1.yaml --checkpoint runs/x/best.pt \\
        --shards shards/trashcan/val                      # every image of the shards, CRF at config crf.*
    .venv/bin/python benchmarks/crf_effect.py ... --limit 10 --json /tmp/crf.json crf.bilateral_xy_std=60

One pass over labelled shards (made by `dist-seg convert`) with the trainer's eval loader: each image's
softmax probabilities, cropped to the image (no batch padding), are scored as they are (argmax: the same
numbers as the trainer's eval of these weights) and after the CRF, into two ConfusionMatrix objects. The
CRF's RGB input is the batch's uint8 pixels or, from a loader that hands over normalised floats, recovered
from them (data.mean/std): what the model saw, data.eval_resize included. Prints mIoU, pixel accuracy and
per-class IoU with and without the CRF, seconds per image for the model and for the CRF, and the CRF's
memory: on CUDA the peak allocated above the baseline per image; on CPU the peak resident-set growth per
image, sampled every 5 ms (allocator caching makes it a lower bound), and the process's peak RSS.
Positional key=value arguments override the config; crf.* keys (when the config schema has them) set the
CRF, otherwise dist_seg.infer.crf.CRFParams' defaults. On a busy CPU, --threads 1 is often faster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from dist_seg.checkpoint import load_for_inference
from dist_seg.config.loading import load_config
from dist_seg.data.format.remote import RemoteOptions
from dist_seg.data.format.shards import dataset_classes
from dist_seg.data.loading.colour import denormalize
from dist_seg.data.loading.eval_loader import build_eval_loader
from dist_seg.data.loading.transforms import padded_size
from dist_seg.infer.crf import CRFParams, dense_crf
from dist_seg.infer.metrics import ConfusionMatrix, to_jsonable
from dist_seg.models import input_constraints
from dist_seg.runtime.precision import AMP_DTYPES, autocast


class RssSampler:
    """Peak resident set size (bytes) of this process while a block runs, sampled every `period` s."""

    def __init__(self, period: float = 0.005) -> None:
        self.period, self.peak, self._stop = period, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> RssSampler:
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def crf_params(cfg: object) -> CRFParams:
    """The config's crf.* section as CRFParams, or the defaults where the schema has no such section."""
    section = getattr(cfg, "crf", None)
    if section is None:
        return CRFParams()
    names = {f.name for f in dataclasses.fields(CRFParams)}
    return CRFParams(**{k: v for k, v in dataclasses.asdict(section).items() if k in names})


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(
        "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"
    )


@torch.inference_mode()
def run(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config, args.overrides)
    params = crf_params(cfg)
    device = resolve_device(args.device or cfg.train.device)
    shard_set = dataset_classes(args.shards, cfg.model.num_classes, RemoteOptions.from_config(cfg.data))
    if not shard_set.has_labels:
        raise SystemExit(f"shards {args.shards} have no label maps: the benchmark needs labelled shards")
    model, ck = load_for_inference(cfg, args.checkpoint, device, num_classes=shard_set.num_classes)
    divisor, min_size = input_constraints(model)
    loader = build_eval_loader(
        cfg.data, rank=0, world_size=1, size_divisor=divisor, min_size=min_size, shards=args.shards
    )
    amp = AMP_DTYPES[cfg.train.amp]  # as the trainer evaluates
    plain, refined = (ConfusionMatrix(shard_set.num_classes, device=device) for _ in range(2))
    model_s, crf_s, crf_mem = [], [], []
    done = 0
    for batch in loader:
        groups: dict[tuple[int, int], list[int]] = {}  # as inference.compute_confusion: one padded size each
        for i, (h, w) in enumerate(batch.sizes):
            groups.setdefault(padded_size(h, w, divisor, min_size), []).append(i)
        for (ph, pw), idx in groups.items():
            if args.limit is not None and done >= args.limit:
                break
            idx = idx[: None if args.limit is None else args.limit - done]
            images = _model_input(batch, idx, ph, pw, device)
            t = _now(device)
            with autocast(device, amp):
                logits = model(images)
            probs_all = torch.softmax(logits.float(), dim=1)
            model_s.append((_now(device) - t) / len(idx))
            for j, i in enumerate(idx):
                h, w = batch.sizes[i]
                probs, target = probs_all[j, :, :h, :w], batch.masks[i, :h, :w].to(device)
                rgb = _rgb(batch, i, images[j], h, w, cfg.data)
                plain.update(probs.argmax(0), target)
                q, seconds, mem = _timed_crf(probs, rgb, params, device)
                refined.update(q.argmax(0), target)
                crf_s.append(seconds)
                crf_mem.append(mem)
                done += 1
                if args.verbose:
                    print(f"image {done} {h}x{w}: crf {seconds:.2f} s, {mem / 2**20:.0f} MiB", flush=True)
        if args.limit is not None and done >= args.limit:
            break
    if done == 0:
        raise SystemExit(f"no images in {args.shards}")
    names = ck.class_names
    a, b = plain.compute(names), refined.compute(names)
    result = {
        "checkpoint": str(args.checkpoint),
        "shards": args.shards,
        "images": done,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "crf": dataclasses.asdict(params),
        "miou": {"plain": a["miou"], "crf": b["miou"]},
        "pixel_acc": {"plain": a["pixel_acc"], "crf": b["pixel_acc"]},
        "image_miou": {"plain": a["image_miou"], "crf": b["image_miou"]},
        "iou_by_class": {n: {"plain": a["iou"][k], "crf": b["iou"][k]} for k, n in enumerate(names)},
        "model_s_per_image": statistics.mean(model_s),
        "crf_s_per_image": {
            "mean": statistics.mean(crf_s),
            "median": statistics.median(crf_s),
            "max": max(crf_s),
        },
        "crf_mem_mib": {
            "kind": "cuda peak allocated above baseline" if device.type == "cuda" else "sampled RSS growth",
            "mean": statistics.mean(crf_mem) / 2**20,
            "peak": max(crf_mem) / 2**20,
        },
        "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    return result


def _model_input(batch: object, idx: list[int], ph: int, pw: int, device: torch.device) -> torch.Tensor:
    """Normalised float images `idx` cut to ph x pw on `device`, from either loader: uint8 batches that
    normalise on the device (EvalBatch.model_input) or batches that are normalised already."""
    if hasattr(batch, "model_input"):
        return batch.model_input(idx, ph, pw, device)
    return batch.images[idx, :, :ph, :pw].to(device)


def _rgb(batch: object, i: int, normalised: torch.Tensor, h: int, w: int, data: object) -> torch.Tensor:
    """uint8 [3, h, w] RGB of image i as the model saw it: the batch's own pixels when it carries uint8,
    else recovered from the normalised tensor (data.mean/std; exact up to rounding)."""
    if batch.images.dtype == torch.uint8:
        return batch.images[i, :, :h, :w].to(normalised.device)
    return (denormalize(normalised[:, :h, :w].float(), data) * 255).round().to(torch.uint8)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _timed_crf(probs: torch.Tensor, rgb: torch.Tensor, params: CRFParams, device: torch.device):
    """(refined probabilities, seconds, extra bytes at peak) of one dense_crf call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        q = dense_crf(probs, rgb, params)
        torch.cuda.synchronize(device)
        return q, time.perf_counter() - t, torch.cuda.max_memory_allocated(device) - base
    with RssSampler() as rss:
        t = time.perf_counter()
        q = dense_crf(probs, rgb, params)
        seconds = time.perf_counter() - t
    return q, seconds, rss.peak - rss.start


def _f(v: float) -> str:
    return "     -" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.4f}"


def report(r: dict) -> str:
    width = max(12, *(len(n) for n in r["iou_by_class"]))
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'+CRF':>6}"]
    lines += [f"{n:<{width}}  {_f(v['plain'])}  {_f(v['crf'])}" for n, v in r["iou_by_class"].items()]
    m, p, c, mem = r["miou"], r["pixel_acc"], r["crf_s_per_image"], r["crf_mem_mib"]
    lines += [
        f"mIoU       {_f(m['plain'])} -> {_f(m['crf'])}  ({(m['crf'] - m['plain']) * 100:+.2f} points)",
        f"pixel acc  {_f(p['plain'])} -> {_f(p['crf'])}",
        f"{r['images']} images on {r['device']} ({r['threads']} threads); "
        f"model {r['model_s_per_image']:.3f} s/image; CRF {c['mean']:.2f} s/image "
        f"(median {c['median']:.2f}, max {c['max']:.2f}), {r['crf']['iterations']} iterations",
        f"CRF memory ({mem['kind']}): mean {mem['mean']:.0f} MiB, peak {mem['peak']:.0f} MiB; "
        f"process peak RSS {r['process_peak_rss_mib']:.0f} MiB",
        "CRF params: " + ", ".join(f"{k}={v}" for k, v in r["crf"].items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the trainer's YAML config")
    p.add_argument("--checkpoint", required=True, help="a checkpoint of that config (best.pt, last.pt)")
    p.add_argument("--shards", required=True, help="labelled shards (dist-seg convert), e.g. shards/x/val")
    p.add_argument("--limit", type=int, default=None, help="score only the first N images")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default=None, help="default: train.device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    p.add_argument("--verbose", action="store_true", help="one line per image")
    p.add_argument("overrides", nargs="*", help="config key=value overrides, e.g. crf.iterations=5")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        result = run(args)
    except ValueError as e:  # config, checkpoint, shard and CRF-parameter problems, each naming itself
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(to_jsonable(result), indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
