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

COLOUR_ROWS = 4  # per sample: A (3 rows of 3), then the bias (normalised units)
Clip = tuple[Sequence[float], Sequence[float]]  # per-channel (low, high) of the 0..1 range, normalised


WHOLE_PLANE_FILL = 0.6  # CPU path: content fraction from which a sample's whole plane is computed (measured)


def plain_colour(mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """[COLOUR_ROWS, 3]: normalisation only, (x / 255 - mean) / std."""
    colour = torch.zeros(COLOUR_ROWS, 3)
    for j in range(3):
        colour[j, j] = 1.0 / (255.0 * std[j])
        colour[3, j] = -mean[j] / std[j]
    return colour


def colour_range(mean: Sequence[float], std: Sequence[float]) -> Clip:
    """The 0..1 colour range in normalised units, per channel: where jittered colours are clipped."""
    return [-m / s for m, s in zip(mean, std, strict=True)], [
        (1 - m) / s for m, s in zip(mean, std, strict=True)
    ]


def to_model_input(
    images: Tensor,
    colour: Tensor,
    sizes: Sequence[Sequence[int]] | Tensor | None = None,
    channels_last: bool = False,
    clip: Clip | None = None,
    batched: bool | None = None,
) -> Tensor:
    """uint8 [B, 3, H, W] (any memory layout), colour rows [B or 1, COLOUR_ROWS, 3] and, on the host, content
    sizes [B] x (h, w) (None: all of H x W) and the clip range -> float32 [B, 3, H, W]: rgb @ A + bias,
    clipped to `clip` when given, 0 outside each sample's content. Host-side sizes and clip values let it
    zero the padding and clip without reading anything back from the device. `batched`: one batched matrix
    product (default on accelerators) or one per sample (default on CPU)."""
    batched = images.device.type != "cpu" if batched is None else batched
    with torch.autocast(images.device.type, enabled=False):  # float32 under any train.amp
        return _colour(images, colour, sizes, channels_last, clip, batched)


def _colour(
    images: Tensor,
    colour: Tensor,
    sizes: Sequence[Sequence[int]] | Tensor | None,
    channels_last: bool,
    clip: Clip | None,
    batched: bool,
) -> Tensor:
    b, _, h, w = images.shape
    colour = colour.to(images.device, torch.float32, non_blocking=True).expand(b, -1, -1)
    a_t, bias = colour[:, :3].transpose(1, 2), colour[:, 3, :, None]  # out = A^T x + bias on [3, HW] planes
    content = sizes.tolist() if isinstance(sizes, Tensor) else [list(s) for s in sizes] if sizes else None
    if not batched:
        # sample by sample: a [3, 3] x [3, pixels] product. A sample that fills most of the plane is computed
        # whole, straight into its slot of the batch (no copy); a small one on its content only, then copied
        # (a small image padded to the crop costs its own size, as when the workers did this). A scratch
        # buffer reused across samples holds the float pixels (and another the products): fresh large buffers
        # cost page faults.
        out = torch.empty(b, 3, h, w)
        scratch, products = torch.empty(3 * h * w), torch.empty(0)
        for i in range(b):
            sh, sw = content[i] if content else (h, w)
            whole = sh * sw >= WHOLE_PLANE_FILL * h * w
            ph, pw = (h, w) if whole else (sh, sw)
            pixels = scratch[: 3 * ph * pw].view(3, ph, pw)
            pixels.copy_(images[i, :, :ph, :pw])
            if whole:
                values = out[i]
                torch.addmm(bias[i], a_t[i], pixels.view(3, ph * pw), out=values.view(3, ph * pw))
            else:
                products = products if products.numel() else torch.empty(3 * h * w)
                values = products[: 3 * ph * pw].view(3, ph, pw)
                torch.addmm(bias[i], a_t[i], pixels.view(3, ph * pw), out=values.view(3, ph * pw))
            if clip is not None:
                for ch in range(3):
                    values[ch].clamp_(clip[0][ch], clip[1][ch])
            if not whole:
                out[i, :, :sh, :sw] = values
            if sh < h:
                out[i, :, sh:] = 0.0
            if sw < w:
                out[i, :, :sh, sw:] = 0.0
    else:  # one batched product: a single kernel, then the padding zeroed
        pixels = images.to(torch.float32, memory_format=torch.contiguous_format).view(b, 3, h * w)
        out = torch.baddbmm(bias, a_t, pixels).view(b, 3, h, w)
        if clip is not None:
            for ch in range(3):
                out[:, ch].clamp_(clip[0][ch], clip[1][ch])
        for i, (sh, sw) in enumerate(content or ()):
            if sh < h:
                out[i, :, sh:] = 0.0
            if sw < w:
                out[i, :, :sh, sw:] = 0.0
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


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
