"""Training-loader throughput from local shards vs the same shards over HTTP (loopback), from a server with and
one without Range requests, vs a warm local cache.

    python benchmarks/remote_loader.py                      # ../shared/data/trashcan_subset (train, 240 images)
    python benchmarks/remote_loader.py --dataset synth      # 200 synthetic 512x512 images (dist-seg synth)
    python benchmarks/remote_loader.py --passes 5 --crop 512

One loader process, one torch thread, data.num_workers=0: the figures are what one loader worker delivers.
The HTTP servers (tests/servers.py, no faults: one answering Range requests, one ignoring them as
`python -m http.server` does) run on 127.0.0.1 in a process of their own, as a remote server would (their time
is not in the figures; on a 2-core machine they have the other core). Each pass reads one epoch of
the training loader, built once per source (plan, ranged reads or tar seeks, per-sample sha256 check over HTTP, decode, the training
transforms, batching); passes of the three sources are interleaved and the best wall-clock rate of each is
kept. `--no-transform` drops the transforms, which makes the I/O share (and any overhead) largest.
The last line is machine-readable: http_vs_local=... http_no_range_vs_local=... cache_vs_local=...
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from servers import ShardServer  # noqa: E402

from dist_seg.config.schema import DataConfig  # noqa: E402
from dist_seg.data.loading.train_loader import build_train_loader  # noqa: E402
from dist_seg.data.prep.convert import ConvertOptions, convert  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


class _NoTransform:
    def apply(self, image, mask, rng, out, out_mask, *rest) -> None:
        pass


def make_loader(cfg: DataConfig, transform: bool):
    """Built once per source, as training does (shard checks and the manifest read are start-up costs)."""
    loader = build_train_loader(cfg, 0, 1, seed=0)
    if not transform:
        loader.dataset.transform = _NoTransform()
    return loader


def one_pass(loader, epoch: int) -> tuple[int, float]:
    loader.set_epoch(epoch)
    t0 = time.perf_counter()
    n = sum(len(b.keys) for b in loader)
    return n, time.perf_counter() - t0


def _serve(root: str, port_out, stop) -> None:
    with ShardServer(Path(root)) as server, ShardServer(Path(root), ranges=False) as no_range:
        port_out.send((server.port, no_range.port))
        stop.wait()


def prepare(dataset: str, tmp: Path) -> Path:
    out = tmp / "shards"
    if dataset == "trashcan":
        root = SHARED / "trashcan_subset"
        if not root.is_dir():
            raise SystemExit(f"{root} is absent: use --dataset synth")
        ann, images = root / "annotations/instances_train.json", root / "train"
    else:
        subprocess.run(
            [sys.executable, "-m", "dist_seg.cli", "synth", "--out", str(tmp / "synth"), "--images", "200"]
            + ["--val-images", "1", "--size", "512", "--seed", "0"],
            check=True,
            capture_output=True,
        )
        ann, images = tmp / "synth" / "train.json", tmp / "synth" / "images"
    convert(ConvertOptions(str(ann), str(images), str(out), min_shards=4, progress=False))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("trashcan", "synth"), default="trashcan")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--no-transform", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="dist-seg-remote-bench-"))
    try:
        shards = prepare(a.dataset, tmp)
        size_mb = sum(f.stat().st_size for f in shards.glob("shard-*.tar")) / 1e6
        base = dict(batch_size=8, num_workers=0, crop_size=a.crop, shuffle_buffer=64, pin_memory=False)
        ctx = mp.get_context("spawn")
        recv, send = ctx.Pipe(duplex=False)
        stop = ctx.Event()
        proc = ctx.Process(target=_serve, args=(str(tmp), send, stop), daemon=True)
        proc.start()
        try:
            port, no_range_port = recv.recv()
            url = f"http://127.0.0.1:{port}/shards"
            sources = {
                "local": DataConfig(train_shards=str(shards), **base),
                "http": DataConfig(train_shards=url, **base),
                "http-no-range": DataConfig(train_shards=f"http://127.0.0.1:{no_range_port}/shards", **base),
                "cache": DataConfig(train_shards=url, cache_dir=str(tmp / "cache"), **base),
            }
            loaders = {name: make_loader(cfg, not a.no_transform) for name, cfg in sources.items()}
            one_pass(loaders["cache"], 0)  # warm the cache
            best = dict.fromkeys(sources, 0.0)
            for epoch in range(a.passes):  # a new epoch each pass: other windows, other ranges
                for name, loader in loaders.items():
                    n, dt = one_pass(loader, epoch)
                    best[name] = max(best[name], n / dt)
        finally:
            stop.set()
            proc.join(timeout=10)
        print(
            f"dataset {a.dataset}: {n} samples/epoch, {size_mb:.1f} MB of shards, crop {a.crop}, transforms "
            f"{'off' if a.no_transform else 'on'}, best of {a.passes} interleaved passes, 1 thread, "
            f"{os.cpu_count()} cores"
        )
        for name, rate in best.items():
            print(f"  {name:13s} {rate:8.1f} samples/s")
        print(
            f"http_vs_local={best['http'] / best['local']:.3f} "
            f"http_no_range_vs_local={best['http-no-range'] / best['local']:.3f} "
            f"cache_vs_local={best['cache'] / best['local']:.3f}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
