"""Augmentation and the host half of the input contract (dist_seg.data.loading.transforms): alignment, label
values, padding, determinism, the documented order of the random draws, eval resize and batch padding."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from dist_seg.config.schema import DataConfig
from dist_seg.data import IGNORE_INDEX
from dist_seg.data.loading.colour import denormalize, jitter_colour
from dist_seg.data.loading.transforms import (
    TrainTransform,
    eval_transform,
    pad_batch,
    padded_size,
    train_transform,
)

# class -> RGB; every class has a distinct dominant channel (or none, for grey), which brightness, contrast
# and saturation jitter all preserve, so a pixel's class can be read back from its colour after any transform
COLOURS = {0: (128, 128, 128), 1: (210, 40, 40), 2: (40, 210, 40), 3: (40, 40, 210)}


def block_sample(h: int, w: int, block: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 image [3, h, w] of random coloured blocks and the label map derived from it."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.randint(0, len(COLOURS), (-(-h // block), -(-w // block)), generator=g)
    mask = grid.repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w].to(torch.uint8)
    lut = torch.tensor([COLOURS[c] for c in sorted(COLOURS)], dtype=torch.uint8)
    return lut[mask.long()].permute(2, 0, 1).contiguous(), mask


def classes_from_pixels(image01: torch.Tensor) -> torch.Tensor:
    """Read each pixel's class back from its colour (0..1 float [3, H, W])."""
    spread = image01.max(0).values - image01.min(0).values
    return torch.where(spread < 0.1, 0, image01.argmax(0) + 1)


