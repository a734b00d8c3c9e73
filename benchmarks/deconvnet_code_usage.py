"""Does a trained DeconvNet's decoder use the fc7 code? A diagnosis of DeconvNet runs that stall (issue 27).

DeconvNet's decoder sees the image through two paths only: the 1x1 fc7 code (the one path that carries the
encoder's feature values, colour included) and the max-pool switches (positions). This script loads a
checkpoint, runs training batches through it, and replaces the fc7 code by another image's (roll by one image
in the batch), by the batch mean, or by zeros:

- pixel accuracy with each replacement: when it does not move, the decoder classifies from the switches alone;
- the relative change of each decoder stage's output when the codes are swapped: where the code's influence
  is lost on the way to the logits.

    python benchmarks/deconvnet_code_usage.py --config configs/demo.yaml --checkpoint runs/demo/step-00000300.pt \
        data.train_shards=data/demo/synth-300-60-224/shards/train model.name=deconvnet

Prints one line per replacement and one per decoder stage. CPU; a few seconds per batch.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import Tensor

from dist_seg.checkpoint import load_for_inference
from dist_seg.config.loading import load_config
from dist_seg.data.loading.train_loader import build_train_loader
from dist_seg.models.deconvnet import DeconvNet

REPLACEMENTS: dict[str, Callable[[Tensor], Tensor] | None] = {
    "as trained": None,
    "rolled (another image's code)": lambda code: code.roll(1, 0),
    "batch mean": lambda code: code.mean(0, keepdim=True).expand_as(code).contiguous(),
    "zeros": torch.zeros_like,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--batches", type=int, default=8, help="training batches to score (default 8)")
    p.add_argument("overrides", nargs="*", help="config key=value overrides (the run's own)")
    a = p.parse_args()
    cfg = load_config(a.config, a.overrides)
    model, meta = load_for_inference(cfg, a.checkpoint, torch.device("cpu"))
    if not isinstance(model, DeconvNet):
        raise SystemExit(f"{a.checkpoint}: model {meta.model_name!r} is not a DeconvNet")
    replace: list[Callable[[Tensor], Tensor] | None] = [None]
    # a forward hook that returns a tensor replaces fc7's output
    model.fc7.register_forward_hook(lambda m, i, o: replace[0](o) if replace[0] is not None else None)
    stages = {"fc6_deconv": model.decoder.fc6_deconv}
    stages.update({f"stage {5 - i} (after unpool{5 - i})": s for i, s in enumerate(model.decoder.stages)})
    outputs: dict[tuple[str, str], Tensor] = {}
    key = [""]
    for name, module in stages.items():
        module.register_forward_hook(
            lambda m, i, o, name=name: outputs.__setitem__((key[0], name), o.detach())
        )

    loader = build_train_loader(cfg.data, 0, 1, cfg.train.seed)
    correct = dict.fromkeys(REPLACEMENTS, 0)
    pixels, change = 0, {name: 0.0 for name in [*stages, "logits"]}
    with torch.no_grad():
        for n, batch in enumerate(loader):
            if n == a.batches:
                break
            images, masks = batch.model_input()
            valid = masks != 255
            logits = {}
            for label, fn in REPLACEMENTS.items():
                replace[0], key[0] = fn, label
                logits[label] = model(images)
                correct[label] += int((logits[label].argmax(1)[valid] == masks[valid]).sum())
            pixels += int(valid.sum())
            rolled = "rolled (another image's code)"
            for name in stages:
                base, swapped = outputs[("as trained", name)], outputs[(rolled, name)]
                change[name] += float((base - swapped).norm() / base.norm()) / a.batches
            change["logits"] += float(
                (logits["as trained"] - logits[rolled]).norm() / logits["as trained"].norm()
            )
    change["logits"] /= a.batches
    print(
        f"{a.checkpoint} (step {meta.step}), {a.batches} training batches of {cfg.data.batch_size}, eval mode"
    )
    for label, c in correct.items():
        print(f"  pixel accuracy, fc7 code {label:<30} {c / pixels:.4f}")
    for name, value in change.items():
        print(f"  relative change when codes are swapped: {name:<28} {value:.4f}")


if __name__ == "__main__":
    main()
