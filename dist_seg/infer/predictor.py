"""Inference shared by the trainer's evaluation, `dist-seg evaluate` and `dist-seg predict`.

`compute_confusion` is the exact distributed evaluation. What it scores with is a model (the trainer, and a
plain evaluate: argmax of the logits) or a `Predictor`: softmax probabilities averaged over several models
(an ensemble), test-time flips and scales, and overlapping windows (`--mode slide`), optionally refined by
DeepLab v1's dense CRF. A Predictor runs one model on one view (or window) at a time, so memory holds one
model's activations however many models and views are averaged; every model's weights stay loaded.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_seg.checkpoint import WEIGHTS, LoadedCheckpoint, load_for_inference
from dist_seg.config.schema import Config, DataConfig
from dist_seg.data.loading.transforms import denormalize, padded_size
from dist_seg.infer.crf import CRFParams, dense_crf
from dist_seg.infer.metrics import ConfusionMatrix
from dist_seg.models import input_constraints, unwrap
from dist_seg.runtime import distributed as D
from dist_seg.runtime.precision import AMP_DTYPES, autocast
from dist_seg.runtime.preemption import StopRequest


class Scorer(Protocol):
    """Per-pixel class scores of a batch of normalised images already on the device; argmax = prediction.
    Inputs must be padded to a multiple of `divisor` and at least `min_size` (1 and 1: any size)."""

    divisor: int
    min_size: int

    def __call__(self, images: Tensor) -> Tensor: ...


class ModelScorer:
    """A model's logits: what the trainer evaluates."""

    def __init__(self, model: nn.Module, amp_dtype: torch.dtype | None, channels_last: bool = False):
        self.model, self.amp_dtype, self.channels_last = model, amp_dtype, channels_last
        self.divisor, self.min_size = input_constraints(model)

    def __call__(self, images: Tensor) -> Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(images.device, self.amp_dtype):
            return self.model(images)


@torch.inference_mode()
def compute_confusion(
    model: nn.Module | Scorer,
    loader: Any,
    num_classes: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    keep: int = 0,
    stop: StopRequest | None = None,
) -> tuple[ConfusionMatrix, list[tuple[Tensor, Tensor, Tensor]]]:
    """Exact distributed evaluation: a per-rank int64 confusion matrix, all-reduced once at the end.

    `model` is an nn.Module (scored by its logits, with amp_dtype and channels_last) or a Scorer. Ranks may
    see different numbers of batches, so nothing here communicates per batch. Each image is run at its own
    padded size (images of equal padded size together), so a prediction never depends on which images share
    its batch, and metrics do not depend on the batch size or the world size. `keep` returns the first images
    of this rank as (image, target, prediction) for visualisation.
    """
    if isinstance(model, nn.Module):
        unwrap(model).eval()
        model = ModelScorer(unwrap(model), amp_dtype, channels_last)
    cm = ConfusionMatrix(num_classes, device=device)  # pixels labelled IGNORE_INDEX count nowhere
    kept: list[tuple[Tensor, Tensor, Tensor]] = []
    for batch in loader:
        if stop is not None and stop.requested:
            break  # the caller checks, across ranks, whether the result is whole
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (h, w) in enumerate(batch.sizes):
            groups.setdefault(padded_size(h, w, model.divisor, model.min_size), []).append(i)
        for (ph, pw), idx in groups.items():
            images = batch.model_input(idx, ph, pw, device)
            masks = batch.masks[idx, :ph, :pw].to(device, non_blocking=True).long()  # beyond an image: 255
            pred = model(images).argmax(1)
            cm.update(pred, masks)
            for j, i in enumerate(idx):
                if len(kept) < keep:
                    h, w = batch.sizes[i]
                    kept.append((batch.images[i, :, :h, :w], batch.masks[i, :h, :w], pred[j, :h, :w].cpu()))
    cm.reduce_(D.all_reduce_sum_)
    return cm, kept


# ---------------------------------------------------------------------------------------------- Predictor
@dataclass(frozen=True)
class SlideWindow:
    """`--mode slide`: square windows of `window` pixels every `stride` pixels; the last window of a row or
    column ends at the border (no padding beyond the model's own constraints), windows of an image smaller
    than `window` are clipped to it, and overlapping windows' probabilities are averaged."""

    window: int
    stride: int

    def __post_init__(self) -> None:
        if self.window < 1 or not 1 <= self.stride <= self.window:
            raise ValueError(
                f"--window {self.window} --stride {self.stride}: need window >= 1 and 1 <= stride <= window "
                "(a stride past the window would leave pixels no window covers)"
            )

    def starts(self, length: int) -> list[int]:
        """Window offsets along a side of `length` pixels."""
        if length <= self.window:
            return [0]
        starts = list(range(0, length - self.window + 1, self.stride))
        return starts if starts[-1] == length - self.window else [*starts, length - self.window]


