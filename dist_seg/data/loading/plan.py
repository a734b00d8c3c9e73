"""Who reads which samples: the per-epoch work plan of the training and evaluation loaders.

Pure functions of the shard sizes, the seed, the epoch and the reading geometry, so every rank computes the
same plan without communicating, and a resumed run can compute what an interrupted one had used (the rules
are in dist_seg.data.loading.train_loader's docstring).

Samples have global ids: the shards in sorted path order laid end to end, so shard k's sample i has id
base[k] + i. An epoch's *sequence* is its shard order laid end to end, read cyclically from the epoch's
offset. An epoch is read in *segments*: segment 0 is the whole sequence; when a run resumes on another
geometry, the next segment is the sequence without the ids earlier segments used. Inside a segment, rank r
takes a contiguous span of whole batches and its readers (DataLoader workers) split it; each reader emits its
span in windows of `window` samples, each window in an order drawn from (seed, epoch, segment, rank, reader,
window). So the k-th sample a reader emits is a function of the plan alone: a resume continues at any batch
without reading what came before, and what a segment had consumed after k batches is computable.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from dist_seg.data.format.reader import Piece

# keep the seed streams apart: shard order, augmentation, offset, window order, re-use of a good sample
TAG_SHARDS, TAG_AUG, TAG_OFFSET, TAG_WINDOW, TAG_REFILL = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class Geometry:
    """What decides who reads what inside an epoch segment. `readers` is data.num_workers, at least 1."""

    world_size: int
    batch_size: int
    readers: int
    window: int  # data.shuffle_buffer, at least 1

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def derive_seed(*values: int) -> int:
    return int(np.random.SeedSequence([v % (1 << 63) for v in values]).generate_state(1)[0])


def cut(order: list[tuple[str, int]], start: int, stop: int) -> list[Piece]:
    """The pieces of samples [start, stop) of the shards laid end to end in `order` ((path, samples) pairs)."""
    return cut_runs([Piece(s, 0, n) for s, n in order], start, stop)


def cut_runs(runs: list[Piece], start: int, stop: int) -> list[Piece]:
    """The pieces of positions [start, stop) of `runs` laid end to end."""
    pieces, offset = [], 0
    for r in runs:
        n = r.stop - r.start
        a, b = max(start, offset), min(stop, offset + n)
        if a < b:
            pieces.append(Piece(r.shard, r.start + a - offset, r.start + b - offset))
        offset += n
        if offset >= stop:
            break
    return pieces


def epoch_order(shard_samples: dict[str, int], seed: int, epoch: int, shuffle: bool) -> list[tuple[str, int]]:
    """Shard order of an epoch: sorted, then shuffled with (seed, epoch) so every rank agrees."""
    order = sorted(shard_samples.items())
    if shuffle:
        random.Random(derive_seed(TAG_SHARDS, seed, epoch)).shuffle(order)
    return order


def epoch_offset(total: int, seed: int, epoch: int, shuffle: bool) -> int:
    """Where an epoch starts reading the laid-out sequence (0 without shuffling). Reading cyclically from an
    offset changes which N - S*B*W samples sit an epoch out, even when there is one shard."""
    return derive_seed(TAG_OFFSET, seed, epoch) % total if shuffle and total > 0 else 0


def id_base(shard_samples: dict[str, int]) -> dict[str, int]:
    """Global id of each shard's first sample (shards in sorted path order)."""
    base, n = {}, 0
    for shard, count in sorted(shard_samples.items()):
        base[shard], n = n, n + count
    return base


def piece_ids(pieces: Iterable[Piece], base: dict[str, int]) -> Iterator[int]:
    for p in pieces:
        yield from range(base[p.shard] + p.start, base[p.shard] + p.stop)


