"""Streaming pipeline: equal steps on every rank, no sample twice, exact eval, safe decoding, error policy."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import pickle
import random
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from launch_utils import REPO, torchrun
from PIL import Image

from dist_seg.config import DataConfig
from dist_seg.data.convert import ConvertOptions, convert
from dist_seg.data.manifest import read_manifest
from dist_seg.data.stream import (
    ShardError,
    build_eval_loader,
    build_train_loader,
    epoch_order,
    resolve_shards,
    train_pieces,
)


# ---------------------------------------------------------------- tiny datasets
def make_coco(root: Path, ids: list[int], categories: tuple[str, ...] = ("cat", "dog")) -> tuple[Path, Path]:
    """Tiny COCO dataset: 40x30 JPEG photos of noise with one or two rectangles annotated as polygons."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(ids[0])
    images, anns = [], []
    for iid in ids:
        w, h = 40, 30
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(img_dir / f"im{iid}.jpg", quality=90)
        images.append({"id": iid, "file_name": f"im{iid}.jpg", "width": w, "height": h})
        for j in range(1 + iid % 2):
            x0, y0 = int(rng.integers(0, 20)), int(rng.integers(0, 15))
            poly = [x0, y0, x0 + 15, y0, x0 + 15, y0 + 10, x0, y0 + 10]
            anns.append(
                {"id": 100 * iid + j, "image_id": iid, "category_id": 1 + j, "segmentation": [poly]}
                | {"area": 150.0, "bbox": [x0, y0, 15, 10], "iscrowd": 0}
            )
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(categories)]
    ann_path = root / "ann.json"
    ann_path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return ann_path, img_dir


def make_shards(root: Path, ids: list[int], per_shard: int, **kw) -> Path:
    ann, imgs = make_coco(root / "coco", ids, **{k: v for k, v in kw.items() if k == "categories"})
    out = root / "shards"
    convert(
        ConvertOptions(
            str(ann),
            str(imgs),
            str(out),
            samples_per_shard=per_shard,
            progress=False,
            no_labels=kw.get("no_labels", False),
        )
    )
    return out


def tar_keys(shard_dir: Path) -> list[str]:
    """Keys of a shard directory read straight from the tars (independent of the pipeline)."""
    keys = []
    for t in sorted(shard_dir.glob("shard-*.tar")):
        with tarfile.open(t) as tar:
            keys += sorted({m.name.split(".", 1)[0] for m in tar})
    return keys


