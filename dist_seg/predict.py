"""Predict label maps (palette PNGs), colour overlays and the competition CSV; check an existing CSV.

    dist-seg predict --config CFG --checkpoint runs/x/best.pt --images data/test --coco data/test.json \\
        --out preds/ --submission preds/submission.csv [--tta flip,scales] [--scales 0.75,1,1.25] [--overlays]
    dist-seg predict --config CFG --checkpoint CKPT --shards shards/test --coco data/test.json --out preds/
    torchrun --nproc_per_node=4 -m dist_seg.predict --config CFG --checkpoint CKPT --images DIR --out DIR ...
    dist-seg predict --check-submission preds/submission.csv --coco data/test.json [--num-classes 11]

Inputs: an image folder (every jpg/jpeg/png/webp below it, sorted, or exactly the json's images in json
order with --coco; file_name is relative to --images), or shards (`dist-seg convert` output, labelled or not).
Each image is normalised like training (data.mean/std; data.eval_resize if set), padded bottom/right to the
model's input constraints and cropped back. Images are batched only with images of exactly the same size,
each padded to its own padded size, so an image's prediction does not depend on --batch-size or its
neighbours (up to floating-point noise of batched kernels). TTA averages softmax probabilities over
horizontal flips and scales; probabilities return to the original image size (bilinear) before the argmax.

Outputs under --out: the label map of INPUT as OUT/INPUT-with-.png (palette PNG, pixel = class index),
OUT/overlays/INPUT-with-.jpg with --overlays, and the CSV (see dist_seg.submission) with --submission.

Under torchrun each rank predicts a contiguous part of the list and keeps its 256x256 maps (64 KB each);
rank 0 receives them in chunks and writes the CSV in json order (`gather_submission`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from dist_seg import distributed as D
from dist_seg.checkpoint import load_for_inference
from dist_seg.config import Config
from dist_seg.config_loading import load_config
from dist_seg.data.transforms import denormalize, padded_size
from dist_seg.models import input_constraints
from dist_seg.precision import AMP_DTYPES, autocast
from dist_seg.predict_inputs import Item, folder_items, grouped, list_folder, shard_items
from dist_seg.progress import progress
from dist_seg.submission import (
    DEFAULT_SIZE,
    OrderedSink,
    Problem,
    SubmissionWriter,
    check_main,
    check_submission,
    expected_from_coco,
    report,
    resize_nearest,
)
from dist_seg.viz import class_palette, overlay, save_palette_png


# ---------------------------------------------------------------------------------------------- inference
class Predictor:
    """Softmax probabilities of a batch of same-size normalised images, with optional flip/scale TTA."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        flip: bool = False,
        scales: Sequence[float] = (1.0,),
    ):
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"--scales {list(scales)}: need one or more positive factors")
        self.model, self.device, self.amp_dtype = model.eval(), device, amp_dtype
        self.channels_last, self.flip, self.scales = channels_last, flip, tuple(scales)
        self.divisor, self.min_size = input_constraints(model)

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Tensor:
        """[B, 3, h, w] normalised -> float32 [B, C, h, w] probabilities, averaged over the TTA views."""
        images = images.to(self.device, non_blocking=True)
        h, w = images.shape[-2:]
        total: Tensor | None = None
        views = 0
        for s in self.scales:
            size = (max(1, round(h * s)), max(1, round(w * s)))
            x = images if size == (h, w) else _resize(images, size)
            for flip in (False, True) if self.flip else (False,):
                v = x.flip(-1) if flip else x
                ph, pw = padded_size(size[0], size[1], self.divisor, self.min_size)
                v = F.pad(v, (0, pw - size[1], 0, ph - size[0]))  # 0 = the mean colour after normalisation
                if self.channels_last:
                    v = v.contiguous(memory_format=torch.channels_last)
                with autocast(self.device, self.amp_dtype):
                    logits = self.model(v)
                p = logits[:, :, : size[0], : size[1]].float().softmax(1)
                p = p.flip(-1) if flip else p
                p = p if size == (h, w) else _resize(p, (h, w))
                total = p if total is None else total + p
                views += 1
        assert total is not None
        return total / views if views > 1 else total


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def labels_at(probs: Tensor, size: tuple[int, int]) -> np.ndarray:
    """[C, h, w] probabilities -> uint8 [H, W] argmax at `size` (probabilities resized first)."""
    if tuple(probs.shape[-2:]) != tuple(size):
        probs = _resize(probs[None], size)[0]
    return probs.argmax(0).to(torch.uint8).cpu().numpy()


