"""Streaming input pipeline: tar shards -> augmented batches for DDP, equal steps on every rank, exact eval.

Training (`build_train_loader`). Every epoch all ranks shuffle the shard list with the same seed (seed, epoch)
and lay the shards end to end as one sequence of N samples (N from the manifests). Then

    steps_per_epoch = N // (batch_size * world_size)        # drop_last over the GLOBAL batch
    rank r       -> samples [r*S*B, (r+1)*S*B) of the sequence   (S = steps_per_epoch, B = batch_size)
    its worker w -> a contiguous run of whole batches inside that range (S split as evenly as possible)

so every rank yields exactly S full batches, whatever the shard sizes, and no sample is used twice in an
epoch. Each epoch reads that sequence cyclically from an offset drawn from (seed, epoch), so the
N - S*B*W samples that sit an epoch out change every epoch, even with a single shard.
Ranges cut shards at sample level, so any shard count works: with fewer shards than ranks x workers, readers
share shards (rank 0 warns). A reader walks the tar headers and seeks over samples outside its range.
Inside a worker, raw samples pass a shuffle buffer (data.shuffle_buffer) before decoding and augmentation.
Seeds: the shard order comes from (seed, epoch), the shuffle buffer and augmentation from (seed, rank, worker,
epoch), so a run is reproducible for a given world size, batch size and data.num_workers.

Errors (data.on_error). `raise`: ShardError naming the shard and the sample key. `skip`: the sample is dropped
and counted, one warning per shard, and a ShardError once a rank has skipped more than data.max_errors. A
truncated shard loses every sample of the reader's range past the damage. To keep the step count, a worker
that lost samples re-decodes (with fresh augmentation) one of its last good samples in their place: the only
case where an image can appear twice in an epoch. Counts travel with the batches (`TrainBatch.skipped`, per
worker and epoch) and `TrainLoader.skipped` sums them for the rank.

Evaluation (`build_eval_loader`): shards in sorted order, rank r takes samples [r*N//W, (r+1)*N//W) and its
workers split that range, so each sample is seen exactly once across ranks for any shard count and world size.

Reading and decoding (only jpg/png/json members, never unpickling) live in `dist_seg.data.shards`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_seg.config import DataConfig
from dist_seg.data.plan import (
    TAG_AUG,
    derive_seed,
    epoch_offset,
    epoch_order,
    eval_pieces,
    train_pieces,
)
from dist_seg.data.shards import (
    ErrorPolicy,
    Piece,
    RawSample,
    Sample,
    ShardError,
    ShardSet,
    decode_sample,
    read_pieces,
    resolve_shards,
    shuffle_buffer,
)
from dist_seg.data.transforms import EvalTransform, TrainTransform, pad_batch

__all__ = [
    "ShardError",
    "resolve_shards",
    "build_train_loader",
    "build_eval_loader",
    "TrainLoader",
    "EvalLoader",
    "TrainBatch",
    "EvalBatch",
]

log = logging.getLogger(__name__)

_REFILL_RING = 16  # recent good samples a worker may re-use in place of skipped ones


def _worker() -> tuple[int, int]:
    wi = get_worker_info()
    return (wi.id, wi.num_workers) if wi is not None else (0, 1)


def _dataloader(cfg: DataConfig, dataset: IterableDataset) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,  # workers batch themselves: each owns whole batches
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        persistent_workers=cfg.persistent_workers and cfg.num_workers > 0,
        prefetch_factor=2 if cfg.num_workers > 0 else None,
        # workers seed themselves from (seed, rank, worker, epoch); a private generator keeps the loader's
        # base-seed draw out of the global RNG, so a resumed run's dropout masks match an uninterrupted run's
        generator=torch.Generator().manual_seed(0),
    )


# ---------------------------------------------------------------------------------------------- training
@dataclass
class TrainBatch:
    images: Tensor  # float32 [B, 3, crop, crop], normalised
    masks: Tensor  # int64 [B, crop, crop], 255 = ignore
    keys: list[str]
    skipped: int  # samples this worker has skipped so far in this epoch
    worker: int

    def pin_memory(self) -> TrainBatch:  # DataLoader(pin_memory=True) calls this
        return dataclasses.replace(self, images=self.images.pin_memory(), masks=self.masks.pin_memory())


class _TrainStream(IterableDataset):
    def __init__(self, cfg: DataConfig, shard_set: ShardSet, rank: int, seed: int, steps: int):
        super().__init__()
        self.cfg, self.shard_set, self.rank, self.seed, self.steps = cfg, shard_set, rank, seed, steps
        self.transform = TrainTransform(cfg)
        # persistent workers keep their own copy of this object: epoch and prior skips reach them through
        # shared memory, set by TrainLoader before each pass
        self.epoch = multiprocessing.RawValue("q", 0)
        self.skipped_before = multiprocessing.RawValue("q", 0)

    def __iter__(self) -> Iterator[TrainBatch]:
        worker, num_workers = _worker()
        epoch, b, crop = self.epoch.value, self.cfg.batch_size, self.cfg.crop_size
        order = epoch_order(self.shard_set.shard_samples, self.seed, epoch, self.cfg.shuffle_shards)
        offset = epoch_offset(self.shard_set.total_samples, self.seed, epoch, self.cfg.shuffle_shards)
        pieces, n_batches = train_pieces(order, self.steps, b, self.rank, num_workers, worker, offset)
        rng = random.Random(derive_seed(TAG_AUG, self.seed, self.rank, worker, epoch))
        errors = ErrorPolicy(self.cfg.on_error, self.cfg.max_errors, self.skipped_before.value)
        samples = self._samples(pieces, n_batches * b, rng, errors)
        for _ in range(n_batches):
            images, masks = (
                _batch_tensor((b, 3, crop, crop), torch.float32),
                _batch_tensor((b, crop, crop), torch.int64),
            )
            keys = []
            for i in range(b):
                s = next(samples)
                assert s.mask is not None
                self.transform.apply(s.image, s.mask, rng, images[i], masks[i])
                keys.append(s.key)
            yield TrainBatch(images, masks, keys, errors.count, worker)

    def _samples(
        self, pieces: list[Piece], quota: int, rng: random.Random, errors: ErrorPolicy
    ) -> Iterator[Sample]:
        ring: deque[RawSample] = deque(maxlen=_REFILL_RING)
        produced = 0
        for raw in shuffle_buffer(read_pieces(pieces, errors), self.cfg.shuffle_buffer, rng):
            sample = self._decode(raw, errors)
            if sample is not None:
                ring.append(raw)
                produced += 1
                yield sample
        while produced < quota:  # samples were skipped: re-use recent good ones so the step count holds
            if not ring:
                raise ShardError(
                    f"rank {self.rank}: every sample of this worker's range was skipped; nothing to train on",
                    pieces[0].shard if pieces else None,
                )
            sample = self._decode(rng.choice(ring), errors)
            assert sample is not None, "a sample that decoded once decodes again"
            produced += 1
            yield sample

    def _decode(self, raw: RawSample, errors: ErrorPolicy) -> Sample | None:
        try:
            return decode_sample(raw, True, self.shard_set.num_classes)
        except ShardError as e:
            errors.handle(e)
            return None


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised batch tensor; in a DataLoader worker it lives in shared memory from the start (as in
    torch's default_collate), so handing the batch to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class TrainLoader:
    """Yields exactly `steps_per_epoch` TrainBatch per epoch on every rank; `set_epoch` before each pass.

    steps_per_epoch = total_samples // (batch_size * world_size). `skipped` counts the samples this rank has
    dropped (on_error=skip) over all passes so far.
    """

    def __init__(self, cfg: DataConfig, dataset: _TrainStream, shard_set: ShardSet, steps: int):
        self.cfg, self.dataset, self.shard_set = cfg, dataset, shard_set
        self.steps_per_epoch = steps
        self.epoch = 0
        self._skipped_before = 0
        self._pass_skipped: dict[int, int] = {}
        self.loader = _dataloader(cfg, dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def skipped(self) -> int:
        return self._skipped_before + sum(self._pass_skipped.values())

    def __iter__(self) -> Iterator[TrainBatch]:
        self._skipped_before, self._pass_skipped = self.skipped, {}
        self.dataset.epoch.value = self.epoch  # before iter(): workers read it when the pass starts
        self.dataset.skipped_before.value = self._skipped_before
        n = 0
        for batch in self.loader:
            self._pass_skipped[batch.worker] = batch.skipped
            if self.skipped > self.cfg.max_errors:
                raise ShardError(
                    f"{self.skipped} samples skipped on this rank, more than data.max_errors={self.cfg.max_errors}"
                )
            n += 1
            yield batch
        if n != self.steps_per_epoch:
            raise RuntimeError(
                f"input pipeline produced {n} batches instead of {self.steps_per_epoch} (a bug)"
            )


def build_train_loader(cfg: DataConfig, rank: int, world_size: int, seed: int, epoch: int = 0) -> TrainLoader:
    if not cfg.train_shards:
        raise ValueError("config key data.train_shards is not set")
    shard_set = resolve_shards(cfg.train_shards)
    if not shard_set.has_labels:
        raise ValueError(
            f"data.train_shards={cfg.train_shards}: these shards have no label maps (a test split?)"
        )
    global_batch = cfg.batch_size * world_size
    steps = shard_set.total_samples // global_batch
    if steps < 1:
        raise ValueError(
            f"data.train_shards={cfg.train_shards} holds {shard_set.total_samples} samples, fewer than one global "
            f"batch (data.batch_size={cfg.batch_size} x {world_size} ranks = {global_batch})"
        )
    readers = world_size * max(1, cfg.num_workers)
    if rank == 0 and len(shard_set.paths) < readers:
        log.warning(
            "%d shard(s) for %d ranks x %d workers: readers share shards (sample-level split; each scans the "
            "headers of a shared shard). Convert with --min-shards %d for one shard per reader.",
            len(shard_set.paths),
            world_size,
            max(1, cfg.num_workers),
            readers,
        )
    loader = TrainLoader(cfg, _TrainStream(cfg, shard_set, rank, seed, steps), shard_set, steps)
    loader.set_epoch(epoch)
    return loader


# ---------------------------------------------------------------------------------------------- evaluation
@dataclass
class EvalBatch:
    images: Tensor  # float32 [B, 3, H, W], padded bottom/right with 0 (the mean colour)
    masks: Tensor | None  # int64 [B, H, W], padding 255; None for shards without label maps
    keys: list[str]
    sizes: list[tuple[int, int]]  # (h, w) of each image inside the padded batch: crop predictions to it
    orig_sizes: list[tuple[int, int]]  # (h, w) of the stored image (differs from sizes with eval_resize)
    meta: list[dict[str, Any] | None]  # each sample's KEY.json (file_name, image_id, ...)
    skipped: int
    worker: int

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

    def __iter__(self) -> Iterator[EvalBatch]:
        worker, num_workers = _worker()
        order = sorted(self.shard_set.shard_samples.items())
        pieces = eval_pieces(order, self.rank, self.world_size, num_workers, worker)
        errors = ErrorPolicy(self.cfg.on_error, self.cfg.max_errors)
        batch: list[tuple[Sample, Tensor, Tensor | None]] = []
        for raw in read_pieces(pieces, errors):
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
        self.loader = _dataloader(cfg, dataset)

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
    shard_set = resolve_shards(spec)
    return EvalLoader(cfg, _EvalStream(cfg, shard_set, rank, world_size, size_divisor, min_size), shard_set)
