"""Augmentation and the host half of the input contract: what loader workers do to a decoded image and its
label map, how padding is filled, and in which order the random draws happen. The one place to read before
changing or adding an augmentation.

Pipeline. A worker decodes a sample (dist_seg.data.format.reader) to uint8 image [3, H, W] and uint8 label
map [H, W] (IGNORE_INDEX = 255 = no label), then:

    training   TrainTransform.apply: scale + crop (one resize of the crop's source region), flip, bottom/right
               padding, written as uint8 into the sample's slot of a preallocated batch; the colour jitter is
               drawn here too, but only as the sample's colour rows (colour.jitter_colour): nothing touches
               the pixels' colour on the host
    evaluation EvalTransform (shorter side to data.eval_resize, when set), then pad_batch to a size the model
               accepts (padded_size, the one rounding of input sizes in the package)

and dist_seg.data.loading.colour.to_model_input turns the uint8 batch into normalised float32 on the device
(colour rows, clipping, padding zeroed). Geometry runs on uint8, where torch's bilinear antialias kernel is
about three times faster than on float. Label maps are always resized with `nearest-exact`, which samples the
pixel whose centre is nearest, the same half-pixel convention as the image's bilinear kernel, so labels stay
on the pixels they describe. Scale and crop are one step: the crop window is mapped back to the original image
and only that region is resized, so a 2x upscale of a large image costs one crop's worth of work.

Fill and padding. On the host, padding is always at the bottom and right: a sample's content is the top-left
(h, w) rectangle of its slot, and that size travels with the batch (TrainBatch.sizes, EvalBatch.sizes). Image
padding is uint8 0, label padding IGNORE_INDEX (no loss, no metric). The colour step on the device knows a
sample's geometry only through those host-side sizes: it applies the colour rows to the content rectangle and
writes 0.0 beyond it, the mean colour after normalisation, so the uint8 0 of the padding never reaches the
model as (0 - mean) / std. Anything inside the rectangle is content to it, jittered and normalised like the
rest, with one exception: with data.augment, a batch also carries each sample's coverage plane
(TrainBatch.coverage, uint8 1 where a source pixel landed), and pixels with 0 there, where a user transform
created empty area inside the image (rotation corners, affine, perspective or elastic borders), become 0.0 on
the device as the padding does. On the host those pixels hold label IGNORE_INDEX, whatever fill the
transform used, and the image keeps that fill (dist_seg.data.loading.augment); the contrast's grey level
leaves them out.

Random draws. Each training sample is augmented with its own random.Random, seeded with
plan.derive_seed(plan.TAG_AUG, train.seed, epoch, sample id), where the sample id is its global index (shards
in sorted path order laid end to end). The draws therefore do not depend on rank, worker, batch position,
world size or resume: a resumed or re-planned epoch gives every sample the augmentation it would have had,
and a sample that stands in for a skipped one (data.on_error=skip) repeats its own augmentation. TrainTransform
draws, in this order:

    1. scale      rng.uniform(data.scale_min, data.scale_max)
    2. crop top   rng.randint(0, H - source height)
    3. crop left  rng.randint(0, W - source width)
    4. flip       rng.random() < data.hflip_prob            (drawn even when hflip_prob is 0)
    5. jitter     brightness, contrast, saturation factors, each rng.uniform(1 - j, 1 + j), j = data.color_jitter
                  (drawn only when j > 0; the contrast's grey level is not drawn: it is the mean of every 4th
                  row and column of the flipped content)

A change that inserts, removes or reorders a draw changes every later draw, hence every run's batches; a new
augmentation either appends its draws after the last one (runs that do not use it stay bitwise the same) or,
better, takes its own stream: a new TAG_* in plan.py and its own derive_seed(TAG, seed, epoch, sample id).

Adding an augmentation. A built-in one goes into TrainTransform.apply, on the uint8 crop before the padding
is written, moving image and label map together (labels nearest-exact, never interpolated), with its draws
placed as above and its config keys in DataConfig; a colour one adds to the colour rows if it is linear in
the pixel (a 3x3 matrix and a bias), and otherwise needs the float pixels, i.e. a step in colour.py.
User-supplied pipelines (`data.augment`: torchvision.transforms.v2 or albumentations, loaded, seeded and
checked by dist_seg.data.loading.augment) plug in between decoding and TrainTransform.apply, in the loader
worker's loop (train_loader._TrainStream.__iter__, where each decoded sample meets its seeds), on the full
sample's uint8 image [3, H, W] and label map [H, W], before the built-in scale and crop: in the workers they
cost no device time and see whole images. They draw from torch's, numpy's and python's global generators (and
albumentations from its own), which augment.py seeds around each call from their own stream
(augment.TAG_USER_AUG with the sample id), so they are reproducible and resume-exact like the built-in draws
and leave those unchanged. What they hand back is checked on every sample: uint8 again, the label map's values
kept (its classes or IGNORE_INDEX), one size for image, label map and coverage.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import Tensor

from dist_seg.config.schema import DataConfig
from dist_seg.data import IGNORE_INDEX
from dist_seg.data.loading.colour import colour_range, jitter_colour, plain_colour, to_model_input


def resize_pair(image: Tensor, mask: Tensor | None, size: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
    """Resize uint8 image [3, H, W] (bilinear, antialiased) and mask [H, W] (nearest) to size (h, w)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, mask
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return image, resize_label(mask, size) if mask is not None else None


