"""`data.augment` throughput per loader worker: the loader with a user pipeline vs the plain Dataset a user
would write for the same pipeline. Run through benchmarks/input_pipeline.py:

    python benchmarks/input_pipeline.py --augment dist_seg.data.loading.augment_recipes:albumentations_common
    python benchmarks/input_pipeline.py --augment dist_seg.data.loading.augment_recipes:torchvision_rotate

Everything runs in this one process with one torch thread and one OpenCV thread, as a DataLoader worker
has, so each figure is samples/s per worker. Measured in one run, over the same samples (the shards' own
JPEG and label PNG bytes, extracted to files for the plain Dataset):
  (a)     the loader without data.augment: the fast path, host side
  (u)     the loader with data.augment=SPEC, host side: decode, the user pipeline on the whole image (with
          its checks and coverage plane), the built-in scale/crop/flip/padding on uint8, the colour rows
  (u-e2e) (u) plus the device side run here on the CPU (colour step, normalisation, uncovered pixels zeroed)
  (p)     the plain Dataset: map-style, a file pair per sample read with the library's own idiom
          (albumentations: cv2.imread; torchvision: torchvision.io), SPEC's pipeline, then the built-in
          augmentation written with the same library (scale 0.5-2, pad to the crop with 0 / 255, random crop,
          flip, colour jitter 0.2, normalisation to float), batched by a DataLoader (default collate), the
          labels made int64 as the trainer needs them. SPEC's pipeline is seeded per sample as the loader
          seeds it, so both do the same draws and the same work (which samples get an elastic distortion is
          not left to luck)
Rates are samples per CPU second (time.process_time); the best of the passes per line, the ratios u/p,
u-e2e/p and u/a taken within each pass (runs next to each other, order alternating), their median last.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dist_seg.config.schema import DataConfig
from dist_seg.data import IGNORE_INDEX
from dist_seg.data.format.reader import read_samples
from dist_seg.data.format.shards import resolve_shards
from dist_seg.data.loading.augment import load_pipeline, pipeline_kind, sample_seeds
from dist_seg.data.loading.train_loader import build_train_loader


class PlainDataset(Dataset):
    """What a user writes for SPEC without this loader: read the files, the library's transforms, floats."""

    def __init__(self, pairs: list[tuple[Path, Path]], spec: str, cfg: DataConfig, short_side: int) -> None:
        self.pairs = pairs
        self.user = user = load_pipeline(spec)
        self.kind = pipeline_kind(user, spec)
        crop, lo, hi = cfg.crop_size, cfg.scale_min, cfg.scale_max
        j = cfg.color_jitter
        if self.kind == "albumentations":
            import albumentations as A
            import cv2
            from albumentations.pytorch import ToTensorV2

            self.rest: Callable[..., Any] = A.Compose(
                [
                    A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), p=1.0),
                    A.PadIfNeeded(
                        crop, crop, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX
                    ),
                    A.RandomCrop(crop, crop),
                    A.HorizontalFlip(p=cfg.hflip_prob),
                    A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0.0, p=1.0),
                    A.Normalize(mean=cfg.mean, std=cfg.std),
                    ToTensorV2(),
                ]
            )
        else:
            from torchvision import tv_tensors
            from torchvision.transforms import v2

            self.tv = tv_tensors
            # torchvision's segmentation reference: the shorter side resized at random, then a padded crop
            self.rest = v2.Compose(
                [
                    v2.RandomResize(round(lo * short_side), round(hi * short_side)),
                    v2.RandomCrop(
                        crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
                    ),
                    v2.RandomHorizontalFlip(cfg.hflip_prob),
                    v2.ColorJitter(brightness=j, contrast=j, saturation=j),
                    v2.ToDtype(torch.float32, scale=True),
                    v2.Normalize(mean=cfg.mean, std=cfg.std),
                ]
            )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.pairs[i]
        seeds = sample_seeds(0, 0, i)  # the loader's, at seed 0, epoch 0: i is the sample's id
        if self.kind == "albumentations":
            import cv2

            image = cv2.cvtColor(cv2.imread(str(image_path)), cv2.COLOR_BGR2RGB)
            self.user.set_random_state(
                np.random.Generator(np.random.PCG64(seeds[3])), random.Random(seeds[3])
            )
            out = self.user(image=image, mask=cv2.imread(str(label_path), cv2.IMREAD_GRAYSCALE))
            out = self.rest(image=out["image"], mask=out["mask"])
            return out["image"], out["mask"]
        from torchvision.io import ImageReadMode, decode_image, read_file

        image = decode_image(read_file(str(image_path)), ImageReadMode.RGB)
        label = decode_image(read_file(str(label_path)), ImageReadMode.GRAY)[0]
        torch.manual_seed(seeds[0])
        return self.rest(*self.user(self.tv.Image(image), self.tv.Mask(label)))


