"""Joint image/mask transforms on tensors: random scale + crop, flip, colour jitter, normalisation, padding.

Images arrive as uint8 [3, H, W] (what torchvision.io decodes to) and masks as uint8 [H, W] label maps
(255 = ignore). Geometry runs on uint8, where torch's bilinear antialias kernel is about three times faster
than on float; colour and normalisation then run once in float. Masks are always resized with
`nearest-exact`, which samples the pixel whose centre is nearest, the same half-pixel convention as the
image's bilinear kernel, so labels stay on the pixels they describe.

Training: scale by s ~ U(scale_min, scale_max), crop crop_size x crop_size at a random place, pad what is
missing at the bottom/right (image 0 after normalisation, i.e. the mean colour; mask 255), flip, then colour
jitter (brightness, contrast, saturation ~ U(1 - j, 1 + j)) and normalisation. Rather than resizing the whole
image and cropping, the crop window is mapped back to the original image and only that region is resized, so
a 2x upscale of a large image costs one crop's worth of work. Jitter and normalisation are all linear in the
pixel: the worker draws them and folds them into one 3x3 matrix and a bias (see `colour_matrix`), which
dist_seg.data.loading.colour.to_model_input applies to the uint8 batch on the training device.

Evaluation and prediction hand over uint8 too (resized when data.eval_resize is set); their normalisation
is the same device function with `device.plain_colour`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dist_seg.config.schema import DataConfig
from dist_seg.data import IGNORE_INDEX
from dist_seg.data.loading.colour import colour_range, plain_colour, to_model_input


def resize_pair(image: Tensor, mask: Tensor | None, size: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
    """Resize uint8 image [3, H, W] (bilinear, antialiased) and mask [H, W] (nearest) to size (h, w)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, mask
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    if mask is not None:
        mask = F.interpolate(mask[None, None], size=size, mode="nearest-exact")[0, 0]
    return image, mask


