"""What the training loop reports: progress lines and training scalars (TrainMeter), evaluation results
(report_eval), the run's final summary (report_final). Every report goes to the run's RunLog, which hands it
to each tracker of train.loggers (dist_seg.train.tracking); the files of the run directory (metrics.json,
metrics_history.jsonl) are written here. Rank 0 writes."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_seg.config.schema import Config
from dist_seg.infer.metrics import to_jsonable
from dist_seg.runtime import distributed as D
from dist_seg.train.state import StepResult
from dist_seg.train.tracking import RunLog
from dist_seg.viz import class_palette, confusion_figure, figure_to_rgb, triplet_grid


class Window:
    """Sums between two progress lines. Loss and gradient norm stay on the device (0-dim tensors) until
    TrainMeter.log reads them, so a step does not wait for its own numbers."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n = self.updates = 0
        self.loss: torch.Tensor | float = 0.0
        self.grad_norm: torch.Tensor | float = 0.0
        self.block_grad_norms: torch.Tensor | None = None  # summed per model block, on the device
        self.wait = self.time = 0.0
        self.scale, self.skipped_samples, self.remote_retries = 1.0, 0, 0
        self.t0 = time.perf_counter()

    def add(
        self, o: StepResult, wait: float, dt: float, skipped_samples: int, remote_retries: int = 0
    ) -> None:
        self.n += 1
        if not o.skipped:
            self.updates += 1
            self.loss = self.loss + o.loss.detach().double()
            self.grad_norm = self.grad_norm + o.grad_norm.detach().double()
            if o.block_grad_norms is not None:
                b = o.block_grad_norms.detach().double()
                self.block_grad_norms = b if self.block_grad_norms is None else self.block_grad_norms + b
        self.wait += wait
        self.time += dt
        self.scale, self.skipped_samples = o.loss_scale, skipped_samples
        self.remote_retries = remote_retries  # running totals, like skipped_samples


