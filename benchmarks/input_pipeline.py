"""Input pipeline throughput per loader worker: shards vs webdataset vs an on-the-fly COCO baseline vs the decode
ceiling.

    python benchmarks/input_pipeline.py --dataset trashcan            # ../shared/data/trashcan_subset
    python benchmarks/input_pipeline.py --dataset synth --images 200  # polygon-rich 512x512 (dist_seg.data.prep.synth.dataset)
    python benchmarks/input_pipeline.py --dataset coco6 --repeat 40   # ../shared/data/icevision_coco6, repeated
    python benchmarks/input_pipeline.py --coco ANN.json --images DIR  # any COCO dataset
    python benchmarks/input_pipeline.py --augment MODULE:FACTORY      # data.augment vs a plain Dataset
                                                                      # (benchmarks/user_augment.py says what)

Everything runs in this one process with one torch thread, which is what a DataLoader worker gets, so each
figure is samples/s per worker (multiply by workers for a rank's ceiling on free cores). Measured in one run:
  (a)    this pipeline's host side, what a loader worker does: shards -> tar reading -> shuffle buffer ->
         decode -> train geometry (scale, crop, flip, pad) -> uint8 batches + per-sample colour rows
  (a-e2e) (a) plus the device side run here on the CPU (dist_seg.data.loading.colour.to_model_input: colour jitter +
         normalisation of the uint8 batch), so that moved work is not mistaken for removed work
  (a0)   the same with transforms off (decoded samples are not transformed): ratio_vs_decode = a0 / c
  (b)    baseline: map-style Dataset, pycocotools COCO json, per sample PIL decode + annToMask for every
         annotation painted largest-first (the competition baseline; it used cv2.imread) + the same transforms
  (b-tv) the baseline decoding with torchvision.io instead of PIL, to show what the decoder alone is worth
  (b0)   the baseline with transforms off
  (c)    decode-only ceiling: JPEG + PNG decode of the shard bytes already in memory, nothing else
  (w)    the peer: webdataset.WebDataset over the same shards as its users write it (shard shuffle, a
         shuffle buffer of data.shuffle_buffer samples, .decode, .map, .batched), with the same decoders
         (torchvision.io; the label map as one channel) and the same train geometry per sample
         (TrainTransform.apply into uint8 tensors, webdataset's collation stacking them)
  (w-e2e) (w) plus the same device side on the CPU as (a-e2e): a / w and a-e2e / w-e2e compare the two
Rates are samples per CPU second of this process (time.process_time), which other jobs on a shared machine
barely move, unlike wall-clock time (printed alongside); the best of the passes is printed per line. Ratios
are taken within each pass, between runs made next to each other, and their median over passes is reported.
The last line is machine-readable: ratio_vs_baseline=(a/b) ratio_vs_decode=(a0/c) end_to_end_vs_baseline=
(a-e2e/b) vs_webdataset=(a/w) end_to_end_vs_webdataset=(a-e2e/w-e2e), each the median over passes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, decode_png

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_seg.config.schema import DataConfig  # noqa: E402
from dist_seg.data.format.reader import read_samples  # noqa: E402
from dist_seg.data.format.shards import resolve_shards  # noqa: E402
from dist_seg.data.loading.colour import colour_range, to_model_input  # noqa: E402
from dist_seg.data.loading.train_loader import build_train_loader  # noqa: E402
from dist_seg.data.loading.transforms import TrainTransform  # noqa: E402
from dist_seg.data.prep.convert import ConvertOptions, convert  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


class CocoBaseline(Dataset):
    """Per-sample COCO reading as the competition baseline did it: decode, rasterise, transform."""

    def __init__(self, ann: Path, images: Path, cfg: DataConfig, transform: bool, decoder: str):
        self.coco, self.images = COCO(str(ann)), images
        self.ids = sorted(self.coco.getImgIds())
        cat_ids = sorted(self.coco.getCatIds())
        self.cls = {c: i + 1 for i, c in enumerate(cat_ids)}  # dist_seg's contiguous indices, 0 = background
        self.transform = TrainTransform(cfg) if transform else None
        self.decoder, self.rng = decoder, random.Random(0)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        info = self.coco.loadImgs(self.ids[i])[0]
        path = self.images / info["file_name"]
        if self.decoder == "pil":
            image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
        else:
            image = decode_image(
                torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), ImageReadMode.RGB
            )
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=info["id"], iscrowd=None))
        label = np.zeros((info["height"], info["width"]), np.uint8)
        for a in sorted(anns, key=lambda a: -a["area"]):
            label[self.coco.annToMask(a) == 1] = self.cls[a["category_id"]]
        mask = torch.from_numpy(label)
        if self.transform is None:
            return image, mask
        return self.transform(image, mask, self.rng)


class _NoTransform:
    def apply(self, image, mask, rng, out, out_mask, *rest):  # transforms off: the decoded sample is dropped
        return torch.zeros(4, 3), (0, 0)


def run_pipeline(cfg: DataConfig, transform: bool, device_side: bool = False) -> int:
    loader = build_train_loader(cfg, 0, 1, seed=0)
    if not transform:  # everything else as in (a): plan, tar reading, shuffle buffer, decoding, batching
        loader.dataset.transform = _NoTransform()
    n = 0
    for b in loader:
        if device_side:
            b.model_input()
        n += len(b.keys)
    return n


def run_baseline(ds: CocoBaseline, batch: int) -> int:
    n = 0
    if ds.transform is None:  # variable sizes: no stacking
        for i in torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist():
            ds[i]
            n += 1
        return n
    loader = DataLoader(
        ds, batch_size=batch, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)
    )
    for images, masks in loader:
        masks.long()
        n += images.shape[0]
    return n


def run_webdataset(urls: list[str], cfg: DataConfig, device_side: bool = False) -> int:
    """The shards read by webdataset, as (w) in the module docstring says; the number of samples batched."""
    import webdataset as wds

    transform, rng, crop = TrainTransform(cfg), random.Random(0), cfg.crop_size
    clip = colour_range(cfg.mean, cfg.std) if cfg.color_jitter > 0 else None

    def image(data: bytes) -> torch.Tensor:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)

    def label(data: bytes) -> torch.Tensor:
        return decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.GRAY)[0]

    def augment(sample: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = torch.empty(3, crop, crop, dtype=torch.uint8)
        out_mask = torch.empty(crop, crop, dtype=torch.uint8)
        colour, size = transform.apply(*sample, rng, out, out_mask)
        return out, out_mask, colour, torch.tensor(size)

    dataset = (
        wds.WebDataset(urls, shardshuffle=len(urls), seed=0)
        .shuffle(cfg.shuffle_buffer, rng=random.Random(0))
        .decode(wds.handle_extension("seg.png", label), wds.handle_extension("jpg jpeg png", image))
        .to_tuple("jpg;jpeg;png", "seg.png")
        .map(augment)
        .batched(cfg.batch_size, partial=False)
    )
    n = 0
    for images, masks, colour, sizes in dataset:
        if device_side:
            to_model_input(images, colour, sizes, clip=clip)
            masks.long()  # as TrainBatch.model_input does
        n += images.shape[0]
    return n


def run_decode(blobs: list[tuple[bytes, bytes]]) -> int:
    for img, seg in blobs:
        decode_image(torch.frombuffer(bytearray(img), dtype=torch.uint8), ImageReadMode.RGB)
        decode_png(torch.frombuffer(bytearray(seg), dtype=torch.uint8), ImageReadMode.GRAY)
    return len(blobs)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def prepare(args: argparse.Namespace, tmp: Path) -> tuple[str, Path, Path]:
    if args.coco:
        return "custom", Path(args.coco), Path(args.images_dir)
    if args.dataset == "trashcan":
        root = SHARED / "trashcan_subset"
        if not root.is_dir():
            sys.exit(f"{root} is absent")
        return (
            "trashcan_subset (train, 480x270, RLE)",
            root / "annotations/instances_train.json",
            root / "train",
        )
    if args.dataset == "coco6":  # real COCO photos, ~6 polygons each, repeated to a measurable size
        root = SHARED / "icevision_coco6"
        if not root.is_dir():
            sys.exit(f"{root} is absent")
        coco = json.loads((root / "annotations.json").read_text())
        n = len(coco["images"])
        images = [dict(im, id=r * 10_000 + im["id"]) for r in range(args.repeat) for im in coco["images"]]
        anns = [
            dict(a, id=r * 1_000_000 + a["id"], image_id=r * 10_000 + a["image_id"])
            for r in range(args.repeat)
            for a in coco["annotations"]
        ]
        (tmp / "coco6.json").write_text(json.dumps(dict(coco, images=images, annotations=anns)))
        return (
            f"icevision_coco6 x{args.repeat} ({n} COCO val2017 photos)",
            tmp / "coco6.json",
            root / "images",
        )
    from dist_seg.data.prep.synth.dataset import generate

    g = generate(tmp / "synth", images=args.images, val_images=0, size=512, seed=0)
    return f"synth ({args.images} images, 512x512, polygons)", g["train_json"], g["images_dir"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=("trashcan", "synth", "coco6"), default="trashcan")
    p.add_argument("--repeat", type=int, default=40, help="coco6: copies of the 6 images")
    p.add_argument("--coco", help="COCO json (instead of --dataset)")
    p.add_argument("--images-dir", help="image directory of --coco")
    p.add_argument("--images", type=int, default=200, help="synthetic images to generate")
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--passes", type=int, default=6)
    p.add_argument("--augment", metavar="MODULE:FACTORY", help="data.augment vs a plain Dataset instead")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        name, ann, images = prepare(args, tmp)
        meta = json.loads(ann.read_text())
        n_img, n_ann = len(meta["images"]), len(meta.get("annotations", []))
        polys = sum(isinstance(a["segmentation"], list) for a in meta.get("annotations", []))
        convert(
            ConvertOptions(str(ann), str(images), str(tmp / "shards"), samples_per_shard=64, progress=False)
        )
        cfg = DataConfig(
            train_shards=str(tmp / "shards"), crop_size=args.crop, batch_size=args.batch, num_workers=0
        )
        if args.augment:  # the user-pipeline comparison, on the same shards (benchmarks/user_augment.py)
            import user_augment

            machine = f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread"
            about = [f"dataset: {name}: {n_img} images", f"{machine}; crop {args.crop}, batch {args.batch}"]
            user_augment.main(args, cfg, tmp, [*about, f"best of {args.passes} passes"])
            return
        blobs = []
        shard_paths = resolve_shards(cfg.train_shards).paths
        for path in shard_paths:
            for raw in read_samples(path):
                ext = next(e for e in ("jpg", "jpeg", "png") if e in raw.members)
                blobs.append((raw.members[ext], raw.members["seg.png"]))
        runs = {
            "a": lambda: run_pipeline(cfg, True),
            "a-e2e": lambda: run_pipeline(cfg, True, device_side=True),
            "a0": lambda: run_pipeline(cfg, False),
            "b": lambda: run_baseline(CocoBaseline(ann, images, cfg, True, "pil"), args.batch),
            "b-tv": lambda: run_baseline(CocoBaseline(ann, images, cfg, True, "tv"), args.batch),
            "b0": lambda: run_baseline(CocoBaseline(ann, images, cfg, False, "pil"), args.batch),
            "c": lambda: run_decode(blobs),
            "w": lambda: run_webdataset(shard_paths, cfg),
            "w-e2e": lambda: run_webdataset(shard_paths, cfg, device_side=True),
        }
        best: dict[str, float] = {}  # samples per CPU second
        best_wall: dict[str, float] = {}
        ratios: dict[str, list[float]] = {"a/b": [], "a0/c": [], "a-e2e/b": [], "a/w": [], "a-e2e/w-e2e": []}
        for fn in runs.values():  # warm-up: imports, page cache, pycocotools index
            fn()
        # each ratio's two terms run next to each other, in the opposite order on every other pass, and each
        # ratio is taken within a pass: this machine's speed drifts by +-20% over seconds, which a ratio of
        # two bests from different moments would carry; the median over passes is what the last line prints
        order = ["a", "w", "b", "a-e2e", "w-e2e", "a0", "c", "b-tv", "b0"]
        for i in range(args.passes):
            rate: dict[str, float] = {}
            for k in order if i % 2 == 0 else order[::-1]:
                t0, c0 = time.perf_counter(), time.process_time()
                n = runs[k]()
                rate[k] = n / (time.process_time() - c0)
                best[k] = max(best.get(k, 0.0), rate[k])
                best_wall[k] = max(best_wall.get(k, 0.0), n / (time.perf_counter() - t0))
            for r in ratios:
                top, bottom = r.split("/")
                ratios[r].append(rate[top] / rate[bottom])
    print(
        f"dataset: {name}: {n_img} images, {n_ann / max(1, n_img):.1f} annotations/image, {polys / max(1, n_ann):.0%} polygons"
    )
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread; crop {args.crop}, batch {args.batch}, best of {args.passes}"
    )
    labels = {
        "a": "(a) pipeline, host side (uint8 geometry)",
        "a-e2e": "(a-e2e) pipeline, host + device side on this CPU",
        "a0": "(a0) pipeline, transforms off",
        "b": "(b) COCO baseline (PIL), train transforms",
        "b-tv": "(b-tv) COCO baseline (torchvision.io), train transforms",
        "b0": "(b0) COCO baseline (PIL), transforms off",
        "c": "(c) decode only (JPEG + PNG)",
        "w": "(w) webdataset.WebDataset, same decoders and geometry",
        "w-e2e": "(w-e2e) webdataset, host + device side on this CPU",
    }
    for k, label in labels.items():
        print(f"{label:58s} {best[k]:8.1f} samples/s per worker  (wall clock: {best_wall[k]:6.1f})")
    med = {r: statistics.median(v) for r, v in ratios.items()}
    print(
        f"host ms/sample (best): pipeline {1e3 / best['a']:.2f}, with the device side on CPU "
        f"{1e3 / best['a-e2e']:.2f}, baseline {1e3 / best['b']:.2f}"
    )
    print(f"pipeline vs baseline decoding with torchvision.io (bests): {best['a'] / best['b-tv']:.2f}x")
    print(f"transforms off, pipeline vs baseline (bests): {best['a0'] / best['b0']:.2f}x")
    for r, v in ratios.items():
        print(f"{r} per pass: {' '.join(f'{x:.2f}' for x in v)}; median {med[r]:.2f}")
    print(
        f"ratio_vs_baseline={med['a/b']:.2f} ratio_vs_decode={med['a0/c']:.2f} end_to_end_vs_baseline={med['a-e2e/b']:.2f}"
        f" vs_webdataset={med['a/w']:.2f} end_to_end_vs_webdataset={med['a-e2e/w-e2e']:.2f}"
    )


if __name__ == "__main__":
    main()
