"""Evaluate a checkpoint on labelled shards: metrics.json, confusion.png and a per-class table.

    dist-seg evaluate --config configs/demo.yaml --checkpoint runs/demo/best.pt
    dist-seg evaluate --config CFG --checkpoint CKPT --shards shards/val2 --out runs/demo/eval_val2 data.eval_resize=512
    torchrun --nproc_per_node=2 -m dist_seg.evaluate --config CFG --checkpoint CKPT

The evaluation is the trainer's own (`engine.compute_confusion`): every sample once across ranks, a per-rank int64
confusion matrix, one all-reduce; the numbers equal the trainer's eval of the same weights on the same shards
with the same config. Shards default to data.val_shards, the output directory to CHECKPOINT_DIR/eval.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from dist_seg import distributed as D
from dist_seg.checkpoint import load_for_inference
from dist_seg.config import Config
from dist_seg.config_loading import load_config
from dist_seg.data.eval_stream import build_eval_loader
from dist_seg.data.remote import RemoteOptions
from dist_seg.data.shards import dataset_classes
from dist_seg.engine import compute_confusion
from dist_seg.metrics import to_jsonable
from dist_seg.models import input_constraints
from dist_seg.precision import AMP_DTYPES
from dist_seg.viz import confusion_figure


def evaluate_checkpoint(
    cfg: Config,
    checkpoint: str | Path,
    world: D.World,
    out: str | Path | None = None,
    shards: str | None = None,
) -> dict[str, Any]:
    """Evaluate on every rank; rank 0 writes OUT/metrics.json and OUT/confusion.png and prints the table.

    Returns the metrics (same on every rank) plus checkpoint, step, shards, num_images and skipped.
    """
    spec = shards or cfg.data.val_shards
    if not spec:
        raise ValueError("nothing to evaluate: set config key data.val_shards or pass --shards")
    shard_set = dataset_classes(spec, cfg.model.num_classes, RemoteOptions.from_config(cfg.data))
    num_classes, shard_names = shard_set.num_classes, shard_set.class_names
    if not shard_set.has_labels:
        raise ValueError(f"shards {spec} have no label maps (a test split?): use `dist-seg predict` instead")
    model, ck = load_for_inference(cfg, checkpoint, world.device, num_classes)
    if ck.class_names != shard_names:
        raise ValueError(
            f"checkpoint {ck.path} was trained on classes {ck.class_names}, but the shards {spec} have "
            f"classes {shard_names}"
        )
    divisor, min_size = input_constraints(model)
    loader = build_eval_loader(cfg.data, world.rank, world.world_size, divisor, min_size, shards=spec)
    cm, _ = compute_confusion(
        model,
        loader,
        num_classes,
        world.device,
        AMP_DTYPES[cfg.train.amp],
        cfg.train.channels_last,
    )
    skipped = sum(D.all_gather_object(loader.skipped))
    metrics = cm.compute(ck.class_names)
    result = {
        "checkpoint": str(ck.path),
        "step": ck.step,
        "model": ck.model_name,
        "shards": spec,
        "num_images": shard_set.total_samples - skipped,
        "skipped": skipped,
        "world_size": world.world_size,
        **metrics,
    }
    if world.is_main:
        out_dir = Path(out) if out is not None else ck.path.parent / "eval"
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
    p.add_argument("--checkpoint", required=True, help="checkpoint file (e.g. RUN_DIR/best.pt)")
    p.add_argument("--shards", default=None, help="labelled shards to evaluate (default: data.val_shards)")
    p.add_argument("--out", default=None, help="output directory (default: CHECKPOINT_DIR/eval)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.eval_resize=512")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        print(f"dist-seg evaluate: error: {e}", file=sys.stderr)
        return 2
    world = D.init_distributed(cfg.train.device, cfg.train.timeout_s)
    try:
        evaluate_checkpoint(cfg, args.checkpoint, world, args.out, args.shards)
    except ValueError as e:  # user errors are the same on every rank: each exits with the message
        print(f"dist-seg evaluate: error: {e}", file=sys.stderr)
        return 2
    finally:
        D.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
