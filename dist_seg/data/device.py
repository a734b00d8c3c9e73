"""The input pipeline's device half: uint8 batches become normalised float images on the accelerator, and the
next batch is copied there while the current step runs.

Loader workers do the geometry (decode, scale, crop, flip, pad: image and mask must move together) and hand
over uint8 images, uint8 label maps and, per training sample, the 3x3 colour matrix, bias and clip range of its
colour jitter and normalisation (drawn from the sample's own seed, so runs stay reproducible and a resume
exact; see transforms.colour_matrix). `to_model_input` applies them in one batched matrix product on the
device: a quarter of the bytes cross PCIe, and the per-pixel float work (~2 ms of a loader core per 512x512
sample) runs where it costs microseconds. Padding (beyond each sample's content size) becomes 0, the mean
colour after normalisation, as before. It runs outside autocast: float32 whatever train.amp says.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

COLOUR_ROWS = 6  # per sample: A (3 rows of 3), bias, clip low, clip high (normalised units)


def plain_colour(mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """[COLOUR_ROWS, 3]: normalisation only (x / 255 - mean) / std, no clipping."""
    colour = torch.zeros(COLOUR_ROWS, 3)
    for j in range(3):
        colour[j, j] = 1.0 / (255.0 * std[j])
        colour[3, j] = -mean[j] / std[j]
    colour[4], colour[5] = -torch.inf, torch.inf
    return colour


def to_model_input(
    images: Tensor, colour: Tensor, sizes: Tensor | None = None, channels_last: bool = False
) -> Tensor:
    """uint8 [B, 3, H, W] (any memory layout; channels-last is read without a copy), colour [B or 1,
    COLOUR_ROWS, 3] and content sizes int [B, 2] (None: all of H x W) -> float32 [B, 3, H, W], normalised,
    clipped to the colour range when the rows say so, 0 outside each sample's content."""
    with torch.autocast(images.device.type, enabled=False):  # float32 under any train.amp
        return _colour(images, colour, sizes, channels_last)


def _colour(images: Tensor, colour: Tensor, sizes: Tensor | None, channels_last: bool) -> Tensor:
    b, _, h, w = images.shape
    pixels = images.permute(0, 2, 3, 1).reshape(b, h * w, 3).float()  # NHWC rows of RGB
    colour = colour.to(images.device, torch.float32).expand(b, -1, -1)
    out = torch.baddbmm(colour[:, 3:4], pixels, colour[:, :3])  # [B, HW, 3] = rgb @ A + bias
    out = torch.minimum(torch.maximum(out, colour[:, 4:5]), colour[:, 5:6])
    out = out.view(b, h, w, 3)
    if sizes is not None:
        sizes = sizes.to(images.device)
        rows = torch.arange(h, device=images.device).view(1, h, 1) < sizes[:, 0].view(b, 1, 1)
        cols = torch.arange(w, device=images.device).view(1, 1, w) < sizes[:, 1].view(b, 1, 1)
        out = out * (rows & cols).unsqueeze(-1)
    out = out.permute(0, 3, 1, 2)  # NCHW shape, channels-last memory
    return out if channels_last else out.contiguous()


def to_device(t: Tensor, device: torch.device) -> Tensor:
    return t.to(device, non_blocking=True)


class Prefetcher:
    """Iterate batches already on `device`: on CUDA the next batch is copied on a side stream while the caller
    computes on the current one (pinned host memory makes the copy asynchronous); elsewhere a plain
    pass-through. `fields` names the tensor attributes of a batch to move."""

    def __init__(self, batches: Iterator[Any], device: torch.device, fields: Sequence[str]):
        self.batches, self.device, self.fields = batches, device, tuple(fields)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.next: Any = None
        self._load()

    def _load(self) -> None:
        try:
            batch = next(self.batches)
        except StopIteration:
            self.next = None
            return
        if self.stream is None:
            self.next = batch
            return
        with torch.cuda.stream(self.stream):
            for name in self.fields:
                value = getattr(batch, name)
                if isinstance(value, Tensor):
                    setattr(batch, name, value.to(self.device, non_blocking=True))
        self.next = batch

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if self.next is None:
            raise StopIteration
        batch = self.next
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            for name in self.fields:  # the tensors are now used on the compute stream too
                value = getattr(batch, name)
                if isinstance(value, Tensor):
                    value.record_stream(torch.cuda.current_stream(self.device))
        self._load()
        return batch
