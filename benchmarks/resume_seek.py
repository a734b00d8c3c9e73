"""Time to the first training batch after a resume at 10%, 50% and 90% of an epoch, against the epoch's start.

    python benchmarks/resume_seek.py                      # 480 synthetic 224x224 images, batch 8
    python benchmarks/resume_seek.py --images 960 --workers 1

A resume hands the loader its position (dist_seg.data.loading.train_loader.DataPosition): each reader computes where its
span continues, seeks with the shard's index to the first sample of that window (the bytes before it are not
read, nothing before it is decoded) and reads only that window. This times the first batch on small shards;
benchmarks/read_amplification.py counts the bytes a resume reads and times the first optimizer step on a
shard of 1,000 samples and ~100 MB. Measured in one run, interleaved, best of --repeat:
  seek(f)    first batch of a pass that starts at fraction f of the epoch (what a resume does now)
  replay(f)  first batch at f by iterating the pass from its start (what a resume did before: every
             consumed batch read, decoded and augmented again)
The goal is seek(f) / seek(0) flat (within noise) for every f; replay grows with f. The last line is
machine-readable: seek_ratio_at_90=... replay_ratio_at_90=...
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from synthetic_shards import synthetic_shards  # noqa: E402

from dist_seg.config.schema import DataConfig  # noqa: E402
from dist_seg.data.loading.train_loader import DataPosition, build_train_loader  # noqa: E402

FRACTIONS = (0.0, 0.1, 0.5, 0.9)


def _first_batch(loader, start_batch: int, replay: bool) -> float:
    t0 = time.perf_counter()
    if replay:
        loader.set_position(DataPosition(epoch=0))
        it = iter(loader)
        for _ in range(start_batch + 1):
            next(it)
    else:
        loader.set_position(DataPosition(epoch=0, start_batch=start_batch))
        next(iter(loader))
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=480)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="data.num_workers (0: read in this process)")
    p.add_argument("--shuffle-buffer", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        shards = synthetic_shards(Path(tmp), args.images)
        cfg = DataConfig(
            train_shards=str(shards), crop_size=224, batch_size=args.batch_size, num_workers=args.workers,
            shuffle_buffer=args.shuffle_buffer, pin_memory=False,
        )  # fmt: skip
        loader = build_train_loader(cfg, 0, 1, seed=0)
        steps = loader.steps_per_epoch
        starts = {f: min(steps - 1, int(f * steps)) for f in FRACTIONS}
        best: dict[tuple[str, float], float] = {}
        for _ in range(args.repeat):
            for f, k in starts.items():
                for mode in ("seek", "replay"):
                    dt = _first_batch(loader, k, mode == "replay")
                    best[mode, f] = min(best.get((mode, f), float("inf")), dt)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(f"{args.images} images, batch {args.batch_size}, {steps} batches per epoch, workers {args.workers}, "
          f"window {args.shuffle_buffer}; best of {args.repeat}")  # fmt: skip
    print(
        f"{'resume at':>10} {'batch':>6} {'seek s':>8} {'seek/seek(0)':>13} {'replay s':>9} {'replay/seek(0)':>15}"
    )
    base = best["seek", 0.0]
    for f, k in starts.items():
        s, r = best["seek", f], best["replay", f]
        print(f"{f:>9.0%} {k:>6} {s:>8.3f} {s / base:>13.2f} {r:>9.3f} {r / base:>15.2f}")
    print(
        f"seek_ratio_at_90={best['seek', 0.9] / base:.2f} replay_ratio_at_90={best['replay', 0.9] / base:.2f}"
    )


if __name__ == "__main__":
    main()
