"""Shards behind servers that ignore HTTP Range requests (dist_seg.data.format.remote, .reader, .cache): the
real `python -m http.server` as a separate process, and tests/servers.py's ShardServer with ranges=False
where a test counts the bytes sent or injects a fault.

What users rely on: such a server is detected before the first step and named in one warning; training and
evaluation then read exactly what they read from the local directory, with the same sha256 checks (a corrupted
byte is still an error naming the URL, never a sample); each shard is streamed once per pass, not once per
window; a reset mid-stream is retried; data.cache_dir fills from such a server too, whatever the shard's size.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from servers import ShardServer, http_server_process
from tiny_shards import assert_same, batches, cfg, sample_ranges

from dist_seg.data.format import cache, remote
from dist_seg.data.format.reader import ShardReader
from dist_seg.data.format.remote import RemoteOptions, bytes_received
from dist_seg.data.format.shards import ShardError, resolve_shards
from dist_seg.data.loading.eval_loader import build_eval_loader
from dist_seg.data.loading.train_loader import build_train_loader

SMALL_BLOCK = 4096  # so that every tiny shard (~40 KB) spans several blocks of a download


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "BLOCK_BYTES", SMALL_BLOCK)
    monkeypatch.setattr(cache, "BLOCK_BYTES", SMALL_BLOCK)


@pytest.fixture
def fresh_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test learns its servers anew: the module remembers, per process, which ones ignore Range."""
    monkeypatch.setattr(remote, "_no_range", set())
    monkeypatch.setattr(remote, "_probed", {})


def _rel(tiny_shards: dict[str, Path], name: str) -> str:
    return str(tiny_shards[name].relative_to(tiny_shards["train4"].parent.parent))


def _shard_bytes(shard_dir: Path) -> int:
    return sum(p.stat().st_size for p in shard_dir.glob("*.tar"))


def _sample_bytes(shard_dir: Path) -> int:
    """Bytes of every sample of the shard directory: its tars without their end-of-archive blocks."""
    return sum(end for _, _, end in (sample_ranges(p)[-1] for p in shard_dir.glob("*.tar")))


