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
share shards (rank 0 warns). A reader seeks with the shard's index to its range and reads nothing outside it.
Inside a worker, its range is emitted in windows of data.shuffle_buffer consecutive samples, each window in an
order drawn from (seed, epoch, segment, rank, worker, window), and each sample is augmented with an RNG drawn
from (seed, epoch, sample id) (the draws and their order: dist_seg.data.loading.transforms), after the
user's own pipeline when data.augment names one (seeded from the same three: dist_seg.data.loading.augment).
So a pass can start at any batch (DataPosition) without reading the batches before it, which is how a
resume continues an epoch; a resume on another geometry continues the epoch in a new segment over the
samples not used yet (dist_seg.data.loading.plan, dist_seg.train.resume). A run is reproducible for a given
world size, batch size and data.num_workers.

Errors (data.on_error). `raise`: ShardError naming the shard and the sample key. `skip`: the sample is dropped
and counted, one warning per shard, and a ShardError once a rank has skipped more than data.max_errors. A
truncated shard loses every sample of the reader's range past the damage. To keep the step count, a worker
that lost samples re-decodes one of its last good samples in their place (with that sample's own
augmentation, drawn from its id): the only case where an image can appear twice in an epoch. Counts travel with the batches (`TrainBatch.skipped`, per
worker and epoch) and `TrainLoader.skipped` sums them for the rank.

Evaluation loading is dist_seg.data.loading.eval_loader. Reading and decoding (only jpg/png/json members, never
unpickling) live in dist_seg.data.format.reader; what happens to a decoded sample, in
dist_seg.data.loading.transforms (the host) and dist_seg.data.loading.colour (the device).
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

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from dist_seg.config.schema import DataConfig
from dist_seg.data.format.reader import (
    ErrorPolicy,
    Piece,
    RawSample,
    Sample,
    ShardReader,
    decode_sample,
    no_range_warning,
)
from dist_seg.data.format.remote import RemoteOptions, retry_count
from dist_seg.data.format.shards import ShardError, ShardSet, resolve_shards
from dist_seg.data.format.urls import redact
from dist_seg.data.loading.augment import UserAugment, sample_seeds
from dist_seg.data.loading.colour import COLOUR_ROWS, Clip, colour_range, to_model_input
from dist_seg.data.loading.plan import (
    TAG_AUG,
    TAG_REFILL,
    Geometry,
    cut_runs,
    derive_seed,
    emission,
    emitted_before,
    id_base,
    piece_ids,
    reader_batches,
    runs_to_ids,
    segment_steps,
    sequence,
    span,
)
from dist_seg.data.loading.transforms import TrainTransform
from dist_seg.data.loading.workers import make_dataloader, worker_slot

__all__ = [
    "ShardError",
    "resolve_shards",
    "build_train_loader",
    "TrainLoader",
    "DataPosition",
    "TrainBatch",
]

log = logging.getLogger(__name__)

_REFILL_RING = 16  # recent good samples a worker may re-use in place of skipped ones


# ---------------------------------------------------------------------------------------------- training
TRAIN_TENSORS = ("images", "masks", "colour", "coverage")  # what prefetch.Prefetcher moves (sizes stay)


