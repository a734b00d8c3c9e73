"""Shard lists and sample reading (dist_seg.data.format.shards): specs resolved against their manifests with errors
that name the culprit, members other than images/labels/json never unpickled, corrupt samples named by shard
and key or skipped and counted under data.on_error, label values checked."""

from __future__ import annotations

import dataclasses
import io
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_shards import cfg, epoch_keys, rewrite_member, tar_keys

from dist_seg.data.loading.eval_loader import build_eval_loader
from dist_seg.data.loading.train_loader import ShardError, build_train_loader, resolve_shards


@pytest.fixture(scope="module")
def data(tiny_shards: dict[str, Path]) -> dict[str, Path]:
    return tiny_shards


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
    with caplog.at_level(logging.WARNING, logger="dist_seg.data.format.shards"):
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
        train_shards=str(shard_dir),
        on_error="skip",
        shuffle_shards=False,
        shuffle_buffer=0,
        scale_min=1.0,
        scale_max=1.0,
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