def rewrite_member(shard: Path, edit: Callable[[str, bytes], list[tuple[str, bytes]]]) -> None:
    """Rewrite a shard member by member through `edit`, keeping the manifest's byte count and sha256 true."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            for new_name, new_data in edit(name, data):
                ti = tarfile.TarInfo(new_name)
                ti.size = len(new_data)
                tar.addfile(ti, io.BytesIO(new_data))
    manifest_path = shard.parent / "manifest.json"
    m = json.loads(manifest_path.read_text())
    for s in m["shards"]:
        if s["name"] == shard.name:
            s["bytes"] = shard.stat().st_size
            s["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(m))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream")
    d = {}
    # three one-shard directories of unequal size: 5 + 13 + 19 = 37 samples
    for name, ids in (("u5", range(1, 6)), ("u13", range(10, 23)), ("u19", range(30, 49))):
        d[name] = make_shards(root / name, list(ids), per_shard=100)
    for n_shards, per in ((1, 23), (2, 12), (5, 5)):
        d[f"eval{n_shards}"] = make_shards(root / f"eval{n_shards}", list(range(200, 223)), per_shard=per)
    d["train4"] = make_shards(root / "train4", list(range(300, 340)), per_shard=10)  # 4 shards x 10
    d["test"] = make_shards(root / "test", list(range(400, 407)), per_shard=3, no_labels=True)
    d["other_classes"] = make_shards(root / "oc", [500, 501], per_shard=5, categories=("cat", "bird"))
    return d


def cfg(**kw) -> DataConfig:
    base = dict(crop_size=24, batch_size=2, eval_batch_size=3, num_workers=0, shuffle_buffer=8)
    return DataConfig(**(base | kw))


def epoch_keys(loader, epoch: int) -> tuple[int, list[str]]:
    loader.set_epoch(epoch)
    steps, keys = 0, []
    for b in loader:
        steps += 1
        keys += b.keys
    return steps, keys


# ---------------------------------------------------------------- shard lists
def test_resolve_shards_forms(data: dict[str, Path]) -> None:
    one = resolve_shards(str(data["eval5"]))
    assert [Path(p).name for p in one.paths] == [f"shard-{i:06d}.tar" for i in range(5)]
    assert one.total_samples == 23 and list(one.shard_samples.values()) == [5, 5, 5, 4, 4]
    assert one.num_classes == 3 and one.has_labels and one.classes[0]["index"] == 0
    assert one.class_names == [c["name"] for c in one.classes]

    sub = resolve_shards(f"{data['eval5']}/shard-{{000001..000003}}.tar")
    assert [Path(p).name for p in sub.paths] == ["shard-000001.tar", "shard-000002.tar", "shard-000003.tar"]
    assert sub.total_samples == 14

    both = resolve_shards(f"{data['u5']},{data['u19']}/")
    assert both.paths == sorted(both.paths) and len(both.paths) == 2 and both.total_samples == 24
    assert both.class_stats is not None
    pixels = [s["pixels"] for s in both.class_stats]
    single = [resolve_shards(str(data[k])).class_stats for k in ("u5", "u19")]
    assert pixels == [a["pixels"] + b["pixels"] for a, b in zip(*single, strict=True)]


def test_resolve_shards_errors_name_the_culprit(data: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="different classes") as e:
        resolve_shards(f"{data['u5']},{data['other_classes']}")
    assert str(data["u5"]) in str(e.value) and str(data["other_classes"]) in str(e.value)
    with pytest.raises(ValueError, match="shard-000005.tar is not listed"):
        resolve_shards(f"{data['eval5']}/shard-{{000003..000009}}.tar")
    with pytest.raises(ValueError, match="named twice"):
        resolve_shards(f"{data['u5']},{data['u5']}/")
    with pytest.raises(ValueError, match="nowhere"):
        resolve_shards(str(data["u5"].parent / "nowhere"))
    with pytest.raises(ValueError, match="label maps"):
        resolve_shards(f"{data['eval1']},{data['test']}")


# ---------------------------------------------------------------- planning (pure)
def test_train_plan_gives_every_rank_equal_disjoint_batches() -> None:
    rng = random.Random(0)
    for _ in range(300):
        sizes = [rng.randint(1, 40) for _ in range(rng.randint(1, 7))]
        shards = {f"s{i}": n for i, n in enumerate(sizes)}
        world, workers, batch = rng.randint(1, 5), rng.randint(1, 4), rng.randint(1, 6)
        steps = sum(sizes) // (batch * world)
        if steps == 0:
            continue
        order = epoch_order(shards, seed=rng.randint(0, 99), epoch=rng.randint(0, 9), shuffle=True)
        used: list[tuple[str, int]] = []
        for rank in range(world):
            rank_batches = 0
            for w in range(workers):
                pieces, n = train_pieces(order, steps, batch, rank, workers, w)
                assert sum(p.stop - p.start for p in pieces) == n * batch
                assert all(0 <= p.start < p.stop <= shards[p.shard] for p in pieces)
                used += [(p.shard, i) for p in pieces for i in range(p.start, p.stop)]
                rank_batches += n
            assert rank_batches == steps
        assert len(used) == len(set(used)) == steps * batch * world


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
        assert x.images.shape == (4, 3, 24, 24) and x.images.dtype == torch.float32
        assert x.masks.shape == (4, 24, 24) and x.masks.dtype == torch.int64
        assert set(x.masks.unique().tolist()) <= {0, 1, 2, 255}
        assert x.keys == y.keys and torch.equal(x.images, y.images) and torch.equal(x.masks, y.masks)
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
@pytest.mark.slow
def test_torchrun_two_ranks_two_workers_unequal_shards(data: dict[str, Path], tmp_path: Path) -> None:
    train_spec = f"{data['u5']},{data['u13']},{data['u19']}"
    evals = [str(data[f"eval{n}"]) for n in (1, 2, 5)]
    out = tmp_path / "seen.json"
    args = [str(REPO / "tests" / "workers" / "stream_worker.py"), "--train", train_spec, "--out", str(out)]
    for spec in evals:
        args += ["--eval", spec]
    proc = torchrun(args, nproc=2, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (
        "3 shard(s) for 2 ranks x 2 workers" in proc.stderr
    )  # fewer shards than readers: warned, still works
    ranks = json.loads(out.read_text())
    steps = 37 // (2 * 2)
    assert [r["steps_per_epoch"] for r in ranks] == [steps, steps]
    all_train = set(tar_keys(data["u5"]) + tar_keys(data["u13"]) + tar_keys(data["u19"]))
    for epoch in range(2):
        assert [r["epochs"][epoch]["steps"] for r in ranks] == [steps, steps]
        keys = ranks[0]["epochs"][epoch]["keys"] + ranks[1]["epochs"][epoch]["keys"]
        assert len(keys) == len(set(keys)) == steps * 4 and set(keys) <= all_train
    assert ranks[0]["epochs"][0]["keys"] != ranks[0]["epochs"][1]["keys"]
    for spec in evals:
        got = collections.Counter(ranks[0]["eval"][spec] + ranks[1]["eval"][spec])
        assert got == collections.Counter(tar_keys(Path(spec)))
        assert sum(got.values()) == read_manifest(spec)["total_samples"]


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


# ---------------------------------------------------------------- safety and corrupt data
class _Trace:
    """Unpickling this object creates a file: proof that a payload was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_members_are_never_unpickled(data: dict[str, Path], tmp_path: Path) -> None:
    shard_dir = tmp_path / "shards"
    shutil.copytree(data["train4"], shard_dir)
    marker, control = tmp_path / "UNPICKLED", tmp_path / "control"
    payload = pickle.dumps(_Trace(marker))
    pickle.loads(pickle.dumps(_Trace(control)))
    assert control.exists(), "the payload must really leave a trace when unpickled"

    def add_payload(name: str, body: bytes) -> list[tuple[str, bytes]]:
        key, ext = name.split(".", 1)
        extra = [(f"{key}.pickle", payload), (f"{key}.pyd", payload), (f"{key}.pth", payload)]
        return [(name, body), *extra] if ext == "json" else [(name, body)]

    for shard in sorted(shard_dir.glob("shard-*.tar")):
        rewrite_member(shard, add_payload)
    steps, keys = epoch_keys(build_train_loader(cfg(train_shards=str(shard_dir)), 0, 1, seed=0), 0)
    evaluated = [k for b in build_eval_loader(cfg(), 0, 1, 32, 32, shards=str(shard_dir)) for k in b.keys]
    assert steps == 20 and len(set(keys)) == 40 and len(evaluated) == 40
    assert not marker.exists()


