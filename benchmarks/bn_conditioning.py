"""How hard are a model's BatchNorm statistics for float32? The conditioning of every BN input, and what a one-pass
SyncBN variance would cost on it (issue 27).

A one-pass variance, E[x^2] - E[x]^2 summed in float32, loses about eps * mean^2 / var of its value to
cancellation (eps = 2^-23); the two-pass form CpuSyncBatchNorm uses (per-rank torch.var_mean, the ranks'
moments merged in float64) does not. Whether the difference matters to a run depends on mean^2 / var of the
inputs the model really produces. This script loads a checkpoint (or the seeded initial model with --init),
runs training batches through it in training mode (batch statistics, as SyncBN computes them over the global
batch), and prints for each BatchNorm:

- the values per channel (the global batch x the map's area: 8 for DeconvNet's 1x1 fc6/fc7 in the demo);
- the largest mean^2 / var over channels and batches;
- the largest relative error of the normalised output, 1/sqrt(var + eps_bn), against float64, for the
  one-pass float32 variance and for the two-pass variance CpuSyncBatchNorm computes (split into --ranks).

    python benchmarks/bn_conditioning.py --config configs/demo.yaml --checkpoint runs/demo/last.pt \
        data.train_shards=data/demo/synth-300-60-224/shards/train

CPU; a few seconds per batch.
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

from dist_seg.checkpoint import load_for_inference
from dist_seg.config.loading import load_config
from dist_seg.data.loading.train_loader import build_train_loader
from dist_seg.models import build_model
from dist_seg.runtime.distributed import merge_moments


def one_pass_var(x: Tensor) -> Tensor:
    """The variance as the one-pass SyncBN computed it: float32 sums of x and x^2, then E[x^2] - E[x]^2."""
    dims = [d for d in range(x.dim()) if d != 1]
    n = x.numel() // x.shape[1]
    s1, s2 = x.float().sum(dims).double(), (x.float() ** 2).sum(dims).double()
    return (s2 / n - (s1 / n) ** 2).clamp_min(0)


def two_pass_var(x: Tensor, ranks: int) -> Tensor:
    """The variance as CpuSyncBatchNorm computes it: per-rank float32 var_mean, merged by its merge_moments."""
    dims = [d for d in range(x.dim()) if d != 1]
    parts = [
        (p.numel() // x.shape[1], *torch.var_mean(p.float(), dim=dims, correction=0)) for p in x.chunk(ranks)
    ]
    counts = torch.tensor([[float(n)] for n, _, _ in parts], dtype=torch.float64)
    means = torch.stack([m.double() for _, _, m in parts])
    m2s = torch.stack([v.double() for _, v, _ in parts]) * counts
    return merge_moments(counts, means, m2s)[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", help="a training checkpoint (or --init)")
    p.add_argument(
        "--init", action="store_true", help="the model as train.seed initialises it (needs model.num_classes)"
    )
    p.add_argument("--batches", type=int, default=8, help="global batches to run (default 8)")
    p.add_argument(
        "--ranks", type=int, default=2, help="processes the global batch is split over (default 2)"
    )
    p.add_argument("overrides", nargs="*", help="config key=value overrides (the run's own)")
    a = p.parse_args()
    if bool(a.checkpoint) == a.init:
        raise SystemExit("give exactly one of --checkpoint PATH and --init")
    cfg = load_config(a.config, a.overrides)
    if a.init:
        if cfg.model.num_classes is None:
            raise SystemExit("--init: set model.num_classes=N (the shards' class count) to build the model")
        torch.manual_seed(cfg.train.seed)
        model: nn.Module = build_model(cfg.model, cfg.model.num_classes)
        where = f"initial model, train.seed={cfg.train.seed}"
    else:
        model, meta = load_for_inference(cfg, a.checkpoint, torch.device("cpu"))
        where = f"{a.checkpoint} (step {meta.step})"
    rows: dict[str, list[float]] = {}  # name -> [values per channel, mean^2/var, one-pass err, two-pass err]

    def hook(name: str, bn: nn.modules.batchnorm._BatchNorm):
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            x = inputs[0].detach()
            dims = [d for d in range(x.dim()) if d != 1]
            var, mean = torch.var_mean(x.double(), dim=dims, correction=0)
            exact = (var + bn.eps).rsqrt()
            err = [
                float(((v + bn.eps).rsqrt() / exact - 1).abs().max())
                for v in (one_pass_var(x), two_pass_var(x, a.ranks))
            ]
            cond = float((mean**2 / var.clamp_min(1e-300)).max())
            row = rows.setdefault(name, [x.numel() // x.shape[1], 0.0, 0.0, 0.0])
            row[1:] = [max(row[1], cond), max(row[2], err[0]), max(row[3], err[1])]

        return record

    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.register_forward_hook(hook(name, m))
    model.train()  # batch statistics, as in training; the running statistics this updates are not saved
    loader = build_train_loader(cfg.data, 0, 1, cfg.train.seed)
    per_global = a.ranks  # the loader yields one rank's batch: a global batch is `ranks` of them
    pending: list[Tensor] = []
    done = 0
    with torch.no_grad():
        for batch in loader:
            pending.append(batch.model_input()[0])
            if len(pending) == per_global:
                model(torch.cat(pending))
                pending, done = [], done + 1
                if done == a.batches:
                    break
    print(f"{where}: {done} global batches of {a.ranks} x {cfg.data.batch_size}, training mode")
    print(
        f"  {'BatchNorm':<28} {'values/ch':>9} {'max mean^2/var':>15} {'one-pass err':>13} {'two-pass err':>13}"
    )
    for name, (n, cond, e1, e2) in rows.items():
        print(f"  {name:<28} {n:>9d} {cond:>15.3g} {e1:>13.2e} {e2:>13.2e}")
    worst = max(rows.items(), key=lambda kv: kv[1][2])
    print(f"  worst one-pass error: {worst[1][2]:.2e} at {worst[0]} ({worst[1][2] / 2**-23:.1f} float32 ulp)")


if __name__ == "__main__":
    main()
