"""Median-frequency class balancing (Eigen & Fergus, ICCV 2015), without torch.

Kept free of torch so the EDA module can import it cheaply; `dist_seg.train.losses` re-exports it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def median_frequency_weights(pixels: Sequence[int], image_pixels: Sequence[int]) -> list[float]:
    """Per-class loss weights `median(freq) / freq_c`.

    `freq_c = pixels[c] / image_pixels[c]`, where `pixels[c]` counts the pixels labelled c and
    `image_pixels[c]` counts all labelled (non-ignore) pixels of the images in which c appears. The median is
    taken over the classes that occur (freq > 0). A class that never occurs gets weight 0.0: it cannot be
    learned from this data, and a zero weight keeps a stray prediction of it from dominating the loss.
    """
    if len(pixels) != len(image_pixels):
        raise ValueError(
            f"median_frequency_weights: {len(pixels)} pixel counts but {len(image_pixels)} image-pixel counts"
        )
    freqs: list[float] = []
    for c, (p, ip) in enumerate(zip(pixels, image_pixels, strict=True)):
        if p < 0 or ip < 0:
            raise ValueError(f"median_frequency_weights: class {c} has a negative count ({p}, {ip})")
        if p > ip:
            raise ValueError(
                f"median_frequency_weights: class {c} has {p} pixels but its images hold only {ip} labelled pixels"
            )
        freqs.append(p / ip if p > 0 else 0.0)
    seen = [f for f in freqs if f > 0]
    if not seen:
        raise ValueError("median_frequency_weights: no class has any labelled pixel")
    median = statistics.median(seen)
    return [median / f if f > 0 else 0.0 for f in freqs]
