"""Evaluation loading: labelled (or image-only) shards -> padded batches, each sample exactly once across ranks.

Shards in sorted order; rank r takes samples [r*N//W, (r+1)*N//W) and its workers split that range, so each
sample is seen exactly once across ranks for any shard count and world size. Images keep their size (or
data.eval_resize), padded bottom/right to the model's input constraints within a batch (transforms.pad_batch:
image 0, label IGNORE_INDEX; the colour step zeroes the padding from EvalBatch.sizes). Reading and decoding
live in dist_seg.data.format.reader, the error policy too.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from dist_seg.config.schema import DataConfig
from dist_seg.data.format.reader import (
    ErrorPolicy,
    Sample,
    ShardReader,
    decode_sample,
    no_range_warning,
)
from dist_seg.data.format.remote import RemoteOptions
from dist_seg.data.format.shards import ShardError, ShardSet, resolve_shards
from dist_seg.data.loading.colour import plain_colour, to_model_input
from dist_seg.data.loading.plan import eval_pieces
from dist_seg.data.loading.transforms import EvalTransform, pad_batch
from dist_seg.data.loading.workers import make_dataloader, worker_slot


@dataclass
class EvalBatch:
    images: Tensor  # uint8 [B, 3, H, W], padded bottom/right; colour.to_model_input(..., sizes) normalises
    masks: Tensor | None  # uint8 [B, H, W], padding 255; None for shards without label maps
    keys: list[str]
    sizes: list[tuple[int, int]]  # (h, w) of each image inside the padded batch: crop predictions to it
    orig_sizes: list[tuple[int, int]]  # (h, w) of the stored image (differs from sizes with eval_resize)
    meta: list[dict[str, Any] | None]  # each sample's KEY.json (file_name, image_id, ...)
    skipped: int
    worker: int
    colour: Tensor | None = None  # [1, COLOUR_ROWS, 3]: data.mean/std normalisation (colour.plain_colour)

    def model_input(self, idx: list[int], height: int, width: int, device: torch.device) -> Tensor:
        """Images `idx`, cut to height x width, on `device`, normalised; 0 beyond each image's size."""
        images = self.images[idx, :, :height, :width].to(device, non_blocking=True)
        assert self.colour is not None
        return to_model_input(images, self.colour, [self.sizes[i] for i in idx])

    def pin_memory(self) -> EvalBatch:
        masks = self.masks.pin_memory() if self.masks is not None else None
        return dataclasses.replace(self, images=self.images.pin_memory(), masks=masks)


class _EvalStream(IterableDataset):
    def __init__(
        self,
        cfg: DataConfig,
        shard_set: ShardSet,
        rank: int,
        world_size: int,
        size_divisor: int,
        min_size: int,
    ):
        super().__init__()
        self.cfg, self.shard_set, self.rank, self.world_size = cfg, shard_set, rank, world_size
        self.size_divisor, self.min_size = size_divisor, min_size
        self.transform = EvalTransform(cfg)
        self.colour = plain_colour(cfg.mean, cfg.std)[None]
        self.reader = ShardReader(shard_set, RemoteOptions.from_config(cfg))

    def __iter__(self) -> Iterator[EvalBatch]:
        worker, num_workers = worker_slot()
        order = sorted(self.shard_set.shard_samples.items())
        pieces = eval_pieces(order, self.rank, self.world_size, num_workers, worker)
        errors = ErrorPolicy(self.cfg.on_error, self.cfg.max_errors)
        batch: list[tuple[Sample, Tensor, Tensor | None]] = []
        for raw in self.reader.read_pieces(pieces, errors):
            try:
                s = decode_sample(raw, self.shard_set.has_labels, self.shard_set.num_classes)
            except ShardError as e:
                errors.handle(e)
                continue
            batch.append((s, *self.transform(s.image, s.mask)))
            if len(batch) == self.cfg.eval_batch_size:
                yield self._collate(batch, errors.count, worker)
                batch = []
        if batch:
            yield self._collate(batch, errors.count, worker)
        self.reader.close()  # the pass is done: no stream is left open to continue

    def _collate(
        self, batch: list[tuple[Sample, Tensor, Tensor | None]], skipped: int, worker: int
    ) -> EvalBatch:
        masks = [m for _, _, m in batch if m is not None] if self.shard_set.has_labels else None
        images, masks_t = pad_batch([im for _, im, _ in batch], masks, self.size_divisor, self.min_size)
        return EvalBatch(
            images,
            masks_t,
            [s.key for s, _, _ in batch],
            [(int(im.shape[-2]), int(im.shape[-1])) for _, im, _ in batch],
            [(int(s.image.shape[-2]), int(s.image.shape[-1])) for s, _, _ in batch],
            [s.meta for s, _, _ in batch],
            skipped,
            worker,
            self.colour,
        )


class EvalLoader:
    """Each sample of the shards exactly once across ranks; ranks may get different numbers of batches."""

    def __init__(self, cfg: DataConfig, dataset: _EvalStream, shard_set: ShardSet):
        self.shard_set = shard_set
        n, r, w = shard_set.total_samples, dataset.rank, dataset.world_size
        self.num_samples = (r + 1) * n // w - r * n // w  # on this rank
        self.max_errors = cfg.max_errors
        self._last_pass: dict[int, int] = {}
        self._skipped: int | None = None
        self.loader = make_dataloader(cfg, dataset)

    @property
    def skipped(self) -> int:
        """Samples skipped (on_error=skip) in the latest pass on this rank."""
        return self._skipped if self._skipped is not None else sum(self._last_pass.values())

    def __iter__(self) -> Iterator[EvalBatch]:
        self._last_pass, self._skipped, seen = {}, None, 0
        for batch in self.loader:
            self._last_pass[batch.worker] = batch.skipped
            if self.skipped > self.max_errors:
                raise ShardError(
                    f"{self.skipped} eval samples skipped, more than data.max_errors={self.max_errors}"
                )
            seen += len(batch.keys)
            yield batch
        self._skipped = self.num_samples - seen  # exact, also for skips after a worker's last batch


def build_eval_loader(
    cfg: DataConfig, rank: int, world_size: int, size_divisor: int, min_size: int, shards: str | None = None
) -> EvalLoader:
    spec = shards if shards is not None else cfg.val_shards
    if not spec:
        raise ValueError("config key data.val_shards is not set")
    shard_set = resolve_shards(spec, RemoteOptions.from_config(cfg))
    if rank == 0 and (note := no_range_warning(shard_set, "evaluation shards")):
        logging.getLogger(__name__).warning(note)
    return EvalLoader(cfg, _EvalStream(cfg, shard_set, rank, world_size, size_divisor, min_size), shard_set)