def _corrupt_copy(data: dict[str, Path], tmp_path: Path, how: str) -> tuple[Path, Path, str]:
    """Copy of train4 with one sample damaged; (dir, damaged shard, a damaged key)."""
    shard_dir = tmp_path / how
    shutil.copytree(data["train4"], shard_dir)
    shard = shard_dir / "shard-000002.tar"
    key = tar_keys(shard_dir)[23]  # the 4th sample of shard 2
    if how == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(int(shard.stat().st_size * 0.35))
        return shard_dir, shard, key

    def damage(name: str, body: bytes) -> list[tuple[str, bytes]]:
        if not name.startswith(key + "."):
            return [(name, body)]
        if how == "jpeg" and name.endswith(".jpg"):
            return [(name, body[: len(body) // 3])]
        if how == "no_seg" and name.endswith(".seg.png"):
            return []
        return [(name, body)]

    rewrite_member(shard, damage)
    return shard_dir, shard, key


# once through a worker process: the exception crosses the DataLoader's process boundary intact. (One worker:
# after a worker raises, torch's DataLoader shutdown waits out a 5 s join timeout per worker.)
@pytest.mark.parametrize(("how", "workers"), [("jpeg", 0), ("no_seg", 0), ("truncated", 0), ("jpeg", 1)])
def test_raise_names_shard_and_key(data: dict[str, Path], tmp_path: Path, how: str, workers: int) -> None:
    shard_dir, shard, key = _corrupt_copy(data, tmp_path, how)
    c = cfg(train_shards=str(shard_dir), num_workers=workers, shuffle_shards=False, on_error="raise")
    with pytest.raises(ShardError) as e:
        epoch_keys(build_train_loader(c, 0, 1, seed=0), 0)
    assert str(shard) in str(e.value)
    if how == "truncated":  # the key where the readable data stops
        assert any(f"'{k}'" in str(e.value) for k in tar_keys(data["train4"])[20:30])
    else:
        assert key in str(e.value) and ("seg.png" in str(e.value)) == (how == "no_seg")
    with pytest.raises(ShardError, match=key if how != "truncated" else "shard-000002"):
        list(build_eval_loader(dataclasses.replace(c, num_workers=0), 0, 1, 32, 32, shards=str(shard_dir)))


@pytest.mark.parametrize("how", ["jpeg", "truncated"])
def test_skip_counts_warns_once_and_keeps_the_step_count(
    data: dict[str, Path], tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    shard_dir, shard, key = _corrupt_copy(data, tmp_path, how)
    c = cfg(train_shards=str(shard_dir), on_error="skip", batch_size=4)
    loader = build_train_loader(c, 0, 1, seed=0)
    with caplog.at_level(logging.WARNING, logger="dist_seg.data.shards"):
        steps, keys = epoch_keys(loader, 0)
    assert steps == loader.steps_per_epoch == 10 and len(keys) == 40
    warnings = [
        r for r in caplog.records if "on_error=skip" in r.getMessage() and str(shard) in r.getMessage()
    ]
    assert len(warnings) == 1
    if how == "jpeg":
        assert loader.skipped == 1 and key not in keys
        assert len(set(keys)) == 39  # one good sample stands in for the corrupt one
    else:
        lost = 10 - sum(k in keys for k in tar_keys(data["train4"])[20:30])
        assert 1 <= loader.skipped == lost < 10
    steps, _ = epoch_keys(loader, 1)
    assert steps == 10 and loader.skipped == (2 if how == "jpeg" else 2 * lost)  # counts add up over epochs
    ev = build_eval_loader(c, 0, 1, 32, 32, shards=str(shard_dir))
    evaluated = [k for b in ev for k in b.keys]
    assert len(evaluated) == 40 - ev.skipped and ev.skipped >= 1


def test_skip_counts_travel_from_worker_processes(data: dict[str, Path], tmp_path: Path) -> None:
    shard_dir, _, key = _corrupt_copy(data, tmp_path, "jpeg")
    c = cfg(train_shards=str(shard_dir), on_error="skip", batch_size=4, num_workers=2)
    loader = build_train_loader(c, 0, 1, seed=0)
    for epoch in range(2):  # persistent workers: the count keeps adding up
        steps, keys = epoch_keys(loader, epoch)
        assert steps == 10 and len(keys) == 40 and key not in keys and loader.skipped == epoch + 1


def test_label_values_are_checked(data: dict[str, Path], tmp_path: Path) -> None:
    shard_dir = tmp_path / "labels"
    shutil.copytree(data["train4"], shard_dir)
    keys = tar_keys(shard_dir)

    def label(values: list[int]) -> bytes:
        arr = np.array(values, np.uint8).repeat(30 * 40 // len(values)).reshape(30, 40)
        buf = io.BytesIO()
        Image.fromarray(arr, mode="L").save(buf, format="PNG")
        return buf.getvalue()

    def relabel(name: str, body: bytes) -> list[tuple[str, bytes]]:
        if name == f"{keys[0]}.seg.png":
            return [(name, label([0, 2, 255]))]  # ignore is valid
        if name == f"{keys[1]}.seg.png":
            return [(name, label([0, 3]))]  # 3 classes: index 3 is out of range
        return [(name, body)]

    rewrite_member(shard_dir / "shard-000000.tar", relabel)
    c = cfg(
        train_shards=str(shard_dir), on_error="skip", shuffle_shards=False, shuffle_buffer=0, scale_min=1.0
    )
    loader = build_train_loader(c, 0, 1, seed=0)
    first = next(iter(loader))
    assert first.keys[0] == keys[0] and (first.masks[0] == 255).any()
    assert keys[1] not in first.keys and loader.skipped == 1
    with pytest.raises(ShardError, match=f"{keys[1]}.*num_classes=3"):
        epoch_keys(build_train_loader(dataclasses.replace(c, on_error="raise"), 0, 1, seed=0), 0)


def test_skip_raises_after_max_errors(data: dict[str, Path], tmp_path: Path) -> None:
    shard_dir, _, _ = _corrupt_copy(data, tmp_path, "truncated")
    c = cfg(train_shards=str(shard_dir), on_error="skip", max_errors=2)
    with pytest.raises(ShardError, match="max_errors=2"):
        epoch_keys(build_train_loader(c, 0, 1, seed=0), 0)