def interior(mask: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood has one label (resampling blends colours across label borders)."""
    m = mask.float()[None, None]
    hi = F.max_pool2d(m, 3, 1, 1)
    lo = -F.max_pool2d(-m, 3, 1, 1)
    return ((hi == lo) & (m != IGNORE_INDEX))[0, 0]


def cfg_for(**kw) -> DataConfig:
    base = dict(crop_size=96, scale_min=0.5, scale_max=2.0, hflip_prob=0.5, color_jitter=0.3)
    base.update(kw)
    return DataConfig(**base)


@pytest.mark.parametrize("jitter", [0.0, 0.3])
def test_train_transform_keeps_image_and_mask_aligned(jitter: float) -> None:
    cfg = cfg_for(color_jitter=jitter)
    t = train_transform(cfg)
    checked = padded = 0
    for seed in range(40):
        image, mask = block_sample(120, 160, 20, seed)
        rng = random.Random(seed)
        out, out_mask = t(image, mask, rng)
        assert out.shape == (3, 96, 96) and out.dtype == torch.float32
        assert out_mask.shape == (96, 96) and out_mask.dtype == torch.uint8
        inside = interior(out_mask)
        got = classes_from_pixels(denormalize(out, cfg))
        assert torch.equal(got[inside], out_mask[inside].long()), f"seed {seed}: image and mask disagree"
        pad = out_mask == IGNORE_INDEX
        assert torch.all(out[:, pad] == 0), "padding must be the mean colour (0 after normalisation)"
        checked += int(inside.sum())
        padded += int(pad.any())
    assert checked > 40 * 96 * 96 // 4
    assert padded > 0, "some draws must scale the image below the crop size"


def test_flip_and_scale_really_happen_and_stay_aligned() -> None:
    # an asymmetric image: left half class 1, right half class 2; a flip swaps them in image AND mask
    cfg = cfg_for(scale_min=1.0, scale_max=1.0, hflip_prob=1.0, color_jitter=0.0, crop_size=64)
    image = torch.empty(3, 64, 64, dtype=torch.uint8)
    mask = torch.empty(64, 64, dtype=torch.uint8)
    image[:, :, :32] = torch.tensor(COLOURS[1], dtype=torch.uint8).view(3, 1, 1)
    image[:, :, 32:] = torch.tensor(COLOURS[2], dtype=torch.uint8).view(3, 1, 1)
    mask[:, :32], mask[:, 32:] = 1, 2
    out, out_mask = train_transform(cfg)(image, mask, random.Random(0))
    assert (out_mask[:, :32] == 2).all() and (out_mask[:, 32:] == 1).all()
    assert torch.equal(classes_from_pixels(denormalize(out, cfg)), out_mask.long())

    cfg2 = cfg_for(scale_min=2.0, scale_max=2.0, hflip_prob=0.0, color_jitter=0.0, crop_size=64)
    _, m2 = train_transform(cfg2)(image, mask, random.Random(1))
    # at 2x a 64-wide crop covers 32 source columns, so it sees one or two label runs, never padding
    assert (m2 != IGNORE_INDEX).all()


def test_masks_hold_only_valid_classes_or_ignore() -> None:
    num_classes = 5
    allowed = set(range(num_classes)) | {IGNORE_INDEX}
    t = train_transform(cfg_for(crop_size=80))
    g = torch.Generator().manual_seed(0)
    for seed in range(25):
        h, w = 30 + 7 * seed, 150 - 4 * seed
        values = torch.tensor(sorted(allowed), dtype=torch.uint8)
        mask = values[torch.randint(0, len(values), (h, w), generator=g)]
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        _, out_mask = t(image, mask, random.Random(seed))
        assert set(out_mask.unique().tolist()) <= allowed


def test_train_transform_is_deterministic_given_the_rng() -> None:
    t = train_transform(cfg_for())
    image, mask = block_sample(100, 90, 10, 3)
    a = t(image, mask, random.Random(7))
    b = t(image, mask, random.Random(7))
    c = t(image, mask, random.Random(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_the_random_draws_follow_the_documented_order() -> None:
    """The module docstring's contract: scale, crop top, crop left, flip, then the three jitter factors, all
    from the sample's rng; the content is the top-left rectangle of the slot, padded with uint8 0 and 255."""
    cfg = cfg_for(crop_size=48, scale_min=1.0, scale_max=1.0, hflip_prob=0.5, color_jitter=0.3)
    t = TrainTransform(cfg)
    g = torch.Generator().manual_seed(5)
    flips = 0
    for seed in range(16):
        h, w = (60, 80) if seed % 2 else (40, 30)  # larger than the crop, or smaller: padded
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        mask = torch.randint(0, 4, (h, w), dtype=torch.uint8, generator=g)
        out = torch.full((3, 48, 48), 7, dtype=torch.uint8)  # stale bytes: padding must overwrite them
        out_mask = torch.full((48, 48), 7, dtype=torch.uint8)
        rows, (ch, cw) = t.apply(image, mask, random.Random(seed), out, out_mask)
        replay = random.Random(seed)
        assert replay.uniform(1.0, 1.0) == 1.0
        y, x = replay.randint(0, h - min(h, 48)), replay.randint(0, w - min(w, 48))
        flip = replay.random() < 0.5
        factors = tuple(replay.uniform(0.7, 1.3) for _ in range(3))
        region = image[:, y : y + ch, x : x + cw], mask[y : y + ch, x : x + cw]
        expect = tuple(r.flip(-1) for r in region) if flip else region
        assert (ch, cw) == (min(h, 48), min(w, 48))
        assert torch.equal(out[:, :ch, :cw], expect[0]) and torch.equal(out_mask[:ch, :cw], expect[1])
        assert (out[:, ch:] == 0).all() and (out[:, :, cw:] == 0).all()
        assert (out_mask[ch:] == IGNORE_INDEX).all() and (out_mask[:, cw:] == IGNORE_INDEX).all()
        sub_mean = expect[0][:, ::4, ::4].float().mean((1, 2)).tolist()
        assert torch.equal(rows, jitter_colour(sub_mean, factors, cfg.mean, cfg.std))  # type: ignore[arg-type]
        flips += flip
    assert 0 < flips < 16


def test_eval_transform_resizes_shorter_side_with_nearest_masks() -> None:
    cfg = DataConfig(eval_resize=50)
    image, mask = block_sample(100, 160, 20, 4)
    out, out_mask = eval_transform(cfg)(image, mask)
    assert out.shape == (3, 50, 80) and out.dtype == torch.uint8  # normalised later, on the device
    assert out_mask is not None and out_mask.shape == (50, 80)
    assert set(out_mask.unique().tolist()) <= set(mask.unique().tolist())
    inside = interior(out_mask)
    assert torch.equal(classes_from_pixels(out.float() / 255)[inside], out_mask[inside].long())
    plain, none_mask = eval_transform(DataConfig())(image, None)
    assert torch.equal(plain, image) and none_mask is None


def test_pad_batch_pads_to_divisor_with_ignore_in_masks() -> None:
    images = [torch.ones(3, 30, 50), torch.ones(3, 45, 20)]
    masks = [torch.zeros(30, 50, dtype=torch.uint8), torch.ones(45, 20, dtype=torch.uint8)]
    out, mout = pad_batch(images, masks, size_divisor=32, min_size=96)
    assert out.shape == (2, 3, 96, 96) and mout is not None and mout.shape == (2, 96, 96)
    assert mout.dtype == torch.uint8
    assert (out[0, :, :30, :50] == 1).all() and (out[0, :, 30:] == 0).all() and (out[0, :, :, 50:] == 0).all()
    assert (mout[0, :30, :50] == 0).all() and (mout[0, 30:] == IGNORE_INDEX).all()
    assert (mout[1, :45, :20] == 1).all() and (mout[1, :, 20:] == IGNORE_INDEX).all()
    assert padded_size(100, 33, 32, 1) == (128, 64)
    out2, none = pad_batch(images, None, 8, 1)
    assert out2.shape == (2, 3, 48, 56) and none is None
