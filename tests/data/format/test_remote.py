"""Shards at URLs (dist_seg.data.format.remote and the loaders over it), against real servers on 127.0.0.1: an HTTP
server with Range requests and injected faults (tests/servers.py) and moto's S3-compatible server.

What users rely on: a URL reads exactly what the local directory reads; a reader fetches only its range; a
connection reset mid-shard is retried and counted, and training completes; a corrupted byte, a missing shard
and a stalled server are errors naming the URL (never a silent sample, never a hang); the cache is named by
content, verified and bounded; `dist-seg convert --out s3://...` publishes a readable dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from launch_utils import REPO
from servers import url
from tiny_shards import assert_same, batches, cfg, epoch_keys

from dist_seg.data.format.reader import ShardReader
from dist_seg.data.format.remote import RemoteOptions
from dist_seg.data.format.shards import ShardError, resolve_shards
from dist_seg.data.loading.eval_loader import build_eval_loader
from dist_seg.data.loading.train_loader import build_train_loader
from dist_seg.runtime.preemption import StopRequest
from dist_seg.train.tensorboard import read_scalars


def test_url_directory_and_brace_pattern_read_what_the_local_directory_reads(server, tiny_shards) -> None:
    local = tiny_shards["train4"]
    base = url(server, tiny_shards, "train4")
    want = batches(build_train_loader(cfg(train_shards=str(local)), 0, 1, seed=3), epoch=1)
    for spec in (base, base + "/", base + "/shard-{000000..000003}.tar"):
        shard_set = resolve_shards(spec)
        assert shard_set.paths == [f"{base}/shard-{i:06d}.tar" for i in range(4)]  # the `//` is kept
        assert_same(batches(build_train_loader(cfg(train_shards=spec), 0, 1, seed=3), epoch=1), want)
    # evaluation: every sample once, same tensors as from the local directory
    ev_local = build_eval_loader(cfg(val_shards=str(tiny_shards["eval5"])), 0, 1, 8, 8)
    ev_url = build_eval_loader(cfg(val_shards=url(server, tiny_shards, "eval5")), 0, 1, 8, 8)
    a = [(b.keys, b.images, b.masks) for b in ev_local]
    b = [(b.keys, b.images, b.masks) for b in ev_url]
    assert_same(a, b)
    assert sum(len(k) for k, _, _ in b) == 23


def test_two_ranks_over_http_split_one_epoch_exactly_and_fetch_only_their_range(server, tiny_shards) -> None:
    spec = url(server, tiny_shards, "u19")  # one shard of 19 samples, read by two ranks
    keys = []
    for rank in (0, 1):
        loader = build_train_loader(cfg(train_shards=spec, batch_size=3), rank, 2, seed=0)
        steps, k = epoch_keys(loader, 0)
        assert steps == len(loader) == 3  # equal steps on every rank: 19 // (3 x 2)
        keys.append(k)
    assert not set(keys[0]) & set(keys[1]) and len(set(keys[0] + keys[1])) == 18
    shard = tiny_shards["u19"] / "shard-000000.tar"
    rel = str(shard.relative_to(server.root))
    # both ranks together fetched about the samples they used, not the shard twice
    assert server.body_bytes[rel] < 1.3 * shard.stat().st_size, (server.body_bytes[rel], shard.stat().st_size)


def test_connection_reset_mid_shard_is_retried_counted_and_training_completes(server, tiny_shards) -> None:
    spec = url(server, tiny_shards, "train4")
    want = batches(build_train_loader(cfg(train_shards=str(tiny_shards["train4"])), 0, 1, seed=0))
    server.reset["shard-000001.tar"] = 2  # two responses cut in half, then a TCP reset
    loader = build_train_loader(cfg(train_shards=spec), 0, 1, seed=0)
    assert_same(batches(loader), want)
    assert loader.remote_retries == 2
    assert server.reset["shard-000001.tar"] == 0


def test_training_run_counts_remote_retries_in_tensorboard(server, tiny_shards, tmp_path: Path) -> None:
    from dist_seg.config.loading import load_config
    from dist_seg.config.schema import Config
    from dist_seg.runtime.distributed import World
    from dist_seg.train.loop import fit

    server.reset["shard-000002.tar"] = 1
    out = tmp_path / "run"
    cfg_ = load_config(
        REPO / "configs/cpu_small.yaml",
        [
            f"data.train_shards={url(server, tiny_shards, 'train4')}",
            f"data.val_shards={url(server, tiny_shards, 'eval1')}",
            f"train.out_dir={out}",
            "data.crop_size=32",
            "model.name=fcn8s",
            "train.max_steps=6",
            "train.log_every=3",
            "train.eval_every=6",
            "data.batch_size=4",
        ],
    )
    assert isinstance(cfg_, Config)
    fit(cfg_, World(0, 0, 1, torch.device("cpu"), None))
    retries = [v for _, v in read_scalars(out / "tb")["train/remote_retries"]]
    assert retries[-1] == 1


def test_corrupted_bytes_are_an_error_naming_the_url_and_the_shard(server, tiny_shards) -> None:
    spec = url(server, tiny_shards, "train4")
    index = json.loads((tiny_shards["train4"] / "shard-000002.idx.json").read_text())
    server.corrupt["shard-000002.tar"] = index["offsets"][3] + 700  # inside sample #3's bytes
    loader = build_train_loader(cfg(train_shards=spec), 0, 1, seed=0)
    with pytest.raises(ShardError, match=r"shard-000002\.tar: sample #3 .*sha256") as e:
        batches(loader)
    assert f"{spec}/shard-000002.tar" in str(e.value)
    # with on_error=skip the sample is counted and dropped, the epoch keeps its steps
    loader = build_train_loader(cfg(train_shards=spec, on_error="skip"), 0, 1, seed=0)
    got = batches(loader)
    assert len(got) == len(loader) and loader.skipped >= 1


def test_missing_shard_is_an_error_before_the_first_step(server, tiny_shards) -> None:
    spec = url(server, tiny_shards, "train4")
    server.missing.add("shard-000002.tar")
    with pytest.raises(ValueError, match=r"shard-000002\.tar is listed in its manifest but does not exist"):
        build_train_loader(cfg(train_shards=spec), 0, 1, seed=0)
    with pytest.raises(
        ValueError, match=r"no manifest\.json at http://127\.0\.0\.1:\d+/nowhere/manifest\.json"
    ):
        resolve_shards(server.url("nowhere"))


def test_stalled_server_is_a_timeout_error_not_a_hang(server, tiny_shards) -> None:
    spec = url(server, tiny_shards, "train4")
    loader = build_train_loader(cfg(train_shards=spec, remote_timeout_s=0.5, remote_retries=1), 0, 1, seed=0)
    server.stall.update({f"shard-{i:06d}.tar" for i in range(4)})
    with pytest.raises(ShardError, match=r"still failing after 1 retries: .*Timeout") as e:
        batches(loader)
    assert spec in str(e.value)


def test_cache_is_named_by_content_verified_reused_and_bounded(server, tiny_shards, tmp_path: Path) -> None:
    spec = url(server, tiny_shards, "train4")
    cache = tmp_path / "cache"
    want = batches(build_train_loader(cfg(train_shards=str(tiny_shards["train4"])), 0, 1, seed=0))
    loader = build_train_loader(cfg(train_shards=spec, cache_dir=str(cache)), 0, 1, seed=0)
    assert_same(batches(loader), want)
    manifest = json.loads((tiny_shards["train4"] / "manifest.json").read_text())
    names = sorted(p.name for p in cache.glob("*/*.tar"))
    assert names == sorted(f"{s['sha256']}.tar" for s in manifest["shards"])
    fetched = sum(server.body_bytes.values())
    assert_same(batches(loader), want)  # a second pass is served from the cache
    assert sum(server.body_bytes.values()) == fetched
    # a corrupted download never enters the cache
    shutil.rmtree(cache)
    server.corrupt["shard-000001.tar"] = 2000
    with pytest.raises(ShardError, match=r"shard-000001\.tar: downloaded .* sha256 .* changed or corrupted"):
        batches(build_train_loader(cfg(train_shards=spec, cache_dir=str(cache)), 0, 1, seed=0))
    assert not (
        cache / manifest["shards"][1]["sha256"][:2] / f"{manifest['shards'][1]['sha256']}.tar"
    ).exists()
    # bounded: below one shard's size only the newest file stays, and reading still works
    del server.corrupt["shard-000001.tar"]
    loader = build_train_loader(cfg(train_shards=spec, cache_dir=str(cache), cache_max_gb=1e-6), 0, 1, seed=0)
    assert_same(batches(loader), want)
    assert len(list(cache.glob("*/*.tar"))) == 1


def test_format_version_1_directories_still_read_over_http(server, tiny_shards, tmp_path: Path) -> None:
    old = server.root / "v1"
    shutil.copytree(tiny_shards["train4"], old)
    m = json.loads((old / "manifest.json").read_text())
    m["format_version"] = 1
    for s in m["shards"]:
        del s["index"], s["index_sha256"]
        (old / s["name"].replace(".tar", ".idx.json")).unlink()
    (old / "manifest.json").write_text(json.dumps(m))
    want = batches(build_train_loader(cfg(train_shards=str(tiny_shards["train4"])), 0, 1, seed=0))
    assert_same(batches(build_train_loader(cfg(train_shards=server.url("v1")), 0, 1, seed=0)), want)
    shutil.rmtree(old)


def test_credentials_in_urls_are_refused_and_never_printed() -> None:
    with pytest.raises(ValueError, match="carries a password") as e:
        resolve_shards("https://alice:s3cret@example.invalid/shards")
    assert "s3cret" not in str(e.value) and "alice" not in str(e.value)


def test_reader_checks_the_index_against_the_manifest(server, tiny_shards, tmp_path: Path) -> None:
    d = server.root / "badindex"
    shutil.copytree(tiny_shards["train4"], d)
    (d / "shard-000000.idx.json").write_text((d / "shard-000001.idx.json").read_text())
    shard_set = resolve_shards(server.url("badindex"))
    reader = ShardReader(shard_set, RemoteOptions())
    with pytest.raises(ShardError, match=r"shard index .*shard-000000\.idx\.json: sha256 differs"):
        list(reader.samples(shard_set.paths[0], 0, 2))
    shutil.rmtree(d)


def test_loader_workers_reading_urls_outlive_a_stop_signal(server, tiny_shards) -> None:
    """Shards over HTTP (fsspec and aiohttp running in each loader worker) with a stop signal sent to the
    workers from outside mid-pass, as torchrun and SLURM deliver it: the pass goes on to its end with the
    batches an undisturbed pass yields (the rank then checkpoints at its step boundary)."""
    spec = url(server, tiny_shards, "train4")
    want = [
        keys for keys, _, _ in batches(build_train_loader(cfg(train_shards=spec, num_workers=2), 0, 1, 0))
    ]
    stop = StopRequest([signal.SIGTERM, signal.SIGUSR1])
    try:
        loader = build_train_loader(cfg(train_shards=spec, num_workers=2), 0, 1, seed=0)
        loader.set_epoch(0)
        it = iter(loader)
        got = [next(it).keys]
        children = subprocess.run(
            ["pgrep", "-P", str(os.getpid())], capture_output=True, text=True, timeout=30
        )
        workers = children.stdout.split()
        assert len(workers) == 2, children.stdout  # the loader's two workers
        for sig in ("TERM", "USR1"):  # from another process, not the workers' parent
            subprocess.run(["kill", f"-{sig}", *workers], check=True, timeout=30)
        got += [b.keys for b in it]
    finally:
        stop.close()
    assert got == want and not stop.requested
