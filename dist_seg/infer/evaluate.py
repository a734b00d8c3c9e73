"""Evaluate a checkpoint on labelled shards: metrics.json, confusion.png and a per-class table.

    dist-seg evaluate --config configs/demo.yaml --checkpoint runs/demo/best.pt
    dist-seg evaluate --config CFG --checkpoint CKPT --shards shards/val2 --out runs/demo/eval_val2 data.eval_resize=512
    torchrun --nproc_per_node=2 -m dist_seg.infer.evaluate --config CFG --checkpoint CKPT

    dist-seg evaluate --config CFG --checkpoint A.pt --checkpoint B.pt --tta flip --mode slide --window 512 --crf

The evaluation is the trainer's own (`inference.compute_confusion`): every sample once across ranks, a per-rank
int64 confusion matrix, one all-reduce; with one checkpoint and no --tta/--mode slide/--crf the numbers equal
the trainer's eval of the same weights on the same shards with the same config. Several --checkpoint values
are an ensemble (softmax probabilities averaged; see dist_seg.infer.predictor). Shards default to data.val_shards,
the output directory to CHECKPOINT_DIR/eval (CHECKPOINT_DIR/eval_ensemble for an ensemble).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from dist_seg.config.loading import load_config
from dist_seg.config.schema import Config
from dist_seg.data.format.remote import RemoteOptions
from dist_seg.data.format.shards import dataset_classes
from dist_seg.data.format.urls import redact
from dist_seg.data.loading.eval_loader import build_eval_loader
from dist_seg.infer.metrics import to_jsonable
from dist_seg.infer.options import (
    add_inference_args,
    build_predictor,
    check_inference_args,
    inference_defaults,
    is_plain,
)
from dist_seg.infer.predictor import load_models
from dist_seg.infer.scoring import compute_confusion
from dist_seg.models import input_constraints
from dist_seg.runtime import distributed as D
from dist_seg.runtime.precision import AMP_DTYPES
from dist_seg.viz import confusion_figure


def evaluate_checkpoint(
    cfg: Config,
    checkpoint: str | Path | list[str],
    world: D.World,
    out: str | Path | None = None,
    shards: str | None = None,
    inference: argparse.Namespace | None = None,
) -> dict[str, Any]:
    """Evaluate on every rank; rank 0 writes OUT/metrics.json and OUT/confusion.png and prints the table.

    `inference` holds the shared options (dist_seg.infer.predictor.add_inference_args: weights, TTA, slide, CRF).
    Returns the metrics (same on every rank) plus checkpoint(s), weights, step, shards, num_images, skipped.
    """
    checkpoints = [str(checkpoint)] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    args = argparse.Namespace(**{**vars(inference or inference_defaults()), "checkpoint": checkpoints})
    check_inference_args(args)
    spec = shards or cfg.data.val_shards
    if not spec:
        raise ValueError("nothing to evaluate: set config key data.val_shards or pass --shards")
    shard_set = dataset_classes(spec, cfg.model.num_classes, RemoteOptions.from_config(cfg.data))
    num_classes, shard_names = shard_set.num_classes, shard_set.class_names
    if not shard_set.has_labels:
        raise ValueError(
            f"shards {redact(spec)} have no label maps (a test split?): use `dist-seg predict` instead"
        )
    models, cks = load_models(cfg, checkpoints, world.device, num_classes, args.weights)
    ck = cks[0]
    if ck.class_names != shard_names:
        raise ValueError(
            f"checkpoint {ck.path} was trained on classes {ck.class_names}, but the shards {redact(spec)} have "
            f"classes {shard_names}"
        )
    predictor = build_predictor(cfg, args, models, world.device)  # also the parsed options for metrics.json
    scorer = models[0] if is_plain(args) else predictor
    divisor, min_size = input_constraints(models[0]) if is_plain(args) else (1, 1)
    loader = build_eval_loader(cfg.data, world.rank, world.world_size, divisor, min_size, shards=spec)
    cm, _ = compute_confusion(
        scorer, loader, num_classes, world.device, AMP_DTYPES[cfg.train.amp], cfg.train.channels_last
    )
    skipped = sum(D.all_gather_object(loader.skipped))
    metrics = cm.compute(ck.class_names)
    result = {
        "checkpoint": str(ck.path) if len(cks) == 1 else [str(c.path) for c in cks],
        "weights": ck.weights if len(cks) == 1 else [c.weights for c in cks],
        "step": ck.step if len(cks) == 1 else [c.step for c in cks],
        "model": ck.model_name if len(cks) == 1 else [c.model_name for c in cks],
        "tta": args.tta,
        "scales": list(predictor.scales),
        "mode": args.mode,
        "window": args.window,
        "stride": predictor.slide.stride if predictor.slide is not None else None,
        "crf": dataclasses.asdict(cfg.crf) if args.crf else None,
        "shards": redact(spec),  # metrics.json never holds a URL's credential
        "num_images": shard_set.total_samples - skipped,
        "skipped": skipped,
        "world_size": world.world_size,
        **metrics,
    }
    if world.is_main:
        out_dir = (
            Path(out) if out is not None else ck.path.parent / ("eval" if len(cks) == 1 else "eval_ensemble")
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(to_jsonable(result), indent=1) + "\n")
        save_confusion_png(metrics["matrix"], ck.class_names, out_dir / "confusion.png")
        print(format_table(result, ck.class_names))
        print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'confusion.png'}")
    return result


def save_confusion_png(matrix: Any, names: list[str], path: Path) -> None:
    fig = confusion_figure(matrix, names)
    fig.savefig(path, dpi=100)


def _fmt(v: float) -> str:
    return "     -" if v is None or math.isnan(v) else f"{v:6.4f}"


def format_table(metrics: dict[str, Any], names: list[str]) -> str:
    """Per-class IoU and accuracy, then the summary metrics; NaN (class absent everywhere) shows as '-'."""
    width = max(12, *(len(n) for n in names))
    gt = [sum(row) for row in metrics["matrix"]]
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'acc':>6}  {'gt pixels':>12}"]
    for name, iou, acc, n in zip(names, metrics["iou"], metrics["acc"], gt, strict=True):
        lines.append(f"{name:<{width}}  {_fmt(iou)}  {_fmt(acc)}  {n:>12,}")
    lines.append(
        f"mIoU {_fmt(metrics['miou'])}  pixel acc {_fmt(metrics['pixel_acc'])}  mean acc "
        f"{_fmt(metrics['mean_acc'])}  image mIoU {_fmt(metrics['image_miou'])}  "
        f"({metrics.get('num_images', '?')} images, step {metrics.get('step')})"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-seg evaluate", description="Evaluate a checkpoint (DDP-ready).")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    add_inference_args(p)
    p.add_argument("--shards", default=None, help="labelled shards to evaluate (default: data.val_shards)")
    p.add_argument("--out", default=None, help="output directory (default: CHECKPOINT_DIR/eval)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.eval_resize=512")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_inference_args(args)  # before any process group starts
    except ValueError as e:
        print(f"dist-seg evaluate: error: {e}", file=sys.stderr)
        return 2
    world = D.init_distributed(cfg.train.device, cfg.train.timeout_s)
    try:
        evaluate_checkpoint(cfg, args.checkpoint, world, args.out, args.shards, args)
    except ValueError as e:  # user errors are the same on every rank: each exits with the message
        print(f"dist-seg evaluate: error: {e}", file=sys.stderr)
        return 2
    finally:
        D.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
