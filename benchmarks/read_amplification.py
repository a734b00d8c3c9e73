"""Bytes the training loader reads per epoch and before the first step of a resume, against the shard's size.

    python benchmarks/read_amplification.py                       # 1,000 images at 768 px: one ~110 MB shard
    python benchmarks/read_amplification.py --dir /tmp/ra --keep  # keep the shards for the next run

One run, on `dist-seg synth` images converted to one shard of --images samples (generated under --dir, reused
when present, deleted at the end unless --keep), with data.num_workers=--workers loader workers:

  epoch      one whole pass (epoch 1, after a pass of epoch 0 that starts the persistent workers), at
             data.shuffle_buffer 64 and 256: bytes read by the process and its workers / shard bytes
             (goal <= 1.05: every sample's bytes once; the tar's end-of-archive blocks are
             not read, so a whole pass reads a little less than the shard file)
  resume(f)  a resume of epoch 1 at fraction f of it (0 = the epoch's start), as a new run makes it:
             bytes   read in this process (data.num_workers=0, so no worker reads ahead) up to its first
                     batch, the bytes of that batch's samples, and the rest in windows of
                     data.shuffle_buffer samples (goal <= 1: the window the batch comes from, nothing
                     before it);
             time    a fresh loader with --workers workers, from iter() to the end of the first optimizer
                     step (fcn8s, width 0.125, one SGD step), against the resume at 0 (best of --repeat)

Bytes are `rchar` of /proc/PID/io summed over this process and its loader workers (children): every byte a
read() returned, from the page cache or the disk. `read_bytes` counts only what reached the block device,
which is 0 for a shard in the page cache, so it cannot show a re-read; rchar counts reads of anything (a
worker reading /proc, this script reading its workers' /proc/PID/io), a few KB per measurement, which the
figures include. The shard's index (sample byte offsets) is read once per worker and shard (~70 KB here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_seg.config.schema import DataConfig, ModelConfig  # noqa: E402
from dist_seg.data.loading.train_loader import DataPosition, build_train_loader  # noqa: E402
from dist_seg.data.prep.convert import ConvertOptions, convert  # noqa: E402
from dist_seg.data.prep.synth.dataset import generate  # noqa: E402
from dist_seg.models import build_model  # noqa: E402

FRACTIONS = (0.0, 0.1, 0.5, 0.9)


def make_shards(root: Path, images: int, size: int) -> Path:
    """ROOT/shards: `images` synthetic images of `size` px in one shard (reused when already there)."""
    out = root / "shards"
    if (out / "manifest.json").is_file():
        m = json.loads((out / "manifest.json").read_text())
        if m["total_samples"] == images and len(m["shards"]) == 1:
            return out
    shutil.rmtree(root, ignore_errors=True)
    generate(root / "synth", images=images, val_images=0, size=size, seed=0)
    opts = ConvertOptions(
        str(root / "synth/train.json"), str(root / "synth/images"), str(out), samples_per_shard=images,
        progress=False,
    )  # fmt: skip
    convert(opts)
    shutil.rmtree(root / "synth")  # the images are in the shard now
    return out


def rchar() -> int:
    """Bytes read() returned to this process and its live children (the loader workers) so far."""
    pids = [os.getpid()]
    for task in Path("/proc/self/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    total = 0
    for pid in pids:
        try:
            io_lines = Path(f"/proc/{pid}/io").read_text().splitlines()
        except OSError:  # a worker that left meanwhile
            continue
        total += int(next(line for line in io_lines if line.startswith("rchar:")).split()[1])
    return total


def sample_bytes(shard: Path) -> dict[str, int]:
    """key -> bytes of its sample in the tar (headers and padded data), read with tarfile: independent of
    the loader and of the index."""
    sizes: dict[str, int] = {}
    with tarfile.open(shard) as tar:
        for m in tar:
            key = m.name.split(".", 1)[0]
            sizes[key] = sizes.get(key, 0) + m.offset_data - m.offset + -(-m.size // 512) * 512
    return sizes


def data_cfg(shards: Path, args: argparse.Namespace, window: int) -> DataConfig:
    return DataConfig(
        train_shards=str(shards), crop_size=args.crop, batch_size=args.batch_size, num_workers=args.workers,
        shuffle_buffer=window, pin_memory=False, persistent_workers=True,
    )  # fmt: skip


def epoch_ratio(shards: Path, args: argparse.Namespace, window: int, shard_bytes: int) -> tuple[float, float]:
    """(first pass, second pass) bytes read / shard bytes at data.shuffle_buffer=`window`."""
    loader = build_train_loader(data_cfg(shards, args, window), 0, 1, seed=0)
    ratios = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        before = rchar()
        n = 0
        for batch in loader:
            n += len(batch.keys)
        ratios.append((rchar() - before) / shard_bytes)
        assert n == loader.steps_per_epoch * args.batch_size
    del loader
    return ratios[0], ratios[1]


def resume_bytes(
    shards: Path, args: argparse.Namespace, fraction: float, sizes: dict[str, int]
) -> tuple[int, int, int]:
    """A resume of epoch 1 at `fraction`, read in this process: (bytes read up to its first batch, bytes of that
    batch's samples, the batch it resumed at)."""
    cfg = dataclasses.replace(data_cfg(shards, args, args.window), num_workers=0)
    loader = build_train_loader(cfg, 0, 1, seed=0)
    k = min(loader.steps_per_epoch - 1, int(fraction * loader.steps_per_epoch))
    loader.set_position(DataPosition(epoch=1, start_batch=k))
    before = rchar()
    batch = next(iter(loader))
    return rchar() - before, sum(sizes[key] for key in batch.keys), k


def first_step_seconds(
    shards: Path, args: argparse.Namespace, fraction: float, model: torch.nn.Module
) -> float:
    """Seconds from iter() of a fresh loader resuming epoch 1 at `fraction` to the end of its first step."""
    loader = build_train_loader(data_cfg(shards, args, args.window), 0, 1, seed=0)
    k = min(loader.steps_per_epoch - 1, int(fraction * loader.steps_per_epoch))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loader.set_position(DataPosition(epoch=1, start_batch=k))
    t0 = time.perf_counter()
    it = iter(loader)
    images, masks = next(it).model_input()
    F.cross_entropy(model(images), masks, ignore_index=255).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    del it, loader  # the workers leave
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/dist_seg_read_amplification"))
    p.add_argument("--keep", action="store_true", help="keep the generated shards for the next run")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--size", type=int, default=768, help="synthetic image size in px (768: ~110 KB a sample)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--window", type=int, default=64, help="data.shuffle_buffer of the resume measurements")
    p.add_argument("--repeat", type=int, default=3, help="resume timings: best of this many")
    args = p.parse_args()
    torch.set_num_threads(1)
    try:
        shards = make_shards(args.dir, args.images, args.size)
        shard = next(shards.glob("*.tar"))
        shard_bytes = shard.stat().st_size
        sizes = sample_bytes(shard)
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}"
        )
        print(
            f"shard: {len(sizes)} samples, {shard_bytes / 1e6:.1f} MB ({shard_bytes / len(sizes) / 1e3:.0f} KB a "
            f"sample); workers {args.workers}, batch {args.batch_size}, crop {args.crop}"
        )
        print(f"{'shuffle_buffer':>15} {'pass 1 read/shard':>18} {'pass 2 read/shard':>18}")
        worst = 0.0
        for window in (64, 256):
            first, second = epoch_ratio(shards, args, window, shard_bytes)
            worst = max(worst, first, second)
            print(f"{window:>15} {first:>18.3f} {second:>18.3f}")

        classes = json.loads((shards / "manifest.json").read_text())["num_classes"]
        model = build_model(ModelConfig(name="fcn8s", width_mult=0.125), classes)
        window_bytes = shard_bytes * args.window / len(sizes)  # a window of the shard's average samples
        seconds = dict.fromkeys(FRACTIONS, float("inf"))
        for _ in range(args.repeat):  # interleaved: the machine's speed drifts over minutes
            for f in FRACTIONS:
                seconds[f] = min(seconds[f], first_step_seconds(shards, args, f, model))
        print(
            f"resume (data.shuffle_buffer={args.window}: a window ~{window_bytes / 1e6:.1f} MB); first step with "
            f"{args.workers} workers, best of {args.repeat}:"
        )
        print(
            f"{'resume at':>10} {'batch':>6} {'read MB':>8} {'batch MB':>9} {'extra windows':>14} "
            f"{'first step s':>13} {'vs resume at 0':>15}"
        )
        worst_windows = 0.0
        for f in FRACTIONS:
            read, needed, k = resume_bytes(shards, args, f, sizes)
            extra = (read - needed) / window_bytes
            worst_windows = max(worst_windows, extra)
            print(
                f"{f:>9.0%} {k:>6} {read / 1e6:>8.2f} {needed / 1e6:>9.2f} {extra:>14.2f} {seconds[f]:>13.2f} "
                f"{seconds[f] / seconds[0.0]:>15.2f}"
            )
        print(f"epoch_read_ratio_max={worst:.3f} resume_extra_windows_max={worst_windows:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
