"""The command-line options `dist-seg evaluate` and `dist-seg predict` share (checkpoints of an ensemble,
weights, TTA, sliding windows, CRF), their checks before any process group starts, and the Predictor they
describe.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dist_seg.checkpoint import WEIGHTS
from dist_seg.config.schema import Config
from dist_seg.infer.crf import CRFParams
from dist_seg.infer.predictor import Predictor, SlideWindow
from dist_seg.runtime.precision import AMP_DTYPES


def add_inference_args(p: argparse.ArgumentParser) -> None:
    """The options evaluate and predict share: checkpoints (an ensemble), weights, TTA, slide, CRF."""
    p.add_argument(
        "--checkpoint",
        action="append",
        help="checkpoint file (e.g. RUN_DIR/best.pt); repeat it for an ensemble (probabilities averaged)",
    )
    p.add_argument(
        "--weights", default="auto", choices=WEIGHTS, help="auto (the EMA when saved) | ema | model"
    )
    p.add_argument("--tta", default="none", help="none | flip | scales | flip,scales (default none)")
    p.add_argument("--scales", type=_floats, help="TTA scale factors (default 0.75,1,1.25)")
    p.add_argument("--mode", default="whole", choices=("whole", "slide"), help="whole images or windows")
    p.add_argument("--window", type=int, help="--mode slide: window side in pixels (e.g. the training crop)")
    p.add_argument("--stride", type=int, help="--mode slide: window step in pixels (default window*2/3)")
    p.add_argument("--crf", action="store_true", help="refine probabilities by the dense CRF (config crf.*)")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def parse_tta(tta: str, scales: Sequence[float] | None) -> tuple[bool, tuple[float, ...]]:
    """`none`, `flip`, `scales` or `flip,scales` (+ --scales) -> (flip, scale factors)."""
    parts = {p.strip() for p in tta.split(",") if p.strip()}
    unknown = parts - {"none", "flip", "scales"}
    if unknown or not parts or ("none" in parts and len(parts) > 1):
        raise ValueError(f"--tta {tta!r}: expected none, flip, scales or flip,scales")
    if scales is not None and "scales" not in parts:
        raise ValueError(f"--scales {list(scales)} needs --tta scales (or flip,scales)")
    return "flip" in parts, tuple(scales or (0.75, 1.0, 1.25)) if "scales" in parts else (1.0,)


def parse_slide(mode: str, window: int | None, stride: int | None) -> SlideWindow | None:
    if mode == "whole":
        if window is not None or stride is not None:
            raise ValueError("--window and --stride need --mode slide")
        return None
    if window is None:
        raise ValueError("--mode slide needs --window PX (e.g. the training crop, data.crop_size)")
    return SlideWindow(window, stride if stride is not None else max(1, window * 2 // 3))


def inference_defaults(**values: Any) -> argparse.Namespace:
    """The shared options' defaults (a plain single-model evaluation), with `values` set."""
    p = argparse.ArgumentParser()
    add_inference_args(p)
    return argparse.Namespace(**{**vars(p.parse_args([])), **values})


def check_inference_args(args: argparse.Namespace) -> None:
    """The option errors, raised before any process group starts."""
    if not args.checkpoint:
        raise ValueError("--checkpoint is required (repeat it for an ensemble)")
    if len(set(args.checkpoint)) != len(args.checkpoint):
        raise ValueError(f"--checkpoint names a file twice: {args.checkpoint}")
    parse_tta(args.tta, args.scales)
    parse_slide(args.mode, args.window, args.stride)


def build_predictor(
    cfg: Config, args: argparse.Namespace, models: list[nn.Module], device: torch.device
) -> Predictor:
    flip, scales = parse_tta(args.tta, args.scales)
    crf = CRFParams(**vars(cfg.crf)) if args.crf else None
    slide = parse_slide(args.mode, args.window, args.stride)
    amp = AMP_DTYPES[cfg.train.amp]
    return Predictor(models, device, amp, cfg.train.channels_last, flip, scales, slide, crf, cfg.data)


def is_plain(args: argparse.Namespace) -> bool:
    """One checkpoint, no TTA, whole images, no CRF: evaluate scores exactly as the trainer does."""
    return len(args.checkpoint) == 1 and args.tta == "none" and args.mode == "whole" and not args.crf