# ---------------------------------------------------------------------------------------------- outputs
@dataclass
class PredictOptions:
    checkpoint: str
    out: str
    images: str | None = None
    shards: str | None = None
    coco: str | None = None
    submission: str | None = None
    submission_size: int = DEFAULT_SIZE
    tta: str = "none"
    scales: tuple[float, ...] | None = None
    overlays: bool = False
    batch_size: int | None = None
    quiet: bool = False


def predict_items(
    predictor: Predictor,
    items: Iterable[Item],
    total: int,
    cfg: Config,
    opts: PredictOptions,
    num_classes: int,
) -> list[tuple[int, str, np.ndarray]]:
    """Write each item's palette PNG (and overlay); with opts.submission, return (index, image_id, map at
    opts.submission_size) per item, sorted by index. Batches hold cfg.data.eval_batch_size images."""
    palette, out = class_palette(num_classes), Path(opts.out)
    small: list[tuple[int, str, np.ndarray]] = []
    with progress(total, "predict", enabled=not opts.quiet) as bar:
        for group in grouped(items, cfg.data.eval_batch_size):
            probs = predictor(torch.stack([it.image for it in group]))
            for it, p in zip(group, probs, strict=True):
                label = labels_at(p, it.orig_size)
                save_palette_png(label, out / f"{it.out_rel}.png", palette)
                if opts.overlays:
                    _save_overlay(it, label, cfg, out / "overlays" / f"{it.out_rel}.jpg", palette)
                if opts.submission:
                    small.append((it.index, it.image_id, resize_nearest(label, opts.submission_size)))
            bar.update(len(group))
    return sorted(small, key=lambda t: t[0])


def _save_overlay(it: Item, label: np.ndarray, cfg: Config, path: Path, palette: np.ndarray) -> None:
    rgb = denormalize(it.image, cfg.data)
    if tuple(rgb.shape[-2:]) != it.orig_size:  # data.eval_resize: back to the label map's size
        rgb = _resize(rgb[None], it.orig_size)[0].clamp(0, 1)
    rgb_u8 = (rgb * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(rgb_u8, label, palette=palette)).save(path, quality=90)


# ---------------------------------------------------------------------------------------------- command
def parse_tta(tta: str, scales: Sequence[float] | None) -> tuple[bool, tuple[float, ...]]:
    """`none`, `flip`, `scales` or `flip,scales` (+ --scales) -> (flip, scale factors)."""
    parts = {p.strip() for p in tta.split(",") if p.strip()}
    unknown = parts - {"none", "flip", "scales"}
    if unknown or not parts or ("none" in parts and len(parts) > 1):
        raise ValueError(f"--tta {tta!r}: expected none, flip, scales or flip,scales")
    if scales is not None and "scales" not in parts:
        raise ValueError(f"--scales {list(scales)} needs --tta scales (or flip,scales)")
    return "flip" in parts, tuple(scales or (0.75, 1.0, 1.25)) if "scales" in parts else (1.0,)


def run_predict(cfg: Config, opts: PredictOptions, world: D.World) -> dict:
    """Predict this rank's part; rank 0 writes the CSV. Returns {"images", "submission", "problems"}."""
    if (opts.images is None) == (opts.shards is None):
        raise ValueError("give exactly one of --images DIR and --shards SPEC")
    if opts.submission_size < 1:
        raise ValueError(f"--submission-size {opts.submission_size}: must be >= 1")
    flip, scales = parse_tta(opts.tta, opts.scales)
    batch_size = opts.batch_size or cfg.data.eval_batch_size
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be >= 1")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_batch_size=batch_size))
    out = Path(opts.out)
    model, ck = load_for_inference(cfg, opts.checkpoint, world.device)
    expected = None
    if opts.coco is not None:
        expected, json_classes = expected_from_coco(opts.coco)
        if json_classes and json_classes != ck.num_classes:
            raise ValueError(
                f"--coco {opts.coco} has {json_classes} classes (with background), "
                f"checkpoint {ck.path} predicts {ck.num_classes}"
            )
    predictor = Predictor(
        model, world.device, AMP_DTYPES[cfg.train.amp], cfg.train.channels_last, flip, scales
    )
    if opts.images is not None:
        if out.resolve() == Path(opts.images).resolve():
            raise ValueError(f"--out {out} is the --images folder: predictions would overwrite .png inputs")
        names = list_folder(Path(opts.images), opts.coco, out)
        expected = names
        items, n = folder_items(Path(opts.images), names, cfg, world.rank, world.world_size)
    else:
        assert opts.shards is not None
        items, n = shard_items(
            cfg, opts.shards, world.rank, world.world_size, predictor.divisor, predictor.min_size
        )
    quiet = opts.quiet or not world.is_main
    small = predict_items(predictor, items, n, cfg, dataclasses.replace(opts, quiet=quiet), ck.num_classes)
    total = sum(D.all_gather_object(n))
    problems: list[Problem] = []
    if opts.submission:
        problems = gather_submission(
            opts.submission, small, expected, opts.submission_size, ck.num_classes, world
        )
    if world.is_main:
        print(f"predicted {total} images on {world.world_size} process(es) into {out}")
        if opts.submission:
            print(report(problems, opts.submission) if problems else f"wrote {opts.submission} (checked: OK)")
    return {"images": total, "submission": opts.submission, "problems": problems}


