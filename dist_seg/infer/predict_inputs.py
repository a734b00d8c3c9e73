"""What `dist-seg predict` reads: the list of images (a folder or a test json), their decoding into normalised
tensors split across ranks, test shards, and batching of equal-size images."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, read_file

from dist_seg.config.schema import Config
from dist_seg.data.loading.eval_loader import build_eval_loader
from dist_seg.data.loading.transforms import eval_transform
from dist_seg.infer.submission import expected_from_coco

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class Item:
    index: int  # position in this rank's input order
    image_id: str  # CSV image_id: the COCO file_name (or path relative to --images)
    out_rel: str  # output path relative to --out, without suffix
    image: Tensor  # uint8 [3, h, w] at the eval size (normalised on the device)
    orig_size: tuple[int, int]


def output_stem(name: str) -> str:
    """Output path (relative to --out, no suffix) of an input's relative path; never outside --out."""
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts:
        raise ValueError(f"image {name!r}: an absolute path or '..' would write outside --out")
    return str(p.with_suffix(""))


def list_folder(images: Path, coco: str | None, out: Path) -> list[str]:
    """Relative paths to predict, in order: the json's file_names, or every image below `images`, sorted."""
    if not images.is_dir():
        raise ValueError(f"--images {images}: not a directory")
    if coco is not None:
        names, _ = expected_from_coco(coco)
        for n in names:
            if not (images / n).is_file():
                raise ValueError(f"{coco}: image file_name {n!r} not found under --images {images}")
    else:
        out_r = out.resolve()
        names = sorted(
            p.relative_to(images).as_posix()
            for p in images.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and out_r not in p.resolve().parents
        )
        if not names:
            raise ValueError(f"--images {images}: no {'/'.join(IMAGE_SUFFIXES)} files found")
    stems: dict[str, str] = {}
    for n in names:
        stem = output_stem(n)
        if stem in stems:
            raise ValueError(f"{stems[stem]!r} and {n!r} would both be predicted to {stem}.png")
        stems[stem] = n
    return names


class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, root: Path, names: list[str], cfg: Config):
        self.root, self.names = root, names
        self.transform = eval_transform(cfg.data)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> Item:
        path = self.root / self.names[i]
        try:
            with warnings.catch_warnings():  # torchvision 0.29's TorchCodec notice, as in data/shards.py
                warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
                # EXIF rotation as `dist-seg convert` applies it, so masks align with the json's width/height
                img = decode_image(read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"cannot decode image {path}: {e}") from e
        x, _ = self.transform(img, None)
        return Item(i, self.names[i], output_stem(self.names[i]), x, (int(img.shape[-2]), int(img.shape[-1])))


def folder_items(
    root: Path, names: list[str], cfg: Config, rank: int, world_size: int
) -> tuple[Iterator[Item], int]:
    """This rank's contiguous part of `names` (decoded by data.num_workers workers) and its length."""
    a, b = rank * len(names) // world_size, (rank + 1) * len(names) // world_size
    ds = _FolderDataset(root, names[a:b], cfg)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=None,
        num_workers=cfg.data.num_workers,
        prefetch_factor=4 if cfg.data.num_workers else None,
    )
    return iter(loader), b - a


def shard_items(
    cfg: Config, spec: str, rank: int, world_size: int, divisor: int, min_size: int
) -> tuple[Iterator[Item], int]:
    loader = build_eval_loader(cfg.data, rank, world_size, divisor, min_size, shards=spec)

    def gen() -> Iterator[Item]:
        k = 0
        for batch in loader:
            for i, key in enumerate(batch.keys):
                h, w = batch.sizes[i]
                meta = batch.meta[i] or {}
                name = str(meta.get("file_name") or key)
                stem = output_stem(name) if meta.get("file_name") else key
                yield Item(k, name, stem, batch.images[i, :, :h, :w].clone(), batch.orig_sizes[i])
                k += 1

    return gen(), loader.num_samples


def grouped(items: Iterable[Item], batch_size: int, max_pending: int | None = None) -> Iterator[list[Item]]:
    """Batches of images of identical size, in arrival order as far as possible; a group waits for more
    images of its size until it is full or more than `max_pending` images wait in all groups together."""
    max_pending = max_pending or 4 * batch_size
    groups: dict[tuple[int, int], list[Item]] = {}
    pending = 0
    for it in items:
        key = (int(it.image.shape[-2]), int(it.image.shape[-1]))
        groups.setdefault(key, []).append(it)
        pending += 1
        if len(groups[key]) == batch_size:
            pending -= batch_size
            yield groups.pop(key)
        elif pending > max_pending:
            oldest = next(iter(groups))
            pending -= len(groups[oldest])
            yield groups.pop(oldest)
    yield from groups.values()
