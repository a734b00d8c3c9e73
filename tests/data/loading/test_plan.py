"""Training work plan (dist_seg.data.loading.plan): disjoint, equal per rank, a tail that changes between epochs even
with one shard, emission orders that can start anywhere, and consumed ids that re-planning leaves out."""

from __future__ import annotations

import random

from dist_seg.data.loading.plan import (
    Geometry,
    consumed_ids,
    emission,
    emitted_before,
    epoch_offset,
    id_base,
    ids_to_runs,
    piece_ids,
    reader_batches,
    runs_to_ids,
    segment_steps,
    sequence,
    span,
)


def _per_rank(shards, seed, epoch, steps, batch, world, readers, consumed=None) -> list[list[int]]:
    runs, base = sequence(shards, seed, epoch, True, consumed), id_base(shards)
    return [
        [i for role in range(readers) for i in piece_ids(span(runs, steps, batch, rank, readers, role), base)]
        for rank in range(world)
    ]


def test_one_shard_tail_rotates_and_ranks_stay_disjoint_and_equal() -> None:
    shards = {"only.tar": 60}
    batch, world, readers = 8, 2, 2
    steps = segment_steps(60, batch, world)  # 3 steps per rank, 48 samples used, 12 sit out
    unused_by_epoch = []
    for epoch in range(4):
        per_rank = _per_rank(shards, 5, epoch, steps, batch, world, readers)
        assert [len(r) for r in per_rank] == [steps * batch] * world
        used = [s for r in per_rank for s in r]
        assert len(used) == len(set(used))  # no sample twice in an epoch
        unused_by_epoch.append(frozenset(range(60)) - set(used))
    assert len(set(unused_by_epoch)) > 1  # a different tail sits out in different epochs
    assert frozenset().union(*unused_by_epoch) != frozenset(unused_by_epoch[0])


def test_no_shuffle_means_no_rotation() -> None:
    assert epoch_offset(60, seed=5, epoch=3, shuffle=False) == 0
    runs = sequence({"b.tar": 3, "a.tar": 4}, 5, 3, False)
    assert [(p.shard, p.start, p.stop) for p in runs] == [("a.tar", 0, 4), ("b.tar", 0, 3)]


def test_every_geometry_gives_equal_disjoint_batches() -> None:
    rng = random.Random(0)
    for _ in range(300):
        sizes = [rng.randint(1, 40) for _ in range(rng.randint(1, 7))]
        shards = {f"s{i}": n for i, n in enumerate(sizes)}
        world, readers, batch = rng.randint(1, 5), rng.randint(1, 4), rng.randint(1, 6)
        steps = segment_steps(sum(sizes), batch, world)
        if steps == 0:
            continue
        runs = sequence(shards, rng.randint(0, 99), rng.randint(0, 9), True)
        used: list[tuple[str, int]] = []
        for rank in range(world):
            for role, n in enumerate(reader_batches(steps, readers)):
                pieces = span(runs, steps, batch, rank, readers, role)
                assert sum(p.stop - p.start for p in pieces) == n * batch
                assert all(0 <= p.start < p.stop <= shards[p.shard] for p in pieces)
                used += [(p.shard, i) for p in pieces for i in range(p.start, p.stop)]
        assert len(used) == len(set(used)) == steps * batch * world


def test_emission_is_a_windowed_permutation_that_can_start_anywhere() -> None:
    for n, window in ((0, 4), (1, 1), (10, 4), (23, 8), (16, 64)):
        full = list(emission(n, window, (7, 1, 0, 0, 0)))
        assert sorted(full) == list(range(n))
        # every window stays within its own positions, so a reader holds at most one window
        assert all(k // window == full[k] // window for k in range(n))
        for start in range(n + 1):
            assert list(emission(n, window, (7, 1, 0, 0, 0), start)) == full[start:]
    assert list(emission(16, 16, (7, 1, 0, 0, 0))) != list(emission(16, 16, (7, 1, 0, 0, 1)))


def test_emitted_before_follows_the_round_robin() -> None:
    for readers in (1, 2, 3):
        for k in range(10):
            assert sum(emitted_before(k, readers, role) for role in range(readers)) == k
            assert [emitted_before(k, readers, r) for r in range(readers)] == [
                sum(1 for j in range(k) if j % readers == r) for r in range(readers)
            ]


def test_consumed_ids_are_left_out_by_the_next_segment_and_the_epoch_uses_each_id_once() -> None:
    shards = {"a.tar": 13, "b.tar": 20, "c.tar": 7}  # 40 samples
    seed, epoch = 3, 2
    old = Geometry(world_size=2, batch_size=3, readers=2, window=5)
    steps = segment_steps(40, old.batch_size, old.world_size)  # 6 batches per rank
    used = consumed_ids(shards, seed, epoch, True, 0, set(), old, start_batch=4)
    assert len(used) == 4 * old.batch_size * old.world_size
    assert runs_to_ids(ids_to_runs(used)) == used
    # the next segment, on 1 rank with batch 4: the rest of the epoch, none of the used ids
    left = sequence(shards, seed, epoch, True, used)
    assert sum(p.stop - p.start for p in left) == 40 - len(used)
    new = _per_rank(shards, seed, epoch, segment_steps(40 - len(used), 4, 1), 4, 1, 1, used)[0]
    assert not set(new) & used and len(set(new)) == len(new)
    assert steps * old.batch_size * old.world_size - len(used) <= len(new)