class TrainMeter:
    """Meters the training steps (loss, gradient norm, loss scale, throughput, data wait) and reports them
    every train.log_every steps as scalars (to every tracker) and a progress line with an ETA. Owns the
    window of sums since the last line and the run's start."""

    def __init__(
        self,
        cfg: Config,
        world: D.World,
        log: RunLog,
        total_steps: int,
        step_at_start: int,
        block_names: Sequence[str] = (),
    ) -> None:
        """`block_names`: the model blocks whose gradient norms the steps report (step.parameter_blocks)."""
        self.cfg, self.world, self.run_log = cfg, world, log
        self.block_names = list(block_names)
        self.total_steps, self.step_at_start = total_steps, step_at_start
        self.window = Window()
        self.t_start = time.perf_counter()

    def add(
        self, o: StepResult, wait: float, dt: float, skipped_samples: int, remote_retries: int = 0
    ) -> None:
        """Count one step: `wait` of its `dt` seconds went to waiting for batches; `skipped_samples` and
        `remote_retries` are the loader's running totals on this rank."""
        self.window.add(o, wait, dt, skipped_samples, remote_retries)

    def log(self, step: int, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        """Scalars and one progress line for the steps since the last call (a collective: every rank calls it
        at the same steps)."""
        cfg, world, log, w = self.cfg, self.world, self.run_log, self.window
        total_steps = self.total_steps
        loss, grad_norm, skipped, retries, block_norms = self._across_ranks()
        elapsed = time.perf_counter() - w.t0
        ips = w.n * cfg.data.batch_size * cfg.train.grad_accum * world.world_size / max(elapsed, 1e-9)
        values = {
            "train/loss": loss,
            "train/grad_norm": grad_norm,
            "train/loss_scale": w.scale,
            "train/images_per_s": ips,
            "train/data_wait_frac": w.wait / max(w.time, 1e-9),
            "train/skipped_samples": skipped,
            "train/remote_retries": retries,  # transient network faults retried, all ranks, since the start
        }
        for g in optimizer.param_groups:
            values[f"train/lr/{g.get('name', 'default')}"] = g["lr"]
        for name, norm in zip(self.block_names, block_norms, strict=True):
            values[f"train/grad_norm/{name}"] = norm
        if world.device.type == "cuda":
            values["train/gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(world.device) / 2**30
        log.scalars(values, step)
        done = step - self.step_at_start
        eta = (time.perf_counter() - self.t_start) / max(done, 1) * (total_steps - step)
        lr = optimizer.param_groups[0]["lr"]
        if world.is_main:
            print(
                f"step {step}/{total_steps} epoch {epoch} loss {loss:.4f} lr {lr:.2e} "
                f"img/s {ips:.1f} data_wait {values['train/data_wait_frac']:.0%} eta {hms(eta)}"
                + (f" remote_retries {retries}" if retries else ""),
                flush=True,
            )
        w.reset()

    def _across_ranks(self) -> tuple[float, float, int, int, list[float]]:
        """The window's mean loss, gradient norm and per-block gradient norms over all ranks, and the
        skipped-sample and retry totals. The means are over the steps that updated the
        weights (the same steps on every rank: the skip is decided across ranks); NaN when every step of the
        window was skipped. One all-reduce, one read."""
        w, device = self.window, self.world.device
        blocks = w.block_grad_norms
        if blocks is None:  # every step of the window skipped
            blocks = torch.zeros(len(self.block_names), dtype=torch.float64, device=device)
        sums = torch.cat(
            [
                torch.stack(
                    [
                        torch.as_tensor(w.loss, dtype=torch.float64, device=device),
                        torch.as_tensor(w.grad_norm, dtype=torch.float64, device=device),
                        torch.tensor(float(w.skipped_samples), dtype=torch.float64, device=device),
                        torch.tensor(float(w.remote_retries), dtype=torch.float64, device=device),
                    ]
                ),
                blocks,
            ]
        )
        loss_sum, grad_sum, skipped_sum, retries_sum, *block_sums = D.sum_across_ranks(sums)
        n_ranks = self.world.world_size

        def mean(total: float) -> float:  # gradients are all-reduced: their norms are equal on every rank
            return total / n_ranks / w.updates if w.updates else math.nan

        return (
            mean(loss_sum),
            mean(grad_sum),
            int(round(skipped_sum)),
            int(round(retries_sum)),
            [mean(b) for b in block_sums],
        )


def print_main(world: D.World, msg: str) -> None:
    """One line of the run's console log, printed by rank 0."""
    if world.is_main:
        print(msg, flush=True)


def hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


FINAL_METRICS = ("miou", "pixel_acc", "mean_acc", "image_miou")  # the final/ metrics of every tracker


def report_final(cfg: Config, log: RunLog, world_size: int, metrics: dict[str, Any], step: int) -> None:
    """Rank 0, at the end: the run's main settings with its final metrics (TensorBoard's hparams view, MLflow's
    final/ metrics, W&B's summary)."""
    settings = {
        "model": cfg.model.name,
        "width_mult": cfg.model.width_mult,
        "lr": cfg.optim.lr,
        "batch_size": cfg.data.batch_size,
        "world_size": world_size,
        "amp": cfg.train.amp,
    }
    log.final(settings, {k: metrics[k] for k in FINAL_METRICS}, step)


def report_eval(
    cfg: Config,
    log: RunLog,
    step: int,
    metrics: dict[str, Any],
    matrix: np.ndarray,
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    names: list[str],
    num_classes: int,
    primary: bool = True,
) -> None:
    """Rank 0: evaluation scalars, sample triplets and confusion matrix to the trackers, metrics.json, a line.

    metrics["weights"] says which weights were evaluated: "model" scalars go under val/, "ema" (the weight
    EMA) under val_ema/. Only the `primary` evaluation (the one best.pt and early stopping follow) reports the
    images, the confusion matrix and metrics.json; every evaluation is a line of metrics_history.jsonl."""
    weights = metrics.get("weights", "model")
    _eval_to_trackers(log, step, metrics, matrix, kept, names, num_classes, primary)
    _eval_to_files(Path(cfg.train.out_dir), step, metrics, primary)
    print(
        f"eval step {step}{' (EMA weights)' if weights == 'ema' else ''}: mIoU {metrics['miou']:.4f} "
        f"pixel acc {metrics['pixel_acc']:.4f} mean acc {metrics['mean_acc']:.4f}",
        flush=True,
    )


def _eval_to_trackers(
    log: RunLog,
    step: int,
    metrics: dict[str, Any],
    matrix: np.ndarray,
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    names: list[str],
    num_classes: int,
    primary: bool,
) -> None:
    """Scalars under val/ (val_ema/ for the EMA); for the primary evaluation also the sample triplets and
    the confusion matrix, rendered here once for every tracker."""
    if not log.active:  # no trackers (train.loggers=[]): nothing to render
        return
    tag = "val_ema" if metrics.get("weights", "model") == "ema" else "val"
    log.scalars(
        {
            f"{tag}/miou": metrics["miou"],
            f"{tag}/pixel_acc": metrics["pixel_acc"],
            f"{tag}/mean_acc": metrics["mean_acc"],
            f"{tag}/image_miou": metrics["image_miou"],
        },
        step,
    )
    log.scalars(
        {f"{tag}/iou/{n}": v for n, v in zip(names, metrics["iou"], strict=True) if not math.isnan(v)}, step
    )
    if kept and primary:
        log.image("val/samples", sample_triplets(same_size(kept), num_classes), step)
    if primary:
        log.image("val/confusion", figure_to_rgb(confusion_figure(matrix, names, normalize=True)), step)
    log.flush()


def sample_triplets(
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], num_classes: int
) -> np.ndarray:
    """One picture of (image [3,H,W] uint8, truth [H,W], prediction [H,W]) samples of one size: a row each,
    input | ground truth | prediction (ignore shown white)."""
    images = np.stack([k[0].cpu().permute(1, 2, 0).numpy() for k in kept])
    targets = np.stack([k[1].cpu().clamp(0, 255).numpy() for k in kept])
    preds = np.stack([k[2].cpu().clamp(0, 255).numpy() for k in kept])
    return triplet_grid(images, targets, preds, class_palette(num_classes))


def _eval_to_files(out: Path, step: int, metrics: dict[str, Any], primary: bool) -> None:
    """metrics.json (the primary evaluation only) and a line of metrics_history.jsonl (every evaluation)."""
    if primary:
        (out / "metrics.json").write_text(json.dumps(to_jsonable({"step": step, **metrics}), indent=1))
    with open(out / "metrics_history.jsonl", "a") as f:
        f.write(
            json.dumps(to_jsonable({"step": step, **{k: v for k, v in metrics.items() if k != "matrix"}}))
            + "\n"
        )


def same_size(kept: list) -> list:
    """Visualised images must stack: keep those with the first one's size."""
    h, w = kept[0][1].shape
    return [k for k in kept if k[1].shape == (h, w)]


def trim_history(out_dir: Path, step: int) -> None:
    """After a resume from `step`, drop metrics_history.jsonl entries the crashed run wrote after it, as
    TensorBoard's purge_step does for the event files."""
    path = Path(out_dir) / "metrics_history.jsonl"
    if not path.is_file():
        return
    kept = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in kept))
