"""`dist-seg SUBCOMMAND ...`: each subcommand lives in its own module and parses its own arguments."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help). Modules expose `main(argv: list[str] | None) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("dist_seg.data.prep.synth.dataset", "write the built-in synthetic COCO dataset"),
    "convert": ("dist_seg.data.prep.convert", "convert a COCO instances dataset into webdataset shards"),
    "eda": (
        "dist_seg.data.prep.eda.report",
        "exploratory report of a COCO dataset (overlaps, class balance)",
    ),
    "split": ("dist_seg.data.prep.split", "k-fold train/val jsons, grouped by image, stratified by class"),
    "info": ("dist_seg.train.info", "model size, FLOPs and optimizer groups for a config"),
    "train": ("dist_seg.train.command", "train (prefer: torchrun --nproc_per_node=N -m dist_seg.train ...)"),
    "evaluate": ("dist_seg.infer.evaluate", "evaluate a checkpoint on the validation shards"),
    "predict": ("dist_seg.infer.predict", "predict label maps, overlays and the submission CSV"),
    "export": ("dist_seg.infer.export", "export a checkpoint to ONNX, TorchScript or .pt2 and check it"),
}


def _usage() -> str:
    lines = ["usage: dist-seg SUBCOMMAND [options]   (dist-seg SUBCOMMAND --help for its options)", ""]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"dist-seg: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
