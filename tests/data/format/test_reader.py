"""Each shard byte read once (dist_seg.data.format.reader): a pass reads its shards' samples once whatever the
shuffle window, a resume reads the window it continues in and nothing before it, and shards without an index
(format version 1) cost one walk over their headers. Bytes are this process's `rchar` (/proc/self/io: what
read() returned, page cache included); the loaders run in-process (data.num_workers=0), so nothing else reads
meanwhile. References come from tarfile (tests/tiny_shards.sample_ranges), not from the converter's index."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from tiny_shards import assert_same, batches, cfg, sample_ranges

from dist_seg.data.format.reader import read_samples, sample_offsets
from dist_seg.data.format.shards import ShardError
from dist_seg.data.loading.train_loader import DataPosition, build_train_loader

pytestmark = pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's /proc/PID/io")
SLACK = 4096  # reading /proc/self/io itself, twice per measurement


def rchar() -> int:
    line = next(x for x in Path("/proc/self/io").read_text().splitlines() if x.startswith("rchar:"))
    return int(line.split()[1])


def _sample_bytes(shard_dir: Path) -> dict[str, int]:
    """key -> bytes of its sample (headers and data, padding included)."""
    return {k: hi - lo for t in sorted(shard_dir.glob("*.tar")) for k, lo, hi in sample_ranges(t)}


def _v1_copy(shard_dir: Path, dest: Path) -> Path:
    """`shard_dir` as a format version 1 directory: no index files, none named in the manifest."""
    shutil.copytree(shard_dir, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m["format_version"] = 1
    for s in m["shards"]:
        del s["index"], s["index_sha256"]
        (dest / s["name"].replace(".tar", ".idx.json")).unlink()
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


@pytest.mark.parametrize("window", [1, 2, 8, 64])
def test_a_pass_reads_each_sample_once_whatever_the_window(tiny_shards: dict[str, Path], window: int) -> None:
    sizes = _sample_bytes(tiny_shards["train4"])
    loader = build_train_loader(cfg(train_shards=str(tiny_shards["train4"]), shuffle_buffer=window), 0, 1, 0)
    batches(loader, epoch=0)  # the indexes are read once per reader; the pass after reads samples only
    before = rchar()
    keys = [k for b in batches(loader, epoch=1) for k in b[0]]
    read = rchar() - before
    assert len(keys) == len(set(keys)) == 40
    # every byte of the samples used (headers, data, padding), once
    assert sum(sizes[k] for k in keys) <= read <= sum(sizes[k] for k in keys) + SLACK


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_a_resume_reads_its_window_and_nothing_before_it(
    tiny_shards: dict[str, Path], fraction: float
) -> None:
    sizes = _sample_bytes(tiny_shards["train4"])
    window = 8
    loader = build_train_loader(cfg(train_shards=str(tiny_shards["train4"]), shuffle_buffer=window), 0, 1, 0)
    batches(loader, epoch=0)
    k = int(fraction * len(loader))
    loader.set_position(DataPosition(epoch=1, start_batch=k))
    before = rchar()
    first = next(iter(loader))
    read = rchar() - before
    assert first.keys == batches(loader, epoch=1)[k][0]  # the same batch an uninterrupted pass yields
    biggest_window = window * max(sizes.values())
    assert read <= biggest_window + SLACK, (read, biggest_window)


def test_unindexed_local_shards_cost_one_header_walk(tiny_shards: dict[str, Path], tmp_path: Path) -> None:
    old = _v1_copy(tiny_shards["train4"], tmp_path / "v1")
    for tar in sorted(old.glob("*.tar")):
        ranges = sample_ranges(tar)
        with tarfile.open(tar) as t:
            members = len(t.getmembers())
        before = rchar()
        offsets = sample_offsets(str(tar))
        assert rchar() - before <= 512 * members + SLACK  # headers only: no member data read
        assert offsets == [lo for _, lo, _ in ranges] + [ranges[-1][2]]
        assert [r.key for r in read_samples(str(tar), 3, 7)] == [k for k, _, _ in ranges[3:7]]
    want = batches(build_train_loader(cfg(train_shards=str(tiny_shards["train4"])), 0, 1, seed=0))
    loader = build_train_loader(cfg(train_shards=str(old)), 0, 1, seed=0)
    assert_same(batches(loader), want)
    before = rchar()
    batches(loader, epoch=1)  # offsets found once per shard and reader: the next pass reads samples only
    assert rchar() - before <= sum(_sample_bytes(old).values()) + SLACK


def test_a_missing_index_falls_back_to_the_headers(tiny_shards: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "noindex"
    shutil.copytree(tiny_shards["train4"], d)
    (d / "shard-000001.idx.json").unlink()
    want = batches(build_train_loader(cfg(train_shards=str(tiny_shards["train4"])), 0, 1, seed=0))
    assert_same(batches(build_train_loader(cfg(train_shards=str(d)), 0, 1, seed=0)), want)


def test_an_index_that_disagrees_with_its_manifest_is_an_error(
    tiny_shards: dict[str, Path], tmp_path: Path
) -> None:
    d = tmp_path / "badindex"
    shutil.copytree(tiny_shards["train4"], d)
    (d / "shard-000000.idx.json").write_text((d / "shard-000001.idx.json").read_text())
    with pytest.raises(ShardError, match=r"shard index .*shard-000000\.idx\.json: sha256 differs"):
        batches(build_train_loader(cfg(train_shards=str(d)), 0, 1, seed=0))
