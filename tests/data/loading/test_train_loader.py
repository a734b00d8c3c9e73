"""Streaming pipeline: equal steps on every rank, no sample twice, exact eval, safe decoding, error policy."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from tiny_shards import cfg, epoch_keys, tar_keys

from dist_seg.data.format.manifest import read_manifest
from dist_seg.data.loading.eval_loader import build_eval_loader
from dist_seg.data.loading.plan import consumed_ids
from dist_seg.data.loading.train_loader import DataPosition, build_train_loader


@pytest.fixture(scope="module")
def data(tiny_shards: dict[str, Path]) -> dict[str, Path]:
    return tiny_shards


# planning (pure functions): tests/data/test_plan.py


# ---------------------------------------------------------------- training, one process
def test_train_ranks_simulated_in_process_get_equal_steps_and_disjoint_samples(data: dict[str, Path]) -> None:
    spec = f"{data['u5']},{data['u13']},{data['u19']}"
    all_keys = set(tar_keys(data["u5"]) + tar_keys(data["u13"]) + tar_keys(data["u19"]))
    for world in (1, 3):
        seen: list[str] = []
        for rank in range(world):
            loader = build_train_loader(cfg(train_shards=spec), rank, world, seed=1)
            assert loader.steps_per_epoch == 37 // (2 * world) == len(loader)
            steps, keys = epoch_keys(loader, 0)
            assert steps == loader.steps_per_epoch
            seen += keys
        assert len(seen) == len(set(seen)) == (37 // (2 * world)) * 2 * world
        assert set(seen) <= all_keys


def test_train_batches_shapes_reproducible_and_reshuffled(data: dict[str, Path]) -> None:
    c = cfg(train_shards=str(data["train4"]), batch_size=4)
    a, b = build_train_loader(c, 0, 1, seed=3), build_train_loader(c, 0, 1, seed=3)
    for x, y in zip(a, b, strict=True):
        assert x.images.shape == (4, 3, 24, 24) and x.images.dtype == torch.uint8  # a quarter of float32
        assert x.images.is_contiguous()
        assert x.masks.shape == (4, 24, 24) and x.masks.dtype == torch.uint8
        assert x.colour.shape == (4, 4, 3) and x.sizes.shape == (4, 2) and x.sizes.dtype == torch.int32
        assert set(x.masks.unique().tolist()) <= {0, 1, 2, 255}
        assert x.keys == y.keys and torch.equal(x.images, y.images) and torch.equal(x.masks, y.masks)
        assert torch.equal(x.colour, y.colour) and torch.equal(x.sizes, y.sizes)  # colour drawn per sample
        images, masks = x.model_input()
        assert images.dtype == torch.float32 and masks.dtype == torch.int64
    _, e0 = epoch_keys(a, 0)
    _, e1 = epoch_keys(a, 1)
    assert sorted(e0) == sorted(e1) and e0 != e1
    _, other_seed = epoch_keys(build_train_loader(c, 0, 1, seed=4), 0)
    assert other_seed != e0


def test_persistent_workers_follow_set_epoch(data: dict[str, Path]) -> None:
    c = cfg(train_shards=str(data["train4"]), batch_size=4, num_workers=2)
    loader = build_train_loader(c, 0, 1, seed=3)
    reference = build_train_loader(
        cfg(train_shards=str(data["train4"]), batch_size=4, num_workers=2), 0, 1, 3
    )
    s0, e0 = epoch_keys(loader, 0)
    s1, e1 = epoch_keys(loader, 1)  # same worker processes, new epoch
    _, r1 = epoch_keys(reference, 1)  # fresh workers started at epoch 1
    assert s0 == s1 == 10 and len(set(e0)) == 40 and e1 == r1 and e0 != e1


# ---------------------------------------------------------------- training, real 2-process torchrun
# ---------------------------------------------------------------- evaluation
@pytest.mark.parametrize("n_shards", [1, 2, 5])
def test_eval_sees_every_sample_exactly_once(data: dict[str, Path], n_shards: int) -> None:
    shard_dir = data[f"eval{n_shards}"]
    expected = collections.Counter(tar_keys(shard_dir))
    assert sum(expected.values()) == read_manifest(shard_dir)["total_samples"] == 23
    for world, workers in ((1, 0), (2, 0), (3, 2), (30, 0)):
        got: collections.Counter = collections.Counter()
        for rank in range(world):
            ev = build_eval_loader(cfg(num_workers=workers), rank, world, 32, 32, shards=str(shard_dir))
            got.update(k for b in ev for k in b.keys)
        assert got == expected, (world, workers)


def test_eval_batches_are_padded_and_croppable(data: dict[str, Path]) -> None:
    c = cfg(val_shards=str(data["eval2"]), eval_resize=45)
    for b in build_eval_loader(c, 0, 1, size_divisor=32, min_size=96):
        assert b.images.shape[-2:] == b.masks.shape[-2:] == (96, 96)  # 45x60 content, min_size 96
        assert b.images.shape[0] == len(b.keys) == len(b.sizes) <= 3
        for i, (h, w) in enumerate(b.sizes):
            assert (h, w) == (45, 60) and b.orig_sizes[i] == (30, 40)
            assert (b.masks[i, h:] == 255).all() and (b.masks[i, :, w:] == 255).all()
            assert (b.images[i, :, h:] == 0).all() and set(b.masks[i, :h, :w].unique().tolist()) <= {0, 1, 2}
            assert b.meta[i]["key"] == b.keys[i] and b.meta[i]["file_name"].endswith(".jpg")


def test_eval_on_test_split_without_masks(data: dict[str, Path]) -> None:
    ev = build_eval_loader(cfg(num_workers=0), 0, 1, 32, 32, shards=str(data["test"]))
    batches = list(ev)
    assert sum(len(b.keys) for b in batches) == 7 and all(b.masks is None for b in batches)
    assert batches[0].images.shape[-2:] == (32, 64)
    with pytest.raises(ValueError, match="no label maps"):
        build_train_loader(cfg(train_shards=str(data["test"])), 0, 1, seed=0)


# ---------------------------------------------------------------- starting inside an epoch (resume)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_pass_started_at_batch_k_is_the_rest_of_the_full_pass(data: dict[str, Path], workers: int) -> None:
    """Same batches (keys and augmented pixels) as the uninterrupted pass from batch k on, without the
    first k; and plan.consumed_ids names exactly the samples of the first k batches."""
    c = cfg(train_shards=str(data["train4"]), num_workers=workers, shuffle_buffer=6)
    loader = build_train_loader(c, 0, 1, seed=4)
    loader.set_epoch(1)
    full = [(b.keys, b.images.clone()) for b in loader]
    for k in (1, 3, 7):
        loader.set_position(DataPosition(epoch=1, start_batch=k))
        rest = [(b.keys, b.images.clone()) for b in loader]
        assert [keys for keys, _ in rest] == [keys for keys, _ in full[k:]]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rest, full[k:], strict=True))
        used = consumed_ids(
            loader.shard_set.shard_samples, 4, 1, True, 0, set(), loader.geometry, start_batch=k
        )
        keys_by_id = tar_keys(data["train4"])  # shards in sorted order, samples in tar order: the id order
        assert sorted(keys_by_id[i] for i in used) == sorted(key for keys, _ in full[:k] for key in keys)