def run_loader(cfg: DataConfig, device_side: bool = False) -> int:
    n = 0
    for b in build_train_loader(cfg, 0, 1, seed=0):
        if device_side:
            b.model_input()
        n += len(b.keys)
    return n


def run_plain(ds: PlainDataset, batch: int) -> int:
    n = 0
    loader = DataLoader(
        ds, batch_size=batch, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)
    )
    for images, labels in loader:
        labels.long()
        n += images.shape[0]
    return n


def extract(shards: str, out: Path) -> tuple[list[tuple[Path, Path]], int]:
    """The shards' image and label bytes as files (the plain Dataset's input) and the median shorter side."""
    out.mkdir(parents=True, exist_ok=True)
    pairs, shorter = [], []
    for path in resolve_shards(shards).paths:
        for raw in read_samples(path):
            ext = next(e for e in ("jpg", "jpeg", "png") if e in raw.members)
            image, label = out / f"{raw.key}.{ext}", out / f"{raw.key}.seg.png"
            image.write_bytes(raw.members[ext])
            label.write_bytes(raw.members["seg.png"])
            pairs.append((image, label))
            h, w = np.asarray(_png_size(raw.members["seg.png"]))
            shorter.append(min(h, w))
    return pairs, int(statistics.median(shorter))


def _png_size(data: bytes) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk."""
    return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")


def main(args: argparse.Namespace, cfg: DataConfig, tmp: Path, describe: list[str]) -> None:
    """The --augment section of benchmarks/input_pipeline.py: cfg is its config over the converted shards."""
    import cv2

    cv2.setNumThreads(1)
    random.seed(0)
    pairs, short_side = extract(cfg.train_shards, tmp / "files")  # type: ignore[arg-type]
    augmented = DataConfig(**{**vars(cfg), "augment": args.augment})
    plain = PlainDataset(pairs, args.augment, cfg, short_side)
    runs = {
        "a": lambda: run_loader(cfg),
        "u": lambda: run_loader(augmented),
        "u-e2e": lambda: run_loader(augmented, device_side=True),
        "p": lambda: run_plain(plain, args.batch),
    }
    for fn in runs.values():  # warm-up: imports, page cache
        fn()
    best: dict[str, float] = {}
    ratios: dict[str, list[float]] = {"u/p": [], "u-e2e/p": [], "u/a": []}
    order = ["u", "p", "u-e2e", "a"]
    for i in range(args.passes):
        rate = {}
        for k in order if i % 2 == 0 else order[::-1]:
            c0 = time.process_time()
            n = runs[k]()
            rate[k] = n / (time.process_time() - c0)
            best[k] = max(best.get(k, 0.0), rate[k])
        for r in ratios:
            top, bottom = r.split("/")
            ratios[r].append(rate[top] / rate[bottom])
    for line in describe:
        print(line)
    print(
        f"augment: {args.augment} ({plain.kind}); plain Dataset: {len(pairs)} file pairs, short {short_side}"
    )
    labels = {
        "a": "(a) loader, no data.augment (host side)",
        "u": "(u) loader with data.augment (host side)",
        "u-e2e": "(u-e2e) loader with data.augment, host + device side on CPU",
        "p": f"(p) plain {plain.kind} Dataset, same pipeline + built-ins",
    }
    for k, label in labels.items():
        print(f"{label:62s} {best[k]:8.1f} samples/s per worker  ({1e3 / best[k]:6.2f} ms/sample)")
    med = {r: statistics.median(v) for r, v in ratios.items()}
    for r, v in ratios.items():
        print(f"{r} per pass: {' '.join(f'{x:.2f}' for x in v)}; median {med[r]:.2f}")
    print(
        f"augment_vs_plain={med['u/p']:.2f} end_to_end_vs_plain={med['u-e2e/p']:.2f} "
        f"augment_vs_fast_path={med['u/a']:.2f}"
    )
