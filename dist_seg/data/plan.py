"""Who reads which samples: the per-epoch work plan of the training and evaluation loaders.

Pure functions of the shard sizes, the seed and the epoch, so every rank computes the same plan without
communicating (the rules are in dist_seg.data.stream's docstring).
"""

from __future__ import annotations

import random

import numpy as np

from dist_seg.data.shards import Piece

TAG_SHARDS, TAG_AUG, TAG_OFFSET = 1, 2, 3  # keep the seed streams for shard order, augmentation, offset apart


def cut(order: list[tuple[str, int]], start: int, stop: int) -> list[Piece]:
    """The pieces of samples [start, stop) of the shards laid end to end in `order` ((path, samples) pairs)."""
    pieces, offset = [], 0
    for shard, n in order:
        a, b = max(start, offset), min(stop, offset + n)
        if a < b:
            pieces.append(Piece(shard, a - offset, b - offset))
        offset += n
    return pieces


def derive_seed(*values: int) -> int:
    return int(np.random.SeedSequence([v % (1 << 63) for v in values]).generate_state(1)[0])


def epoch_order(shard_samples: dict[str, int], seed: int, epoch: int, shuffle: bool) -> list[tuple[str, int]]:
    """Shard order of an epoch: sorted, then shuffled with (seed, epoch) so every rank agrees."""
    order = sorted(shard_samples.items())
    if shuffle:
        random.Random(derive_seed(TAG_SHARDS, seed, epoch)).shuffle(order)
    return order


def train_pieces(
    order: list[tuple[str, int]],
    steps: int,
    batch_size: int,
    rank: int,
    num_workers: int,
    worker: int,
    offset: int = 0,
) -> tuple[list[Piece], int]:
    """(pieces, number of batches) of one worker of one rank; see the module docstring. The sequence is read
    cyclically from `offset`, so the samples that sit an epoch out change from epoch to epoch even when there
    are too few shards for the shard shuffle to move them."""
    batches = [steps // num_workers + (w < steps % num_workers) for w in range(num_workers)]
    start = (rank * steps + sum(batches[:worker])) * batch_size
    stop = start + batches[worker] * batch_size
    n = sum(c for _, c in order)
    if n == 0 or start == stop:
        return cut(order, start, stop), batches[worker]
    a = (start + offset) % n
    b = a + (stop - start)
    pieces = cut(order, a, min(b, n)) + (cut(order, 0, b - n) if b > n else [])
    return pieces, batches[worker]


def epoch_offset(total: int, seed: int, epoch: int, shuffle: bool) -> int:
    """Where an epoch starts reading the laid-out sequence (0 without shuffling)."""
    return derive_seed(TAG_OFFSET, seed, epoch) % total if shuffle and total > 0 else 0


def eval_pieces(
    order: list[tuple[str, int]], rank: int, world_size: int, num_workers: int, worker: int
) -> list[Piece]:
    n = sum(c for _, c in order)
    a, b = rank * n // world_size, (rank + 1) * n // world_size
    return cut(order, a + worker * (b - a) // num_workers, a + (worker + 1) * (b - a) // num_workers)
