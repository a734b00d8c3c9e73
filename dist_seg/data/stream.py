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
Inside a worker, its range is emitted in windows of data.shuffle_buffer consecutive samples, each window in an
order drawn from (seed, epoch, segment, rank, worker, window), and each sample is augmented with an RNG drawn
from (seed, epoch, sample id). So a pass can start at any batch (DataPosition) without reading the batches
before it, which is how a resume continues an epoch; a resume on another geometry continues the epoch in a
new segment over the samples not used yet (dist_seg.data.plan, dist_seg.resume). A run is reproducible for a
given world size, batch size and data.num_workers.

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
    TAG_REFILL,
    Geometry,
    cut_runs,
    derive_seed,
    emission,
    emitted_before,
    eval_pieces,
    id_base,
    piece_ids,
    reader_batches,
    runs_to_ids,
    segment_steps,
    sequence,
    span,
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
)
from dist_seg.data.transforms import EvalTransform, TrainTransform, pad_batch

__all__ = [
    "ShardError",
    "resolve_shards",
    "build_train_loader",
    "build_eval_loader",
    "TrainLoader",
    "DataPosition",
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


@dataclass(frozen=True)
class DataPosition:
    """Where a training pass starts: epoch, segment (0 unless a resume re-planned the epoch), the ids earlier
    segments of the epoch used (as [start, stop) runs), and the batches this segment has already yielded on
    every rank. The training state keeps it, so a resume continues the same data order without re-reading."""

    epoch: int = 0
    segment: int = 0
    consumed: tuple[tuple[int, int], ...] = ()
    start_batch: int = 0


class _TrainStream(IterableDataset):
    def __init__(self, cfg: DataConfig, shard_set: ShardSet, rank: int, seed: int, world_size: int):
        super().__init__()
        self.cfg, self.shard_set, self.rank, self.seed = cfg, shard_set, rank, seed
        self.geometry = Geometry(
            world_size, cfg.batch_size, max(1, cfg.num_workers), max(1, cfg.shuffle_buffer)
        )
        self.transform = TrainTransform(cfg)
        self.base = id_base(shard_set.shard_samples)
        # persistent workers keep their own copy of this object: the position and prior skips reach them
        # through shared memory, set by TrainLoader before each pass (the consumed ids of a re-planned
        # segment travel in the object itself: TrainLoader starts fresh workers when they change)
        self.epoch = multiprocessing.RawValue("q", 0)
        self.segment = multiprocessing.RawValue("q", 0)
        self.start_batch = multiprocessing.RawValue("q", 0)
        self.skipped_before = multiprocessing.RawValue("q", 0)
        self.consumed: set[int] = set()

    def runs(self, epoch: int) -> list[Piece]:
        shuffle = self.cfg.shuffle_shards
        return sequence(self.shard_set.shard_samples, self.seed, epoch, shuffle, self.consumed)

    def steps(self) -> int:
        """Batches per rank of the current segment."""
        left = self.shard_set.total_samples - len(self.consumed)
        return segment_steps(left, self.geometry.batch_size, self.geometry.world_size)

    def __iter__(self) -> Iterator[TrainBatch]:
        worker, num_workers = _worker()
        g, epoch, segment, k = self.geometry, self.epoch.value, self.segment.value, self.start_batch.value
        b, crop = g.batch_size, self.cfg.crop_size
        # the DataLoader polls worker 0 first: on a pass that starts at batch k it plays reader k % readers
        role = (worker + k) % num_workers
        steps = self.steps()
        n_batches = reader_batches(steps, num_workers)[role]
        done = emitted_before(k, num_workers, role)
        pieces = span(self.runs(epoch), steps, b, self.rank, num_workers, role)
        seeds = (self.seed, epoch, segment, self.rank, role)
        errors = ErrorPolicy(self.cfg.on_error, self.cfg.max_errors, self.skipped_before.value)
        samples = self._samples(pieces, done * b, (n_batches - done) * b, seeds, errors)
        for _ in range(n_batches - done):
            images, masks = (
                _batch_tensor((b, 3, crop, crop), torch.float32),
                _batch_tensor((b, crop, crop), torch.int64),
            )
            keys = []
            for i in range(b):
                s, sample_id = next(samples)
                assert s.mask is not None
                # augmentation drawn per sample: the same crop and flip whichever reader, rank or resume
                rng = random.Random(derive_seed(TAG_AUG, self.seed, epoch, sample_id))
                self.transform.apply(s.image, s.mask, rng, images[i], masks[i])
                keys.append(s.key)
            yield TrainBatch(images, masks, keys, errors.count, worker)

    def _samples(
        self, pieces: list[Piece], start: int, quota: int, seeds: tuple[int, ...], errors: ErrorPolicy
    ) -> Iterator[tuple[Sample, int]]:
        """(sample, id) in the reader's emission order from its `start`-th emission, window by window: a window
        is read whole (at most data.shuffle_buffer samples), the samples before it are never read (their tar
        headers are seeked past), and a sample already emitted before `start` is not decoded again."""
        ids = list(piece_ids(pieces, self.base))
        by_id = {i: pos for pos, i in enumerate(ids)}
        ring: deque[tuple[RawSample, int]] = deque(maxlen=_REFILL_RING)
        window, produced, loaded, loaded_window = self.geometry.window, 0, {}, -1
        for pos in emission(len(ids), window, seeds, start):
            if pos // window != loaded_window:  # read the window's samples that are still to come
                loaded_window, lo = pos // window, pos // window * window
                loaded = {}
                for raw in read_pieces(cut_runs(pieces, lo, min(lo + window, len(ids))), errors):
                    loaded[by_id[self.base[raw.shard] + raw.index]] = raw
            raw = loaded.pop(pos, None)
            if raw is None:  # lost to a damaged tar (counted by read_pieces)
                continue
            sample = self._decode(raw, errors)
            if sample is not None:
                ring.append((raw, ids[pos]))
                produced += 1
                yield sample, ids[pos]
                if produced == quota:
                    return
        while produced < quota:  # samples were skipped: re-use recent good ones so the step count holds
            if not ring:
                raise ShardError(
                    f"rank {self.rank}: every sample of this worker's range was skipped; nothing to train on",
                    pieces[0].shard if pieces else None,
                )
            rng = random.Random(derive_seed(TAG_REFILL, *seeds, produced))
            raw, sample_id = ring[rng.randrange(len(ring))]
            sample = self._decode(raw, errors)
            assert sample is not None, "a sample that decoded once decodes again"
            produced += 1
            yield sample, sample_id

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
    """Yields the batches of one pass on every rank, the same number on each; `set_epoch` (or `set_position`,
    to start inside an epoch) before each pass.

    steps_per_epoch = total_samples // (batch_size * world_size); a pass that starts at batch k of a segment
    yields the rest of it. `skipped` counts the samples this rank has dropped (on_error=skip) over all passes.
    """

    def __init__(self, cfg: DataConfig, dataset: _TrainStream, shard_set: ShardSet, steps: int):
        self.cfg, self.dataset, self.shard_set = cfg, dataset, shard_set
        self.steps_per_epoch = steps
        self.position = DataPosition()
        self._skipped_before = 0
        self._pass_skipped: dict[int, int] = {}
        self.loader = _dataloader(cfg, dataset)

    @property
    def geometry(self) -> Geometry:
        return self.dataset.geometry

    def set_epoch(self, epoch: int) -> None:
        self.set_position(DataPosition(epoch))

    def set_position(self, position: DataPosition) -> None:
        consumed = runs_to_ids(position.consumed)
        if consumed != self.dataset.consumed:
            self.dataset.consumed = consumed
            self.loader = _dataloader(self.cfg, self.dataset)  # persistent workers hold the old set
        self.position = position

    def pass_steps(self) -> int:
        """Batches the next pass yields on this rank."""
        return self.dataset.steps() - self.position.start_batch

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def skipped(self) -> int:
        return self._skipped_before + sum(self._pass_skipped.values())

    def __iter__(self) -> Iterator[TrainBatch]:
        self._skipped_before, self._pass_skipped = self.skipped, {}
        p, expected = self.position, self.pass_steps()
        # before iter(): workers read them when the pass starts
        self.dataset.epoch.value, self.dataset.segment.value = p.epoch, p.segment
        self.dataset.start_batch.value = p.start_batch
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
        if n != expected:
            raise RuntimeError(f"input pipeline produced {n} batches instead of {expected} (a bug)")


def build_train_loader(cfg: DataConfig, rank: int, world_size: int, seed: int, epoch: int = 0) -> TrainLoader:
    if not cfg.train_shards:
        raise ValueError("config key data.train_shards is not set")
    shard_set = resolve_shards(cfg.train_shards)
    if not shard_set.has_labels:
        raise ValueError(
            f"data.train_shards={cfg.train_shards}: these shards have no label maps (a test split?)"
        )
    global_batch = cfg.batch_size * world_size
    steps = segment_steps(shard_set.total_samples, cfg.batch_size, world_size)
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
    loader = TrainLoader(cfg, _TrainStream(cfg, shard_set, rank, seed, world_size), shard_set, steps)
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
