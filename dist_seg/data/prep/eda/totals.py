"""What `dist-seg eda` accumulates: one image's figures (ImageStats, sent back from worker processes) and the
running sums over all images (Totals), which the summary (dist_seg.data.prep.eda.report) and the plots
(dist_seg.data.prep.eda.plots) both read."""

from __future__ import annotations

import heapq
from array import array
from collections import Counter
from dataclasses import dataclass

import numpy as np

from dist_seg.data.prep.coco import OVERLAP_POLICIES, ImageEntry

GALLERY_SIZE = 6  # images in the overlap gallery: the ones with the most multi-instance pixels


@dataclass
class ImageStats:
    """What one image contributes; small enough to send back from a worker process."""

    label_pixels: np.ndarray  # int64 [256]: pixels per label value under the chosen policy
    classes: list[int]  # class index per instance
    areas: list[int]  # decoded mask area per instance
    annotated: int  # pixels covered by >= 1 instance
    multi_instance: int  # pixels covered by >= 2 instances
    multi_class: int  # pixels covered by instances of >= 2 different classes
    pairs: dict[tuple[int, int], int]  # (class on top, class underneath) -> pixels, see MATRIX_DEFINITION
    changed: dict[str, int]  # policy -> pixels whose label differs from the 'area' label


class Totals:
    """Running sums over the images; `gallery` holds (overlap pixels, -position) of the top-k images."""

    def __init__(self, num_classes: int, gallery_size: int = GALLERY_SIZE):
        n = num_classes
        self.label_pixels = np.zeros(256, np.int64)
        self.images_with_pixels = np.zeros(n, np.int64)
        self.image_pixels = np.zeros(n, np.int64)
        self.instances = np.zeros(n, np.int64)
        self.images = np.zeros(n, np.int64)
        self.areas = [array("q") for _ in range(n)]
        self.matrix = np.zeros((n, n), np.int64)
        self.changed: Counter[str] = Counter(dict.fromkeys(OVERLAP_POLICIES, 0))
        self.per_image: Counter[int] = Counter()
        self.sizes: Counter[tuple[int, int]] = Counter()
        self.analysed = self.total_pixels = self.annotated = self.crowd = 0
        self.multi_instance = self.multi_class = self.images_with_overlap = self.images_with_class_overlap = 0
        self.gallery: list[tuple[int, int]] = []
        self._gallery_size = gallery_size

    def add(self, position: int, entry: ImageEntry, s: ImageStats) -> None:
        n = len(self.images)
        self.analysed += 1
        self.total_pixels += entry.width * entry.height
        self.sizes[(entry.width, entry.height)] += 1
        self.per_image[len(s.classes)] += 1
        self.crowd += sum(bool(a["crowd"]) for a in entry.anns)
        self.label_pixels += s.label_pixels
        present = s.label_pixels[:n] > 0
        self.images_with_pixels += present
        self.image_pixels += present * int(s.label_pixels[:n].sum())
        for c in set(s.classes):
            self.images[c] += 1
        for c, area in zip(s.classes, s.areas, strict=True):
            self.instances[c] += 1
            self.areas[c].append(area)
        for (a, b), v in s.pairs.items():
            self.matrix[a, b] += v
        self.changed.update(s.changed)
        self.annotated += s.annotated
        self.multi_instance += s.multi_instance
        self.multi_class += s.multi_class
        self.images_with_overlap += s.multi_instance > 0
        self.images_with_class_overlap += s.multi_class > 0
        if s.multi_instance > 0:
            item = (s.multi_instance, -position)
            if len(self.gallery) < self._gallery_size:
                heapq.heappush(self.gallery, item)
            elif item > self.gallery[0]:
                heapq.heapreplace(self.gallery, item)

    def all_areas(self) -> np.ndarray:
        return np.concatenate([np.frombuffer(a, np.int64) for a in self.areas] or [np.zeros(0, np.int64)])

    def gallery_items(self) -> list[tuple[int, int]]:
        """(position, overlap pixels) of the gallery images, most overlap first (ties: earlier image first)."""
        return [(-neg, px) for px, neg in sorted(self.gallery, reverse=True)]