@pytest.mark.usefixtures("small_blocks", "fresh_servers")
def test_python_http_server_trains_and_evaluates_as_the_local_directory(
    tiny_shards: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    root = tiny_shards["train4"].parent.parent
    with http_server_process(root) as base:
        spec = f"{base}/{_rel(tiny_shards, 'train4')}"
        shard_set = resolve_shards(spec)
        assert shard_set.no_range == {base}
        local = str(tiny_shards["train4"])
        for workers in (0, 2):  # (the plan depends on the readers: compare with the same number locally)
            want = batches(build_train_loader(cfg(train_shards=local, num_workers=workers), 0, 1, seed=3), 1)
            with caplog.at_level(logging.WARNING):
                caplog.clear()
                loader = build_train_loader(cfg(train_shards=spec, num_workers=workers), 0, 1, seed=3)
            notes = [
                r.getMessage() for r in caplog.records if "ignore(s) HTTP Range requests" in r.getMessage()
            ]
            assert len(notes) == 1 and base in notes[0] and "data.cache_dir" in notes[0]
            assert_same(batches(loader, epoch=1), want)
        # rank 1 of 2 warns nothing: rank 0 speaks for the job
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            build_train_loader(cfg(train_shards=spec), 1, 2, seed=3)
        assert not [r for r in caplog.records if "Range" in r.getMessage()]
        # evaluation, every sample once, the same tensors; and with the cache, shards of several blocks
        ev_spec = f"{base}/{_rel(tiny_shards, 'eval5')}"
        local = [
            (b.keys, b.images, b.masks)
            for b in build_eval_loader(cfg(val_shards=str(tiny_shards["eval5"])), 0, 1, 8, 8)
        ]
        got = [(b.keys, b.images, b.masks) for b in build_eval_loader(cfg(val_shards=ev_spec), 0, 1, 8, 8)]
        assert_same(got, local)


@pytest.mark.usefixtures("small_blocks", "fresh_servers")
def test_the_cache_fills_from_python_http_server_with_shards_of_many_blocks(
    tiny_shards: dict[str, Path], tmp_path: Path
) -> None:
    root = tiny_shards["train4"].parent.parent
    manifest = json.loads((tiny_shards["train4"] / "manifest.json").read_text())
    assert min(s["bytes"] for s in manifest["shards"]) > 4 * SMALL_BLOCK
    want = batches(build_train_loader(cfg(train_shards=str(tiny_shards["train4"])), 0, 1, seed=0))
    with http_server_process(root) as base:
        spec = f"{base}/{_rel(tiny_shards, 'train4')}"
        loader = build_train_loader(
            cfg(train_shards=spec, cache_dir=str(tmp_path / "c"), num_workers=1), 0, 1, seed=0
        )
        assert_same(batches(loader), want)
        cached = sorted(p.name for p in (tmp_path / "c").glob("*/*.tar"))
        assert cached == sorted(f"{s['sha256']}.tar" for s in manifest["shards"])
        ev = build_eval_loader(cfg(val_shards=spec, cache_dir=str(tmp_path / "c")), 0, 1, 8, 8)
        assert sum(len(b.keys) for b in ev) == 40


@pytest.mark.usefixtures("fresh_servers")
def test_each_shard_is_streamed_once_per_pass_not_once_per_window(tiny_shards: dict[str, Path]) -> None:
    root = tiny_shards["train4"].parent.parent
    with ShardServer(root, ranges=False) as srv:
        spec = srv.url(_rel(tiny_shards, "train4"))
        total = _sample_bytes(tiny_shards["train4"])  # an epoch uses every sample: 40 // (2 x 1)
        # window of 2 samples: 5 windows per 10-sample shard, each of which used to fetch the shard again
        loader = build_train_loader(cfg(train_shards=spec, shuffle_buffer=2), 0, 1, seed=0)
        before = bytes_received()
        batches(loader)
        sent = sum(n for p, n in srv.body_bytes.items() if p.endswith(".tar"))
        # the epoch starts inside a shard (its offset) and wraps round to that shard's start: that shard's
        # first part is streamed a second time; everything else once
        largest = max(p.stat().st_size for p in tiny_shards["train4"].glob("*.tar"))
        assert total <= bytes_received() - before <= total + largest
        assert sent >= bytes_received() - before  # the server sent at least what the reader took


@pytest.mark.usefixtures("fresh_servers")
def test_a_reset_mid_stream_is_retried_and_the_bytes_are_still_checked(tiny_shards: dict[str, Path]) -> None:
    root = tiny_shards["train4"].parent.parent
    want = batches(build_train_loader(cfg(train_shards=str(tiny_shards["train4"])), 0, 1, seed=0))
    with ShardServer(root, ranges=False) as srv:
        spec = srv.url(_rel(tiny_shards, "train4"))
        srv.reset["shard-000001.tar"] = 2
        loader = build_train_loader(cfg(train_shards=spec), 0, 1, seed=0)
        assert_same(batches(loader), want)
        assert loader.remote_retries == 2
        # a flipped byte: the index's sha256 catches it, as over a server with Range
        index = json.loads((tiny_shards["train4"] / "shard-000002.idx.json").read_text())
        srv.corrupt["shard-000002.tar"] = index["offsets"][3] + 700
        with pytest.raises(ShardError, match=r"shard-000002\.tar: sample #3 .*sha256"):
            batches(build_train_loader(cfg(train_shards=spec), 0, 1, seed=0))
        loader = build_train_loader(cfg(train_shards=spec, on_error="skip"), 0, 1, seed=0)
        assert len(batches(loader)) == len(loader) and loader.skipped >= 1


@pytest.mark.usefixtures("fresh_servers")
def test_format_version_1_shards_stream_once_from_a_server_without_range(
    tiny_shards: dict[str, Path], tmp_path: Path
) -> None:
    old = tmp_path / "v1"
    shutil.copytree(tiny_shards["train4"], old)
    m = json.loads((old / "manifest.json").read_text())
    m["format_version"] = 1
    for s in m["shards"]:
        del s["index"], s["index_sha256"]
        (old / s["name"].replace(".tar", ".idx.json")).unlink()
    (old / "manifest.json").write_text(json.dumps(m))
    local = cfg(train_shards=str(tiny_shards["train4"]), shuffle_buffer=2)
    want = batches(build_train_loader(local, 0, 1, seed=0))
    for ranges in (True, False):
        with ShardServer(tmp_path, ranges=ranges) as srv:
            before = bytes_received()
            got = batches(build_train_loader(cfg(train_shards=srv.url("v1"), shuffle_buffer=2), 0, 1, seed=0))
            assert_same(got, want)
            largest = max(p.stat().st_size for p in old.glob("*.tar"))
            assert bytes_received() - before <= _shard_bytes(old) + largest


@pytest.mark.usefixtures("fresh_servers")
def test_a_server_that_starts_ignoring_range_mid_run_is_read_as_a_stream(
    tiny_shards: dict[str, Path],
) -> None:
    """Probed with Range support, then answering 200 (a proxy put in front of it): the reader notices at the
    first whole-file answer and goes on without error."""
    root = tiny_shards["train4"].parent.parent
    with ShardServer(root) as srv:
        spec = srv.url(_rel(tiny_shards, "train4"))
        shard_set = resolve_shards(spec)
        assert not shard_set.no_range
        srv.ranges = False
        reader = ShardReader(shard_set, RemoteOptions())
        first = shard_set.paths[0]
        keys = [r.key for r in reader.samples(first, 3, 6)] + [r.key for r in reader.samples(first, 6, 10)]
        reader.close()
        assert remote.ranges_ignored(first)
    in_tar = [key for key, _, _ in sample_ranges(tiny_shards["train4"] / "shard-000000.tar")]
    assert keys == in_tar[3:10]