def normalize(image: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 or 0..1 float [3, H, W] -> float32 normalised with per-channel mean/std (given on a 0..1 scale)."""
    x = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
    return x.sub_(mean.view(3, 1, 1)).div_(std.view(3, 1, 1))


LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601 weights, as torchvision's rgb_to_grayscale


def colour_matrix(
    pixel_mean: Sequence[float],
    factors: tuple[float, float, float],
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[Tensor, Tensor]:
    """(A [3, 3], bias [3]) such that rgb255 @ A + bias = normalise(saturation(contrast(brightness(rgb/255)))).

    Brightness b scales; contrast c blends with the mean grey level m; saturation s blends with each pixel's
    grey value (torchvision's definitions). All three are linear in the pixel, so with the normalisation they
    fold into one 3x3 matrix and one bias, applied in a single pass (clamping to 0..1 happens once, after).
    `pixel_mean` is the per-channel mean of the 0..255 pixels, which fixes m. Plain floats: at this size
    Python arithmetic is faster than a dozen tiny tensor ops.
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
    return torch.tensor(a), torch.tensor(bias)


class TrainTransform:
    """(uint8 image [3, H, W], uint8 mask [H, W], rng) -> (float32 [3, crop, crop], uint8 [crop, crop]).

    `apply` is what loader workers run: the geometry only, written as uint8 straight into slots of a
    preallocated batch (which saves the padding and stacking copies), returning the sample's colour rows and
    content size for the device step. Geometry works on the decoder's HWC uint8 layout (torch's fast uint8
    resize path), whose output is planar, like the batch slots. `__call__` runs both halves
    on the CPU (tests, tools).
    """

    def __init__(self, cfg: DataConfig):
        self.crop = cfg.crop_size
        self.scale = (cfg.scale_min, cfg.scale_max)
        self.hflip_prob = cfg.hflip_prob
        self.jitter = cfg.color_jitter
        self.mean, self.std = list(cfg.mean), list(cfg.std)
        self.plain = plain_colour(self.mean, self.std)

    def __call__(self, image: Tensor, mask: Tensor, rng: random.Random) -> tuple[Tensor, Tensor]:
        out = torch.empty(1, 3, self.crop, self.crop, dtype=torch.uint8)
        out_mask = torch.empty(self.crop, self.crop, dtype=torch.uint8)
        colour, size = self.apply(image, mask, rng, out[0], out_mask)
        clip = colour_range(self.mean, self.std) if self.jitter > 0 else None
        return to_model_input(out, colour[None], [size], clip=clip)[0], out_mask

    def apply(
        self, image: Tensor, mask: Tensor, rng: random.Random, out: Tensor, out_mask: Tensor
    ) -> tuple[Tensor, tuple[int, int]]:
        """Augment one sample's geometry into out (uint8 [3, crop, crop], planar) and out_mask
        (uint8 [crop, crop]); return its colour rows [COLOUR_ROWS, 3] and content size (h, w) for
        device.to_model_input. The random draws, in order: scale, crop place, flip, jitter factors."""
        crop = self.crop
        h, w = image.shape[-2:]
        s = rng.uniform(*self.scale)
        # output content size (the crop, or the whole scaled image when that is smaller) ...
        out_h, out_w = min(crop, max(1, round(h * s))), min(crop, max(1, round(w * s)))
        # ... and the region of the original image it comes from
        reg_h, reg_w = min(h, max(1, round(out_h / s))), min(w, max(1, round(out_w / s)))
        y, x = rng.randint(0, h - reg_h), rng.randint(0, w - reg_w)
        image, mask_r = resize_pair(
            image[:, y : y + reg_h, x : x + reg_w], mask[y : y + reg_h, x : x + reg_w], (out_h, out_w)
        )
        assert mask_r is not None
        if rng.random() < self.hflip_prob:
            image, mask_r = image.flip(-1), mask_r.flip(-1)
        out[:, :out_h, :out_w].copy_(image)
        out_mask[:out_h, :out_w].copy_(mask_r)
        if (out_h, out_w) != (crop, crop):  # pad bottom/right: mask 255; the image's padding becomes 0 (the
            out[:, out_h:].zero_()  # mean colour) on the device, from the content size; zeroed here so
            out[:, :out_h, out_w:].zero_()  # that a batch never carries stale bytes
            out_mask[out_h:].fill_(IGNORE_INDEX)
            out_mask[:out_h, out_w:].fill_(IGNORE_INDEX)
        if self.jitter <= 0:
            return self.plain, (out_h, out_w)
        factors = tuple(rng.uniform(1.0 - self.jitter, 1.0 + self.jitter) for _ in range(3))
        # the contrast's mean grey level, from every 4th row and column: plenty for an augmentation
        sub_mean = image[:, ::4, ::4].float().mean((1, 2)).tolist()
        a, bias = colour_matrix(sub_mean, factors, self.mean, self.std)  # type: ignore[arg-type]
        return torch.cat((a, bias[None])), (out_h, out_w)


class EvalTransform:
    """(uint8 image, uint8 mask or None) -> (uint8 image, mask), resized (shorter side) with data.eval_resize;
    normalisation happens on the device (`device.to_model_input` with `device.plain_colour`)."""

    def __init__(self, cfg: DataConfig):
        self.resize = cfg.eval_resize

    def __call__(self, image: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.resize:
            h, w = image.shape[-2:]
            r = self.resize / min(h, w)
            image, mask = resize_pair(image, mask, (max(1, round(h * r)), max(1, round(w * r))))
        return image, mask


def train_transform(cfg: DataConfig) -> TrainTransform:
    return TrainTransform(cfg)


def eval_transform(cfg: DataConfig) -> EvalTransform:
    return EvalTransform(cfg)


def padded_size(h: int, w: int, size_divisor: int, min_size: int) -> tuple[int, int]:
    """Smallest (H, W) >= (h, w) and >= min_size that are multiples of size_divisor."""

    def up(v: int) -> int:
        v = max(v, min_size)
        return -(-v // size_divisor) * size_divisor

    return up(h), up(w)


def pad_batch(
    images: list[Tensor], masks: list[Tensor] | None, size_divisor: int, min_size: int
) -> tuple[Tensor, Tensor | None]:
    """Stack variable-size images [3, h, w] (uint8 or float) padded bottom/right with 0 to a common size that
    is a multiple of size_divisor and >= min_size; masks padded with 255, returned as uint8."""
    h, w = padded_size(
        max(i.shape[-2] for i in images), max(i.shape[-1] for i in images), size_divisor, min_size
    )
    out = images[0].new_zeros((len(images), 3, h, w))
    for i, im in enumerate(images):
        out[i, :, : im.shape[-2], : im.shape[-1]] = im
    if masks is None:
        return out, None
    mout = torch.full((len(masks), h, w), IGNORE_INDEX, dtype=torch.uint8)
    for i, m in enumerate(masks):
        mout[i, : m.shape[-2], : m.shape[-1]] = m
    return out, mout


def denormalize(images: Tensor, cfg: DataConfig) -> Tensor:
    """Normalised float images [..., 3, H, W] -> float 0..1 (what TensorBoard's add_images expects)."""
    mean = torch.tensor(cfg.mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images * std + mean).clamp(0.0, 1.0)
