"""`dist-seg info --config CFG [key=value ...] [--json]`: model size, forward FLOPs and optimizer groups.

The model is built on the meta device (no memory, no weights; model.pretrained is not loaded), so even the
full-width DeconvNet is described in about a second. FLOPs are torch.utils.flop_counter's count of one
forward pass of one image at data.crop_size, rounded up to the model's input constraints (DeconvNet: a
multiple of 32, at least 224); MACs = FLOPs / 2. Normalisation, activations and pooling are not counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from dist_seg.config.loading import load_config
from dist_seg.config.schema import Config
from dist_seg.data.format.manifest import manifest_dir, read_manifest
from dist_seg.data.loading.transforms import padded_size
from dist_seg.models import build_model, input_constraints
from dist_seg.models.registry import model_class
from dist_seg.train.optim import ParamGroupSummary, build_optimizer, format_groups


def resolve_num_classes(cfg: Config) -> int:
    """model.num_classes when set, else the number of classes in the training shards' manifest (the shard
    files themselves need not be here: `info` describes a model, it does not read data)."""
    if cfg.model.num_classes is not None:
        return cfg.model.num_classes
    if not cfg.data.train_shards:
        raise ValueError(
            "model.num_classes is not set and data.train_shards is empty: set model.num_classes "
            "(e.g. model.num_classes=11) or data.train_shards"
        )
    try:
        manifest = read_manifest(manifest_dir(cfg.data.train_shards))
    except ValueError as e:
        raise ValueError(f"{e}; or set model.num_classes (e.g. model.num_classes=11)") from e
    return int(manifest["num_classes"])


def describe(cfg: Config) -> dict[str, Any]:
    """The facts `info` prints, as a json-ready dict."""
    model_class(cfg.model.name)  # an unknown name is the error to report, before any manifest is read
    num_classes = resolve_num_classes(cfg)
    model_cfg = dataclasses.replace(cfg.model, pretrained=None)
    with torch.device("meta"):
        model = build_model(model_cfg, num_classes)
    model.eval()  # BN statistics of a single image would be undefined on DeconvNet's 1x1 fc maps
    h, w = padded_size(cfg.data.crop_size, cfg.data.crop_size, *input_constraints(model))
    x = torch.empty(1, 3, h, w, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    flops = int(counter.get_total_flops())
    _, summaries = build_optimizer(model, cfg.optim)
    params = list(model.parameters())
    return {
        "model": cfg.model.name,
        "width_mult": cfg.model.width_mult,
        "num_classes": num_classes,
        "params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "input_size": [1, 3, h, w],
        "flops": flops,
        "macs": flops // 2,
        "optimizer": cfg.optim.name,
        "groups": [dataclasses.asdict(g) for g in summaries],
    }


def format_report(facts: dict[str, Any]) -> str:
    n, c, h, w = facts["input_size"]
    return "\n".join(
        [
            f"model: {facts['model']} (width_mult {facts['width_mult']}, {facts['num_classes']} classes)",
            f"parameters: {facts['params']:,} ({facts['trainable_params']:,} trainable)",
            f"forward FLOPs at {n}x{c}x{h}x{w}: {facts['flops'] / 1e9:.2f} GFLOP = {facts['macs'] / 1e9:.2f} GMAC",
            f"optimizer: {facts['optimizer']}, groups:",
            format_groups([ParamGroupSummary(**g) for g in facts["groups"]]),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dist-seg info",
        description="Model parameter count, forward FLOPs at data.crop_size, optimizer groups.",
    )
    parser.add_argument("--config", help="YAML config file (defaults are used without it)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. model.width_mult=0.125"
    )
    parser.add_argument("--json", action="store_true", help="print one json object instead of text")
    args = parser.parse_intermixed_args(argv)
    try:
        facts = describe(load_config(args.config, args.overrides))
    except ValueError as e:
        print(f"dist-seg info: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(facts, indent=2) if args.json else format_report(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
