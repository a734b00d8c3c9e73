"""torchrun worker for tests/data/test_stream.py.

Each rank streams the training shards for a few epochs in DDP lock-step (one all_reduce per step, as DDP's
gradient sync does, so a rank with an extra step would block until the timeout), then reads each eval shard
set once. Rank 0 writes what every rank saw to --out as json.
"""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from dist_seg.config.schema import DataConfig
from dist_seg.data.loading.eval_loader import build_eval_loader
from dist_seg.data.loading.train_loader import build_train_loader


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train", required=True)
    p.add_argument("--eval", action="append", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    a = p.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        cfg = DataConfig(
            train_shards=a.train,
            crop_size=24,
            batch_size=a.batch,
            eval_batch_size=3,
            num_workers=a.workers,
            shuffle_buffer=8,
        )
        loader = build_train_loader(cfg, rank, world, seed=5)
        result: dict = {"steps_per_epoch": loader.steps_per_epoch, "epochs": [], "eval": {}}
        for epoch in range(a.epochs):
            loader.set_epoch(epoch)
            keys, steps = [], 0
            for batch in loader:
                assert batch.images.shape == (a.batch, 3, 24, 24) and batch.masks.dtype == torch.uint8
                dist.all_reduce(torch.ones(1))
                keys += batch.keys
                steps += 1
            result["epochs"].append({"steps": steps, "keys": keys})
        for spec in a.eval:
            ev = build_eval_loader(cfg, rank, world, size_divisor=32, min_size=32, shards=spec)
            result["eval"][spec] = [k for b in ev for k in b.keys]
        gathered: list = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            Path(a.out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