@dataclass
class TrainBatch:
    """One loader batch, as uint8: the model's input is `colour.to_model_input(images, colour, sizes)`."""

    images: Tensor  # uint8 [B, 3, crop, crop], planar (what the resize writes); beyond each sample's size: 0
    masks: Tensor  # uint8 [B, crop, crop], 255 = ignore
    colour: Tensor  # float32 [B, COLOUR_ROWS, 3]: each sample's jitter + normalisation (colour.py)
    sizes: Tensor  # int32 [B, 2], on the host: each sample's content height and width (the rest is padding)
    keys: list[str]
    skipped: int  # samples this worker has skipped so far in this epoch
    worker: int
    retries: int = 0  # transient network faults this worker has retried so far in this pass
    clip: Clip | None = None  # with colour jitter: the 0..1 range to clip to (colour.colour_range)
    coverage: Tensor | None = None  # with data.augment: uint8 [B, crop, crop], 0 where no source pixel landed

    def model_input(self, channels_last: bool = False) -> tuple[Tensor, Tensor]:
        """(float32 normalised images, int64 masks) on the batch's device: call after moving it there."""
        images = to_model_input(self.images, self.colour, self.sizes, channels_last, self.clip)
        if self.coverage is not None:  # uncovered pixels (augment.py): 0.0, the mean colour, as the padding
            images.mul_(self.coverage[:, None])
        return images, self.masks.long()

    def pin_memory(self) -> TrainBatch:  # DataLoader(pin_memory=True) calls this
        return dataclasses.replace(
            self,
            images=self.images.pin_memory(),
            masks=self.masks.pin_memory(),
            colour=self.colour.pin_memory(),
            coverage=self.coverage.pin_memory() if self.coverage is not None else None,
        )


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
        self.augment = UserAugment(cfg.augment) if cfg.augment else None  # data.augment
        self.reader = ShardReader(shard_set, RemoteOptions.from_config(cfg))
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
        worker, num_workers = worker_slot()
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
        retries_before = retry_count()
        samples = self._samples(pieces, done * b, (n_batches - done) * b, seeds, errors)
        for _ in range(n_batches - done):
            # planar: the resize writes planes, and a channels-last slot would cost a uint8 transpose (1.7 ms
            # per 512x512 sample, measured) that the device's float conversion then undoes
            images = _batch_tensor((b, 3, crop, crop), torch.uint8)
            masks = _batch_tensor((b, crop, crop), torch.uint8)
            colour = _batch_tensor((b, COLOUR_ROWS, 3), torch.float32)
            sizes = _batch_tensor((b, 2), torch.int32)
            coverage = _batch_tensor((b, crop, crop), torch.uint8) if self.augment else None
            colour_rows, content = colour.numpy(), sizes.numpy()  # views: a numpy store is ~10x cheaper
            keys = []
            for i in range(b):
                s, sample_id = next(samples)
                assert s.mask is not None
                image, mask, covered = s.image, s.mask, None
                if self.augment is not None:  # the user's pipeline, on the whole sample, its own seeds
                    seeds = sample_seeds(self.seed, epoch, sample_id)
                    where = f"sample {s.key!r}, id {sample_id}"
                    image, mask, covered = self.augment(image, mask, seeds, where)
                # augmentation drawn per sample: the same crop, flip and colour whichever reader, rank or resume
                rng = random.Random(derive_seed(TAG_AUG, self.seed, epoch, sample_id))
                slot = coverage[i] if coverage is not None else None
                rows, content[i] = self.transform.apply(image, mask, rng, images[i], masks[i], covered, slot)
                colour_rows[i] = rows.numpy()
                keys.append(s.key)
            retries = retry_count() - retries_before
            clip = colour_range(self.cfg.mean, self.cfg.std) if self.cfg.color_jitter > 0 else None
            count = errors.count
            yield TrainBatch(images, masks, colour, sizes, keys, count, worker, retries, clip, coverage)
        self.reader.close()  # the pass is done: no stream is left open to continue

    def _samples(
        self, pieces: list[Piece], start: int, quota: int, seeds: tuple[int, ...], errors: ErrorPolicy
    ) -> Iterator[tuple[Sample, int]]:
        """(sample, id) in the reader's emission order from its `start`-th emission, window by window: a window
        is read whole (at most data.shuffle_buffer samples), the samples before it are never read (the
        reader seeks to the window's first sample with the shard's index), and a sample already emitted
        before `start` is not decoded again."""
        ids = list(piece_ids(pieces, self.base))
        by_id = {i: pos for pos, i in enumerate(ids)}
        ring: deque[tuple[RawSample, int]] = deque(maxlen=_REFILL_RING)
        window, produced, loaded, loaded_window = self.geometry.window, 0, {}, -1
        for pos in emission(len(ids), window, seeds, start):
            if pos // window != loaded_window:  # read the window's samples that are still to come
                loaded_window, lo = pos // window, pos // window * window
                loaded = {}
                for raw in self.reader.read_pieces(cut_runs(pieces, lo, min(lo + window, len(ids))), errors):
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
        self._skipped_before = self._retries_before = 0
        self._pass_skipped: dict[int, int] = {}
        self._pass_retries: dict[int, int] = {}
        self.loader = make_dataloader(cfg, dataset)

    @property
    def geometry(self) -> Geometry:
        return self.dataset.geometry

    def set_epoch(self, epoch: int) -> None:
        self.set_position(DataPosition(epoch))

    def set_position(self, position: DataPosition) -> None:
        consumed = runs_to_ids(position.consumed)
        if consumed != self.dataset.consumed:
            self.dataset.consumed = consumed
            self.loader = make_dataloader(self.cfg, self.dataset)  # persistent workers hold the old set
        self.position = position

    def pass_steps(self) -> int:
        """Batches the next pass yields on this rank."""
        return self.dataset.steps() - self.position.start_batch

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def skipped(self) -> int:
        return self._skipped_before + sum(self._pass_skipped.values())

    @property
    def remote_retries(self) -> int:
        """Transient network faults this rank's workers have retried, over all passes."""
        return self._retries_before + sum(self._pass_retries.values())

    def __iter__(self) -> Iterator[TrainBatch]:
        self._skipped_before, self._pass_skipped = self.skipped, {}
        self._retries_before, self._pass_retries = self.remote_retries, {}
        p, expected = self.position, self.pass_steps()
        # before iter(): workers read them when the pass starts
        self.dataset.epoch.value, self.dataset.segment.value = p.epoch, p.segment
        self.dataset.start_batch.value = p.start_batch
        self.dataset.skipped_before.value = self._skipped_before
        n = 0
        for batch in self.loader:
            self._pass_skipped[batch.worker] = batch.skipped
            self._pass_retries[batch.worker] = batch.retries
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
    shard_set = resolve_shards(cfg.train_shards, RemoteOptions.from_config(cfg))
    if not shard_set.has_labels:
        raise ValueError(
            f"data.train_shards={redact(cfg.train_shards)}: these shards have no label maps (a test split?)"
        )
    global_batch = cfg.batch_size * world_size
    steps = segment_steps(shard_set.total_samples, cfg.batch_size, world_size)
    if steps < 1:
        raise ValueError(
            f"data.train_shards={redact(cfg.train_shards)} holds {shard_set.total_samples} samples, fewer than one global "
            f"batch (data.batch_size={cfg.batch_size} x {world_size} ranks = {global_batch})"
        )
    readers = world_size * max(1, cfg.num_workers)
    if rank == 0 and (note := no_range_warning(shard_set, "data.train_shards")):
        log.warning(note)
    if rank == 0 and len(shard_set.paths) < readers:
        log.warning(
            "%d shard(s) for %d ranks x %d workers: readers share shards (sample-level split; each reads only its "
            "own samples of a shared shard). Convert with --min-shards %d for one shard per reader.",
            len(shard_set.paths),
            world_size,
            max(1, cfg.num_workers),
            readers,
        )
    loader = TrainLoader(cfg, _TrainStream(cfg, shard_set, rank, seed, world_size), shard_set, steps)
    loader.set_epoch(epoch)
    return loader
