"""Train a segmentation model on webdataset shards, on one or many processes.

    torchrun --nproc_per_node=2 -m dist_seg.train --config configs/demo.yaml train.out_dir=runs/demo
    torchrun --nproc_per_node=8 -m dist_seg.train --config configs/deconvnet_vgg16bn.yaml data.batch_size=8
    torchrun --nnodes=2 --node_rank=$NODE_RANK --rdzv-backend=c10d --rdzv-endpoint=$HOST:29400 \\
        --nproc_per_node=8 -m dist_seg.train --config configs/deconvnet_vgg16bn.yaml
    python -m dist_seg.train --config configs/cpu_small.yaml        # one process, no torchrun

Overrides are dotted `key=value` pairs (see README "Config reference"). The config, then every name and path
in it (dist_seg.train.preflight), is checked before any process group starts: a typo fails at once, as one
`dist_seg.train: error: KEY=VALUE: ...` line per node and exit code 2, instead of a traceback per rank after
the rendezvous.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from dist_seg.config.loading import load_config
from dist_seg.config.schema import to_yaml
from dist_seg.data.format.urls import redacted_config
from dist_seg.runtime import distributed as D
from dist_seg.runtime import fault_injection as faults
from dist_seg.runtime.preemption import (
    PREEMPTED_EXIT_CODE,
    Preempted,
    StopRequest,
    parse_signals,
    write_marker,
)
from dist_seg.train.preflight import find_problems

USAGE_EXIT_CODE = 2  # argparse's, for every user error found before the run starts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist_seg.train", description="Train a segmentation model (DDP-ready).")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit (no training)"
    )
    return p


def user_errors(messages: list[str]) -> int:
    """Print `dist_seg.train: error: MESSAGE` lines once per node and return the exit code. torchrun starts
    every local rank with the same arguments, so each finds the same errors; local rank 0 speaks for its node
    and the others exit silently (there is no process group yet to agree through)."""
    if D.local_rank() == 0:
        for message in messages:
            print(f"dist_seg.train: error: {message}", file=sys.stderr)
    return USAGE_EXIT_CODE


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        return user_errors([str(e)])
    if args.print_config:
        print(to_yaml(redacted_config(cfg)), end="")  # no credential of a URL on the console either
        return 0
    if problems := find_problems(cfg):
        return user_errors([str(p) for p in problems])
    if faults.active():
        warnings.warn(f"fault injection is ON: {', '.join(faults.active())}", stacklevel=1)
    world = D.init_distributed(cfg.train.device, cfg.train.timeout_s)
    stop = StopRequest(parse_signals(cfg.train.stop_signals))
    try:
        from dist_seg.train.loop import fit  # heavy imports after argument checks

        metrics = fit(cfg, world, stop)
        if world.is_main and metrics:
            print(f"final val mIoU {metrics['miou']:.4f}")
            for name, iou in metrics["iou_by_class"].items():
                print(f"  {name:<20} IoU {iou:.4f}")
    except Preempted as stopped:
        if world.is_main:
            marker = write_marker(cfg.train.out_dir, stopped)
            print(f"{stopped}: checkpoint written, {marker} left for the requeue; exit {PREEMPTED_EXIT_CODE}")
        return PREEMPTED_EXIT_CODE
    finally:
        stop.close()
        D.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