GATHER_CHUNK = 64  # 256x256 maps per broadcast: 4 MB


def gather_submission(
    path: str | Path,
    small: list[tuple[int, str, np.ndarray]],
    expected: Sequence[str] | None,
    size: int,
    num_classes: int,
    dist: D.World,
) -> list[Problem]:
    """Collective: every rank passes its (index, image_id, map) list; rank 0 writes the CSV in `expected`
    order (arrival order when None), validates the finished file and returns the problems (others: []).

    Maps travel in chunks of GATHER_CHUNK by a broadcast from each rank in turn, so rank 0 holds one chunk
    besides its own share and no shared filesystem is needed.
    """
    counts = D.all_gather_object(len(small))
    sink = OrderedSink(SubmissionWriter(path, size, num_classes), expected) if dist.is_main else None
    try:
        for r, n in enumerate(counts):
            for start in range(0, n, GATHER_CHUNK):
                chunk = (
                    [(im, m) for _, im, m in small[start : start + GATHER_CHUNK]] if dist.rank == r else None
                )
                if r != 0:
                    chunk = D.broadcast_object(chunk, src=r)
                if sink is not None:
                    for im, m in chunk:
                        sink.add(im, m)
    except BaseException:
        if sink is not None:
            sink.writer.abort()
        raise
    if sink is None:
        return []
    sink.finish()
    return sink.problems + check_submission(path, expected, size, num_classes)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-seg predict", description="Label maps, overlays, submission CSV.")
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--checkpoint", help="checkpoint file (e.g. RUN_DIR/best.pt)")
    p.add_argument("--images", help="image folder (with --coco: the folder its file_names are relative to)")
    p.add_argument("--shards", help="shards to predict (e.g. `dist-seg convert` of the test json)")
    p.add_argument("--coco", help="test json: fixes the images and the CSV's row order")
    p.add_argument("--out", help="output folder for the label-map PNGs (and overlays/)")
    p.add_argument("--submission", help="write the competition CSV here")
    p.add_argument("--submission-size", type=int, default=DEFAULT_SIZE, help="CSV map side (default 256)")
    p.add_argument("--tta", default="none", help="none | flip | scales | flip,scales (default none)")
    p.add_argument("--scales", type=_floats, help="TTA scale factors (default 0.75,1,1.25)")
    p.add_argument("--overlays", action="store_true", help="also write colour overlays to OUT/overlays/")
    p.add_argument("--batch-size", type=int, help="images per forward (default data.eval_batch_size)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--check-submission", metavar="CSV", help="only validate this CSV (with --coco) and exit")
    p.add_argument("--num-classes", type=int, help="for --check-submission: classes incl. background")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.check_submission:
        try:
            return check_main(args.check_submission, args.coco, args.submission_size, args.num_classes)
        except ValueError as e:
            print(f"dist-seg predict: error: {e}", file=sys.stderr)
            return 2
    missing = [f"--{k}" for k in ("config", "checkpoint", "out") if getattr(args, k) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    opts = PredictOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PredictOptions)})
    try:
        cfg = load_config(args.config, args.overrides)
        parse_tta(opts.tta, opts.scales)  # fail before any process group starts
    except ValueError as e:
        print(f"dist-seg predict: error: {e}", file=sys.stderr)
        return 2
    world = D.init_distributed(cfg.train.device, cfg.train.timeout_s)
    try:
        result = run_predict(cfg, opts, world)
    except ValueError as e:
        print(f"dist-seg predict: error: {e}", file=sys.stderr)
        return 2
    finally:
        D.cleanup()
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