class Predictor:
    """Softmax probabilities of a batch of same-size normalised images: averaged over flips and scales
    (TTA) for each model, then over the models (an ensemble, equal weights), optionally refined by the CRF."""

    divisor = min_size = 1  # pads each view for each model itself: compute_confusion may pass any size

    def __init__(
        self,
        models: nn.Module | Sequence[nn.Module],
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        flip: bool = False,
        scales: Sequence[float] = (1.0,),
        slide: SlideWindow | None = None,
        crf: CRFParams | None = None,
        data: DataConfig | None = None,
    ):
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"--scales {list(scales)}: need one or more positive factors")
        if crf is not None and data is None:
            raise ValueError("the CRF needs the data config (data.mean/std) to recover the RGB image")
        self.models = [models] if isinstance(models, nn.Module) else list(models)
        for m in self.models:
            m.eval()
        self.device, self.amp_dtype, self.channels_last = device, amp_dtype, channels_last
        self.flip, self.scales, self.slide, self.crf, self.data = flip, tuple(scales), slide, crf, data

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Tensor:
        """[B, 3, h, w] normalised -> float32 [B, C, h, w] probabilities."""
        images = images.to(self.device, non_blocking=True)
        total = sum(self._model_probs(m, images) for m in self.models)
        probs = total / len(self.models) if len(self.models) > 1 else total
        if self.crf is not None:
            assert self.data is not None
            rgb = (denormalize(images.float(), self.data) * 255).round().to(torch.uint8)
            probs = torch.stack([dense_crf(p, im, self.crf) for p, im in zip(probs, rgb, strict=True)])
        return probs

    def _model_probs(self, model: nn.Module, images: Tensor) -> Tensor:
        h, w = images.shape[-2:]
        total: Tensor | None = None
        views = 0
        for s in self.scales:
            size = (max(1, round(h * s)), max(1, round(w * s)))
            x = images if size == (h, w) else resize(images, size)
            for flip in (False, True) if self.flip else (False,):
                v = x.flip(-1) if flip else x
                p = self._slide(model, v) if self.slide is not None else self._whole(model, v)
                p = p.flip(-1) if flip else p
                p = p if size == (h, w) else resize(p, (h, w))
                total = p if total is None else total + p
                views += 1
        assert total is not None
        return total / views if views > 1 else total

    def _whole(self, model: nn.Module, x: Tensor) -> Tensor:
        """Probabilities of one view: padded bottom/right to the model's constraints, cropped back."""
        h, w = x.shape[-2:]
        divisor, min_size = input_constraints(model)
        ph, pw = padded_size(h, w, divisor, min_size)
        x = F.pad(x, (0, pw - w, 0, ph - h))  # 0 = the mean colour after normalisation
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp_dtype):
            logits = model(x)
        return logits[:, :, :h, :w].float().softmax(1)

    def _slide(self, model: nn.Module, x: Tensor) -> Tensor:
        assert self.slide is not None
        h, w = x.shape[-2:]
        wh, ww = min(self.slide.window, h), min(self.slide.window, w)
        total: Tensor | None = None
        count = torch.zeros((1, 1, h, w), device=x.device)
        for y in self.slide.starts(h):
            for x0 in self.slide.starts(w):
                p = self._whole(model, x[..., y : y + wh, x0 : x0 + ww])
                if total is None:
                    total = torch.zeros((x.shape[0], p.shape[1], h, w), device=x.device)
                total[..., y : y + wh, x0 : x0 + ww] += p
                count[..., y : y + wh, x0 : x0 + ww] += 1
        assert total is not None
        return total / count


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


# ---------------------------------------------------------------------------------------------- command line
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


def load_models(
    cfg: Config, checkpoints: Sequence[str], device: torch.device, num_classes: int | None, weights: str
) -> tuple[list[nn.Module], list[LoadedCheckpoint]]:
    """The models of one or several checkpoints. An ensemble's members may be different models and widths
    (each is built from its own saved config) but must share the class list and the input normalisation."""
    own = len(checkpoints) > 1
    loaded = [load_for_inference(cfg, c, device, num_classes, weights, own_model=own) for c in checkpoints]
    first = loaded[0][1]
    for _, ck in loaded:
        saved = ck.saved_config.get("data", {})
        for key in ("mean", "std"):
            if key in saved and [float(v) for v in saved[key]] != [float(v) for v in getattr(cfg.data, key)]:
                raise ValueError(
                    f"checkpoint {ck.path} was trained with data.{key}={list(saved[key])}, but the config "
                    f"normalises with data.{key}={list(getattr(cfg.data, key))}: its inputs would be off"
                )
    for _, ck in loaded[1:]:
        if ck.class_names != first.class_names:
            raise ValueError(
                f"ensemble: checkpoint {ck.path} has classes {ck.class_names}, but {first.path} has "
                f"{first.class_names}: members must predict the same classes"
            )
    return [m for m, _ in loaded], [ck for _, ck in loaded]


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
