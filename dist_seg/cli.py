"""`dist-seg SUBCOMMAND ...`: each subcommand lives in its own module and parses its own arguments."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help). Modules expose `main(argv: list[str] | None) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("dist_seg.data.synth", "write the built-in synthetic COCO dataset"),
    "convert": ("dist_seg.data.convert", "convert a COCO instances dataset into webdataset shards"),
    "eda": ("dist_seg.data.eda", "exploratory report of a COCO dataset (overlaps, class balance)"),
    "split": ("dist_seg.data.split", "k-fold train/val jsons, grouped by image, stratified by class"),
    "info": ("dist_seg.info", "model size, FLOPs and optimizer groups for a config"),
    "train": ("dist_seg.train", "train (prefer: torchrun --nproc_per_node=N -m dist_seg.train ...)"),
    "evaluate": ("dist_seg.evaluate", "evaluate a checkpoint on the validation shards"),
    "predict": ("dist_seg.predict", "predict label maps, overlays and the submission CSV"),
    "export": ("dist_seg.export", "export a checkpoint to ONNX, TorchScript or .pt2 and check it"),
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
