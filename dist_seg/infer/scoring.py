"""Scoring a model on the evaluation shards: `compute_confusion` is the exact distributed evaluation the
trainer, `dist-seg evaluate` and `dist-seg predict` share. What it scores with is a `Scorer`: a model (the
trainer, and a plain evaluate: argmax of the logits, `ModelScorer`) or a dist_seg.infer.predictor.Predictor
(ensembles, test-time augmentation, sliding windows, the dense CRF).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn

from dist_seg.data.loading.transforms import padded_size
from dist_seg.infer.metrics import ConfusionMatrix
from dist_seg.models import input_constraints, unwrap
from dist_seg.runtime import distributed as D
from dist_seg.runtime.precision import autocast
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
