"""The colour step: uint8 images become normalised float32 model input, on whatever device they are on.

It is the one normalisation path of the package: training batches (`TrainBatch.model_input`), evaluation
batches (`EvalBatch.model_input`), `dist-seg predict` and `dist-seg export`'s check image all go through
`to_model_input`, so every consumer rounds the input the same way.

Each sample carries *colour rows* [COLOUR_ROWS, 3]: a 3x3 matrix A and a bias (normalised units) with
model input = rgb255 @ A + bias, clipped to the 0..1 colour range in normalised units (`colour_range`) when
colour jitter is on. `plain_colour` is normalisation only, (x / 255 - mean) / std; `jitter_colour` folds a
sample's brightness, contrast and saturation factors into the same rows, since all three are linear in the
pixel. Which factors a sample gets, and when they are drawn, is augmentation: dist_seg.data.loading.transforms.

Why on the device: loader workers hand over uint8 (a quarter of float32's bytes cross PCIe) and the per-pixel
float work (~2 ms of a loader core per 512x512 sample) runs where it costs microseconds. The step knows one
thing about the geometry: each sample's content size (h, w), passed from the host, so it never reads anything
back from the device. Everything beyond it (bottom/right padding) becomes 0.0, the mean colour after
normalisation, whatever uint8 bytes were there. It runs outside autocast: float32 whatever train.amp says.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dist_seg.config.schema import DataConfig

COLOUR_ROWS = 4  # per sample: A (3 rows of 3), then the bias (normalised units)
Clip = tuple[Sequence[float], Sequence[float]]  # per-channel (low, high) of the 0..1 range, normalised
LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601 weights, as torchvision's rgb_to_grayscale

WHOLE_PLANE_FILL = 0.6  # CPU path: content fraction from which a sample's whole plane is computed (measured)


def plain_colour(mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """[COLOUR_ROWS, 3]: normalisation only, (x / 255 - mean) / std."""
    colour = torch.zeros(COLOUR_ROWS, 3)
    for j in range(3):
        colour[j, j] = 1.0 / (255.0 * std[j])
        colour[3, j] = -mean[j] / std[j]
    return colour


def jitter_colour(
    pixel_mean: Sequence[float],
    factors: tuple[float, float, float],
    mean: Sequence[float],
    std: Sequence[float],
) -> Tensor:
    """[COLOUR_ROWS, 3]: A and bias such that rgb255 @ A + bias =
    normalise(saturation(contrast(brightness(rgb / 255)))), with factors = (brightness, contrast, saturation).

    Brightness b scales; contrast c blends with the mean grey level m; saturation s blends with each pixel's
    grey value (torchvision's definitions). All three are linear in the pixel, so with the normalisation they
    fold into one 3x3 matrix and one bias, applied in a single pass (clamping to 0..1 happens once, after, in
    `to_model_input`). `pixel_mean` is the per-channel mean of the 0..255 pixels, which fixes m. Plain floats:
    at this size Python arithmetic is faster than a dozen tiny tensor ops.
    """
    b, c, s = factors
    m = b * sum(w * p for w, p in zip(LUMA, pixel_mean, strict=True)) / 255.0
    a = [
        [(s * c * b * (i == j) + (1.0 - s) * c * b * LUMA[i]) / (255.0 * std[j]) for j in range(3)]
        for i in range(3)
    ]
    # the contrast's constant (1 - c) m through the saturation blend: s + (1 - s) x sum(LUMA), and the 601
    # weights sum to 0.9999, not 1
    grey = (1.0 - c) * m * (s + (1.0 - s) * sum(LUMA))
    bias = [(grey - mean[j]) / std[j] for j in range(3)]
    return torch.tensor([*a, bias])


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


def denormalize(images: Tensor, cfg: DataConfig) -> Tensor:
    """Normalised float images [..., 3, H, W] -> float 0..1 (TensorBoard's add_images, the CRF's RGB): the
    inverse of `plain_colour`, for looking at model input, never for producing it."""
    mean = torch.tensor(cfg.mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images * std + mean).clamp(0.0, 1.0)