def ids_to_runs(ids: Iterable[int]) -> list[list[int]]:
    """Sorted [start, stop) runs covering `ids`: the compact form a checkpoint keeps."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def runs_to_ids(runs: Iterable[Iterable[int]]) -> set[int]:
    return {i for a, b in runs for i in range(a, b)}


def sequence(
    shard_samples: dict[str, int], seed: int, epoch: int, shuffle: bool, consumed: set[int] | None = None
) -> list[Piece]:
    """The samples of an epoch segment in reading order: the epoch's laid-out sequence from its offset,
    without the ids in `consumed` (those earlier segments of the epoch used)."""
    order = epoch_order(shard_samples, seed, epoch, shuffle)
    n = sum(c for _, c in order)
    offset = epoch_offset(n, seed, epoch, shuffle)
    runs = cut(order, offset, n) + cut(order, 0, offset)
    if not consumed:
        return runs
    base, kept = id_base(shard_samples), []
    for r in runs:
        start = None
        for i in range(r.start, r.stop):
            used = base[r.shard] + i in consumed
            if not used and start is None:
                start = i
            elif used and start is not None:
                kept.append(Piece(r.shard, start, i))
                start = None
        if start is not None:
            kept.append(Piece(r.shard, start, r.stop))
    return kept


def reader_batches(steps: int, readers: int) -> list[int]:
    """Batches of each reader of a rank: `steps` split as evenly as possible, the first ones one more.
    The DataLoader takes batch j from reader j % readers, so this is also its round-robin order."""
    return [steps // readers + (w < steps % readers) for w in range(readers)]


def span(runs: list[Piece], steps: int, batch_size: int, rank: int, readers: int, role: int) -> list[Piece]:
    """The pieces one reader (`role`) of one rank reads in a segment of `steps` batches per rank: rank r takes
    positions [r*steps*B, (r+1)*steps*B) of the segment's sequence and its readers split that range into
    contiguous runs of whole batches."""
    batches = reader_batches(steps, readers)
    start = (rank * steps + sum(batches[:role])) * batch_size
    return cut_runs(runs, start, start + batches[role] * batch_size)


def emitted_before(start_batch: int, readers: int, role: int) -> int:
    """Batches reader `role` has emitted once its rank has consumed `start_batch` batches of the segment."""
    return max(0, (start_batch - role + readers - 1) // readers)


def window_order(length: int, seeds: tuple[int, ...], window: int) -> list[int]:
    """The order (positions 0..length-1 of a window) in which a reader emits window number `window`."""
    order = list(range(length))
    random.Random(derive_seed(TAG_WINDOW, *seeds, window)).shuffle(order)
    return order


def emission(n: int, window: int, seeds: tuple[int, ...], start: int = 0) -> Iterator[int]:
    """Positions 0..n-1 of a reader's span in the order it emits them, from its `start`-th emission on:
    windows of `window` consecutive positions, each permuted on its own. `seeds` name the reader:
    (seed, epoch, segment, rank, role)."""
    size = max(1, window)
    for w in range(start // size, (n + size - 1) // size):
        lo = w * size
        order = window_order(min(size, n - lo), seeds, w)
        for k in order[start - lo if start > lo else 0 :]:
            yield lo + k


def consumed_ids(
    shard_samples: dict[str, int],
    seed: int,
    epoch: int,
    shuffle: bool,
    segment: int,
    consumed_before: set[int],
    geometry: Geometry,
    start_batch: int,
) -> set[int]:
    """The ids an epoch has used once every rank consumed `start_batch` batches of segment `segment` read with
    `geometry`: those of earlier segments plus each reader's first emissions of this one."""
    runs = sequence(shard_samples, seed, epoch, shuffle, consumed_before)
    g, base = geometry, id_base(shard_samples)
    steps = segment_steps(sum(p.stop - p.start for p in runs), g.batch_size, g.world_size)
    used = set(consumed_before)
    for rank in range(g.world_size):
        for role in range(g.readers):
            ids = list(piece_ids(span(runs, steps, g.batch_size, rank, g.readers, role), base))
            n = emitted_before(start_batch, g.readers, role) * g.batch_size
            for k, pos in enumerate(emission(len(ids), g.window, (seed, epoch, segment, rank, role))):
                if k >= n:
                    break
                used.add(ids[pos])
    return used


def segment_steps(samples: int, batch_size: int, world_size: int) -> int:
    """Batches per rank of a segment of `samples` samples: drop_last over the global batch."""
    return samples // (batch_size * world_size)


def eval_pieces(
    order: list[tuple[str, int]], rank: int, world_size: int, num_workers: int, worker: int
) -> list[Piece]:
    n = sum(c for _, c in order)
    a, b = rank * n // world_size, (rank + 1) * n // world_size
    return cut(order, a + worker * (b - a) // num_workers, a + (worker + 1) * (b - a) // num_workers)