def resize_label(plane: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a label map (or any [H, W] plane of codes) to size (h, w), nearest-exact: values are kept."""
    if tuple(plane.shape) == tuple(size):
        return plane
    return F.interpolate(plane[None, None], size=size, mode="nearest-exact")[0, 0]


class TrainTransform:
    """The training augmentation (see the module docstring for the contract).

    `apply` is what loader workers run: the geometry only, written as uint8 straight into slots of a
    preallocated batch (which saves the padding and stacking copies), returning the sample's colour rows and
    content size for the colour step on the device. The resize writes planes, like the batch slots.
    `__call__` runs both halves on the CPU (tests, tools): (uint8 image [3, H, W], uint8 mask [H, W], rng)
    -> (float32 [3, crop, crop] normalised, uint8 [crop, crop]).
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
        self,
        image: Tensor,
        mask: Tensor,
        rng: random.Random,
        out: Tensor,
        out_mask: Tensor,
        coverage: Tensor | None = None,
        out_coverage: Tensor | None = None,
    ) -> tuple[Tensor, tuple[int, int]]:
        """Augment one sample's geometry into out (uint8 [3, crop, crop], planar) and out_mask
        (uint8 [crop, crop]); return its colour rows [COLOUR_ROWS, 3] and content size (h, w) for
        colour.to_model_input. The random draws, in order: scale, crop top, crop left, flip, jitter factors.
        With data.augment, out_coverage (uint8 [crop, crop]) receives the coverage plane of the user's
        pipeline (augment.UserAugment; None: all covered) moved like the label map, 0 in the padding."""
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
        if coverage is not None:  # moved exactly as the label map (nearest-exact, same region and size)
            coverage = resize_label(coverage[y : y + reg_h, x : x + reg_w], (out_h, out_w))
        if rng.random() < self.hflip_prob:
            image, mask_r = image.flip(-1), mask_r.flip(-1)
            coverage = coverage.flip(-1) if coverage is not None else None
        out[:, :out_h, :out_w].copy_(image)
        out_mask[:out_h, :out_w].copy_(mask_r)
        if out_coverage is not None:
            if coverage is None:
                out_coverage[:out_h, :out_w].fill_(1)
            else:
                out_coverage[:out_h, :out_w].copy_(coverage)
        if (out_h, out_w) != (crop, crop):  # pad bottom/right: mask 255; the image's padding becomes 0 (the
            out[:, out_h:].zero_()  # mean colour) on the device, from the content size; zeroed here so
            out[:, :out_h, out_w:].zero_()  # that a batch never carries stale bytes
            out_mask[out_h:].fill_(IGNORE_INDEX)
            out_mask[:out_h, out_w:].fill_(IGNORE_INDEX)
            if out_coverage is not None:
                out_coverage[out_h:].zero_()
                out_coverage[:out_h, out_w:].zero_()
        if self.jitter <= 0:
            return self.plain, (out_h, out_w)
        factors = tuple(rng.uniform(1.0 - self.jitter, 1.0 + self.jitter) for _ in range(3))
        # the contrast's mean grey level, from every 4th row and column (plenty for an augmentation), of the
        # covered pixels only: uncovered ones are not content
        sub = image[:, ::4, ::4].float()
        if coverage is None:
            sub_mean = sub.mean((1, 2)).tolist()
        else:
            weight = coverage[::4, ::4].float()
            n = float(weight.sum())
            sub_mean = ((sub * weight).sum((1, 2)) / n).tolist() if n > 0 else sub.mean((1, 2)).tolist()
        return jitter_colour(sub_mean, factors, self.mean, self.std), (out_h, out_w)  # type: ignore[arg-type]


class EvalTransform:
    """(uint8 image, uint8 mask or None) -> (uint8 image, mask), resized (shorter side) with data.eval_resize;
    normalisation happens on the device (colour.to_model_input with colour.plain_colour)."""

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
    """Smallest (H, W) >= (h, w) and >= min_size that are multiples of size_divisor: the one rounding of
    input sizes in the package (eval batches, predict, export, `dist-seg info`)."""

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
