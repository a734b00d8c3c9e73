"""Evaluation during training, and the early stop it drives.

The Validator evaluates the val shards at the steps the StepSchedule names: the trained weights, then, with a
weight EMA, the EMA, whose mIoU is the one that counts (best.pt and the early stop follow it). It reports each
evaluation (reporting.report_eval) and counts it in the TrainState. EarlyStop reads those counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dist_seg.config.schema import Config
from dist_seg.data.loading.eval_loader import build_eval_loader
from dist_seg.infer.scoring import compute_confusion
from dist_seg.models import input_constraints, unwrap
from dist_seg.runtime import distributed as D
from dist_seg.train import reporting
from dist_seg.train.state import TrainState
from dist_seg.train.step import StepContext
from dist_seg.train.tracking import RunLog


class Validator:
    """Evaluates the model (and its EMA) on data.val_shards during training; every rank takes part."""

    def __init__(
        self,
        cfg: Config,
        world: D.World,
        ctx: StepContext,
        log: RunLog,
        num_classes: int,
        class_names: list[str],
    ) -> None:
        self.cfg, self.world, self.ctx, self.log = cfg, world, ctx, log
        self.num_classes, self.class_names = num_classes, class_names
        self.metrics: dict[str, Any] = {}  # the last complete evaluation's, of the weights that count
        self.stopped = False  # a stop signal cut the last evaluation short (every rank agrees)

    def evaluate(self, state: TrainState) -> bool:
        """Evaluate at state.step, report, and count the evaluation in `state`; True when its mIoU is the best
        so far. False without val shards, and when a stop signal cut it short (`stopped` is then set and
        nothing is counted: the partial result is not reported)."""
        if not self.cfg.data.val_shards:
            return False
        metrics = self._run(state.step)
        if metrics is None:
            self.stopped = True
            return False
        self.metrics = metrics
        return state.record_eval(metrics["miou"])

    def final_metrics(self, step: int) -> dict[str, Any]:
        """The metrics fit() returns: the last evaluation's. A run that has not evaluated (e.g. resumed from a
        finished run, or stopped early at once) evaluates now, so that it still reports them."""
        if not self.metrics and self.cfg.data.val_shards:
            self.metrics = self._run(step) or {}
        return self.metrics

    def _run(self, step: int) -> dict[str, Any] | None:
        """Evaluate and report: first the trained weights, then the EMA's, whose metrics are returned.
        metrics["weights"] names the weights. None when a stop signal cut an evaluation short."""
        cfg, world, ctx = self.cfg, self.world, self.ctx
        divisor, min_size = input_constraints(ctx.model)
        evaluated = [("model", ctx.model)] + ([("ema", ctx.ema.module)] if ctx.ema is not None else [])
        metrics: dict[str, Any] = {}
        for weights, model in evaluated:
            primary = weights == evaluated[-1][0]
            D.broadcast_buffers_(unwrap(model))  # without SyncBN, rank 0's BN statistics for every rank
            loader = build_eval_loader(cfg.data, world.rank, world.world_size, divisor, min_size)
            keep = cfg.train.num_vis_images if world.is_main and primary else 0
            cm, kept = compute_confusion(
                model,
                loader,
                self.num_classes,
                world.device,
                ctx.amp_dtype,
                cfg.train.channels_last,
                keep,
                ctx.stop,
            )
            if ctx.stop is not None and D.any_rank_flags([ctx.stop.requested], world.device)[0]:
                return None
            metrics = {**cm.compute(self.class_names), "weights": weights}
            if world.is_main:
                matrix = cm.matrix.cpu().numpy()
                reporting.report_eval(
                    cfg, self.log, step, metrics, matrix, kept, self.class_names, self.num_classes, primary
                )
        return metrics


@dataclass(frozen=True)
class EarlyStop:
    """train.early_stop_patience: the run ends once that many evaluations in a row have not raised the best
    val mIoU (TrainState.record_eval counts them). None: it never stops early."""

    patience: int | None

    def should_stop(self, state: TrainState) -> bool:
        return state.patience_spent(self.patience)

    def announce(self, world: D.World, state: TrainState) -> None:
        reporting.print_main(
            world,
            f"early stop at step {state.step}: val mIoU has not improved for {self.patience} evaluations "
            f"(best {state.best_miou:.4f}; train.early_stop_patience={self.patience})",
        )
