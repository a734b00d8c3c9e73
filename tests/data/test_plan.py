"""Training work plan: disjoint, equal per rank, and a tail that changes between epochs even with one shard."""

from __future__ import annotations

from dist_seg.data.plan import epoch_offset, epoch_order, train_pieces


def _samples(order, steps, batch, world, workers, offset) -> list[list[tuple[str, int]]]:
    per_rank = []
    for rank in range(world):
        got = []
        for w in range(workers):
            pieces, _ = train_pieces(order, steps, batch, rank, workers, w, offset)
            got += [(p.shard, i) for p in pieces for i in range(p.start, p.stop)]
        per_rank.append(got)
    return per_rank


def test_one_shard_tail_rotates_and_ranks_stay_disjoint_and_equal() -> None:
    shards = {"only.tar": 60}
    batch, world, workers = 8, 2, 2
    steps = 60 // (batch * world)  # 3 steps per rank, 48 samples used, 12 sit out
    unused_by_epoch = []
    for epoch in range(4):
        order = epoch_order(shards, seed=5, epoch=epoch, shuffle=True)
        offset = epoch_offset(60, seed=5, epoch=epoch, shuffle=True)
        per_rank = _samples(order, steps, batch, world, workers, offset)
        assert [len(r) for r in per_rank] == [steps * batch] * world
        used = [s for r in per_rank for s in r]
        assert len(used) == len(set(used))  # no sample twice in an epoch
        unused_by_epoch.append(frozenset(range(60)) - {i for _, i in used})
    assert len(set(unused_by_epoch)) > 1  # a different tail sits out in different epochs
    assert frozenset().union(*unused_by_epoch) != frozenset(unused_by_epoch[0])


def test_no_shuffle_means_no_rotation() -> None:
    assert epoch_offset(60, seed=5, epoch=3, shuffle=False) == 0
