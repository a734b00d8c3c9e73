"""Predict label maps (palette PNGs), colour overlays and the competition CSV; check an existing CSV.

    dist-seg predict --config CFG --checkpoint runs/x/best.pt --images data/test --coco data/test.json \\
        --out preds/ --submission preds/submission.csv [--tta flip,scales] [--scales 0.75,1,1.25] [--overlays]
    dist-seg predict --config CFG --checkpoint CKPT --shards shards/test --coco data/test.json --out preds/
    torchrun --nproc_per_node=4 -m dist_seg.infer.predict --config CFG --checkpoint CKPT --images DIR --out DIR ...
    dist-seg predict --check-submission preds/submission.csv --coco data/test.json [--num-classes 11]

Inputs: an image folder (every jpg/jpeg/png/webp below it, sorted, or exactly the json's images in json
order with --coco; file_name is relative to --images), or shards (`dist-seg convert` output, labelled or not).
Each image is normalised like training (data.mean/std; data.eval_resize if set), padded bottom/right to the
model's input constraints and cropped back. Images are batched only with images of exactly the same size,
each padded to its own padded size, so an image's prediction does not depend on --batch-size or its
neighbours (up to floating-point noise of batched kernels). TTA averages softmax probabilities over
horizontal flips and scales; probabilities return to the original image size (bilinear) before the argmax.

Outputs under --out: the label map of INPUT as OUT/INPUT-with-.png (palette PNG, pixel = class index),
OUT/overlays/INPUT-with-.jpg with --overlays, and the CSV (see dist_seg.infer.submission) with --submission.

Under torchrun each rank predicts a contiguous part of the list and keeps its 256x256 maps (64 KB each);
rank 0 receives them in chunks and writes the CSV in json order (`gather_submission`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from dist_seg.config.loading import load_config
from dist_seg.config.schema import Config
from dist_seg.data.loading.colour import plain_colour, to_model_input
from dist_seg.infer.options import add_inference_args, build_predictor, check_inference_args
from dist_seg.infer.predict_inputs import Item, folder_items, grouped, list_folder, shard_items
from dist_seg.infer.predictor import Predictor, load_models, resize
from dist_seg.infer.submission import (
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
from dist_seg.models import input_constraints
from dist_seg.runtime import distributed as D
from dist_seg.runtime.progress_lines import progress
from dist_seg.viz import class_palette, overlay, save_palette_png


def labels_at(probs: Tensor, size: tuple[int, int]) -> np.ndarray:
    """[C, h, w] probabilities -> uint8 [H, W] argmax at `size` (probabilities resized first)."""
    if tuple(probs.shape[-2:]) != tuple(size):
        probs = resize(probs[None], size)[0]
    return probs.argmax(0).to(torch.uint8).cpu().numpy()


# ---------------------------------------------------------------------------------------------- outputs
@dataclass
class PredictOptions:
    checkpoint: str | list[str]  # several: an ensemble
    out: str
    images: str | None = None
    shards: str | None = None
    coco: str | None = None
    submission: str | None = None
    submission_size: int = DEFAULT_SIZE
    weights: str = "auto"
    tta: str = "none"
    scales: tuple[float, ...] | None = None
    mode: str = "whole"
    window: int | None = None
    stride: int | None = None
    crf: bool = False
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
    colour = plain_colour(cfg.data.mean, cfg.data.std)[None]
    small: list[tuple[int, str, np.ndarray]] = []
    with progress(total, "predict", enabled=not opts.quiet) as bar:
        for group in grouped(items, cfg.data.eval_batch_size):
            images = torch.stack([it.image for it in group]).to(predictor.device, non_blocking=True)
            probs = predictor(to_model_input(images, colour))
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
    rgb = it.image.float() / 255
    if tuple(rgb.shape[-2:]) != it.orig_size:  # data.eval_resize: back to the label map's size
        rgb = resize(rgb[None], it.orig_size)[0].clamp(0, 1)
    rgb_u8 = (rgb * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(rgb_u8, label, palette=palette)).save(path, quality=90)


# ---------------------------------------------------------------------------------------------- command
def run_predict(cfg: Config, opts: PredictOptions, world: D.World) -> dict:
    """Predict this rank's part; rank 0 writes the CSV. Returns {"images", "submission", "problems"}."""
    if (opts.images is None) == (opts.shards is None):
        raise ValueError("give exactly one of --images DIR and --shards SPEC")
    if opts.submission_size < 1:
        raise ValueError(f"--submission-size {opts.submission_size}: must be >= 1")
    if isinstance(opts.checkpoint, str):
        opts = dataclasses.replace(opts, checkpoint=[opts.checkpoint])
    check_inference_args(argparse.Namespace(**vars(opts)))
    batch_size = opts.batch_size or cfg.data.eval_batch_size
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be >= 1")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_batch_size=batch_size))
    out = Path(opts.out)
    models, cks = load_models(cfg, opts.checkpoint, world.device, None, opts.weights)
    ck = cks[0]
    expected = None
    if opts.coco is not None:
        expected, json_classes = expected_from_coco(opts.coco)
        if json_classes and json_classes != ck.num_classes:
            raise ValueError(
                f"--coco {opts.coco} has {json_classes} classes (with background), "
                f"checkpoint {ck.path} predicts {ck.num_classes}"
            )
    predictor = build_predictor(cfg, argparse.Namespace(**vars(opts)), models, world.device)
    if opts.images is not None:
        if out.resolve() == Path(opts.images).resolve():
            raise ValueError(f"--out {out} is the --images folder: predictions would overwrite .png inputs")
        names = list_folder(Path(opts.images), opts.coco, out)
        expected = names
        items, n = folder_items(Path(opts.images), names, cfg, world.rank, world.world_size)
    else:
        assert opts.shards is not None
        divisor, min_size = _common_constraints(models)
        items, n = shard_items(cfg, opts.shards, world.rank, world.world_size, divisor, min_size)
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


def _common_constraints(models: list[nn.Module]) -> tuple[int, int]:
    """Padding the shard loader may apply: one valid for every model (the Predictor pads per model anyway)."""
    divisor, min_size = 1, 1
    for m in models:
        d, s = input_constraints(m)
        divisor, min_size = math.lcm(divisor, d), max(min_size, s)
    return divisor, min_size


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-seg predict", description="Label maps, overlays, submission CSV.")
    p.add_argument("--config", help="YAML config (see configs/)")
    add_inference_args(p)
    p.add_argument("--images", help="image folder (with --coco: the folder its file_names are relative to)")
    p.add_argument("--shards", help="shards to predict (e.g. `dist-seg convert` of the test json)")
    p.add_argument("--coco", help="test json: fixes the images and the CSV's row order")
    p.add_argument("--out", help="output folder for the label-map PNGs (and overlays/)")
    p.add_argument("--submission", help="write the competition CSV here")
    p.add_argument("--submission-size", type=int, default=DEFAULT_SIZE, help="CSV map side (default 256)")
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
        check_inference_args(args)  # fail before any process group starts
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
