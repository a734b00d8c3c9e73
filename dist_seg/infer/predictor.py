"""The Predictor: softmax probabilities averaged over several models (an ensemble), test-time flips and
scales, and overlapping windows (`--mode slide`), optionally refined by DeepLab v1's dense CRF. It runs one
model on one view (or window) at a time, so memory holds one model's activations however many models and
views are averaged; every model's weights stay loaded. `load_models` reads an ensemble's checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_seg.checkpoint import LoadedCheckpoint, load_for_inference
from dist_seg.config.schema import Config, DataConfig
from dist_seg.data.loading.colour import denormalize
from dist_seg.data.loading.transforms import padded_size
from dist_seg.infer.crf import CRFParams, dense_crf
from dist_seg.models import input_constraints
from dist_seg.runtime.precision import autocast


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
