"""Augmentation pipelines to use as `data.augment` or to copy: the ones the trash-competition teams trained
with (rotations, elastic and grid distortion, CLAHE, coarse dropout), in albumentations and in
torchvision.transforms.v2.

    data.augment=dist_seg.data.loading.augment_recipes:albumentations_common  # the albumentations extra
    data.augment=dist_seg.data.loading.augment_recipes:torchvision_common
    data.augment=dist_seg.data.loading.augment_recipes:torchvision_rotate     # one rotation

A copy of your own: a module on PYTHONPATH (the working directory is, under `python -m` and torchrun) with
a function that takes no arguments and returns the pipeline, named as `your_module:your_function`.

What to leave out, because the loader already does it faster after your pipeline: the random resized crop
(data.scale_min, data.scale_max, data.crop_size: one resize of the crop's region only), the horizontal flip
(data.hflip_prob), brightness/contrast/saturation jitter (data.color_jitter, a 3x3 matrix on the device) and
normalisation (data.mean, data.std; the pipeline hands back uint8, so no ToDtype, Normalize or ToTensorV2).
Fills do not matter: pixels a geometric transform leaves empty are found through the coverage plane and
become IGNORE_INDEX in the label map and 0.0 in the model input (dist_seg.data.loading.augment). Each factory
imports its library when called, so importing this module needs neither.
"""

from __future__ import annotations

from typing import Any

ROTATE_DEGREES = 30.0  # the competition pipelines' rotation range, +-


def albumentations_common() -> Any:
    """The competition's albumentations pipeline: a rotation, an elastic or grid distortion, CLAHE, coarse
    dropout. Empty corners and borders (BORDER_CONSTANT) are ignored, whatever the fill."""
    import albumentations as A
    import cv2

    return A.Compose(
        [
            A.Rotate(limit=ROTATE_DEGREES, border_mode=cv2.BORDER_CONSTANT, p=0.5),
            A.OneOf(
                [
                    A.ElasticTransform(alpha=30.0, sigma=6.0, border_mode=cv2.BORDER_CONSTANT),
                    A.GridDistortion(num_steps=5, distort_limit=0.3, border_mode=cv2.BORDER_CONSTANT),
                ],
                p=0.3,
            ),
            A.CLAHE(clip_limit=2.0, tile_grid_size=(8, 8), p=0.3),
            # holes in the image only (fill_mask None): the labels under them stay, as in the competition
            A.CoarseDropout(
                num_holes_range=(1, 4), hole_height_range=(0.05, 0.15), hole_width_range=(0.05, 0.15), p=0.3
            ),
        ]
    )


def torchvision_common() -> Any:
    """The same pipeline in torchvision.transforms.v2, as far as v2 has it: a rotation, an elastic distortion
    and histogram equalisation for CLAHE (v2 has no CLAHE and no grid distortion). Its RandomErasing, the
    dropout, erases images only and warns on every label map it passes through: left out."""
    from torchvision.transforms import InterpolationMode, v2

    bilinear = InterpolationMode.BILINEAR  # the image's; tv_tensors.Mask always moves with nearest
    return v2.Compose(
        [
            v2.RandomApply([v2.RandomRotation(ROTATE_DEGREES, interpolation=bilinear)], p=0.5),
            v2.RandomApply([v2.ElasticTransform(alpha=30.0, sigma=6.0, interpolation=bilinear)], p=0.3),
            v2.RandomEqualize(p=0.3),
        ]
    )


def torchvision_rotate() -> Any:
    """A random rotation of up to 30 degrees, the one line torchvision's segmentation presets take."""
    from torchvision.transforms import InterpolationMode, v2

    return v2.Compose([v2.RandomRotation(ROTATE_DEGREES, interpolation=InterpolationMode.BILINEAR)])
