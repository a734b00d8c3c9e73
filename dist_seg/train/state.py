"""The training loop's bookkeeping: what it has done (TrainState, saved in checkpoints) and at which steps it
logs, evaluates and saves and where epochs end (StepSchedule). No collectives and no device work, so
tests/train/test_loop.py checks them directly."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import torch

from dist_seg.config.schema import Config
from dist_seg.data.loading.train_loader import DataPosition


class StepResult(Protocol):
    """What the bookkeeping (TrainState.record_step) and the meter (reporting.TrainMeter) read of one
    optimizer step: step.StepOutput, declared here so that neither depends on the step's module."""

    loss: torch.Tensor  # 0-dim, on the device: the meter sums it there and reads it back once per log line
    grad_norm: torch.Tensor  # 0-dim, on the device
    skipped: bool  # no optimizer update this step
    loss_scale: float
    nonfinite_loss: bool  # the loss itself was non-finite on some rank
    block_grad_norms: torch.Tensor | None  # [model blocks], on the device (None: not measured)


@dataclass
class TrainState:
    """What the loop has done, saved in every checkpoint. The data position is global, not per rank: the
    epoch, the optimizer steps done in it, and the segment of the epoch being read (a resume on another
    geometry starts a new segment over the samples the epoch has not used; see dist_seg.data.loading.plan)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    epoch_step: int = 0  # optimizer steps done in this epoch
    best_miou: float = -1.0
    evals_since_best: int = 0  # evaluations in a row that did not raise best_miou (train.early_stop_patience)
    nonfinite_streak: int = 0
    global_batch: int = 0  # images per optimizer step: data.batch_size x world size x train.grad_accum
    samples: int = 0  # training samples of the dataset the position counts
    segment: int = 0  # segments of this epoch before the current one
    segment_start: int = 0  # epoch_step at which the current segment began
    consumed: list[list[int]] = field(default_factory=list)  # sample-id runs earlier segments used
    geometry: dict[str, int] = field(default_factory=dict)  # data.loading.plan.Geometry of this segment

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record_step(self, out: StepResult, max_nonfinite: int) -> None:
        """Count one optimizer step; RuntimeError after max_nonfinite non-finite losses in a row (every rank
        sees the same flags, so every rank stops at the same step)."""
        self.step += 1
        self.epoch_step += 1
        # a GradScaler overflow while fp16 tunes its scale is routine: only non-finite losses count
        self.nonfinite_streak = self.nonfinite_streak + 1 if out.nonfinite_loss else 0
        if self.nonfinite_streak >= max_nonfinite:
            raise RuntimeError(
                f"non-finite loss or gradients at step {self.step}: {self.nonfinite_streak} consecutive "
                f"steps skipped (train.max_nonfinite={max_nonfinite}); stopping on every rank"
            )

    def record_eval(self, miou: float) -> bool:
        """Count one evaluation; True when it is the best so far (strictly higher mIoU)."""
        best = miou > self.best_miou
        self.best_miou = max(self.best_miou, miou)
        self.evals_since_best = 0 if best else self.evals_since_best + 1
        return best

    def patience_spent(self, patience: int | None) -> bool:
        """train.early_stop_patience evaluations in a row without a new best."""
        return patience is not None and self.evals_since_best >= patience

    def next_epoch(self) -> None:
        self.epoch += 1
        self.epoch_step = self.segment = self.segment_start = 0
        self.consumed = []

    def data_position(self, grad_accum: int) -> DataPosition:
        """Where the loader starts: loader batches of the current segment already consumed on every rank."""
        start_batch = (self.epoch_step - self.segment_start) * grad_accum
        consumed = tuple((int(a), int(b)) for a, b in self.consumed)
        return DataPosition(self.epoch, self.segment, consumed, start_batch)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        known = {f.name for f in fields(self)}
        for k, v in d.items():
            if k in known:
                setattr(self, k, v)


@dataclass(frozen=True)
class StepSchedule:
    """At which optimizer steps the loop logs, evaluates and saves, and when an epoch's steps are done: each
    decision in one predicate of the step count. (Not dist_seg.data.loading.plan, which decides who reads
    which samples.)"""

    steps_per_epoch: int
    total_steps: int
    grad_accum: int
    log_every: int
    eval_every: int | None  # None: at the end of every epoch
    save_every: int | None
    global_batch: int = 0  # images per optimizer step over all ranks

    @classmethod
    def from_config(
        cls, cfg: Config, steps_per_epoch: int, total_steps: int, world_size: int
    ) -> StepSchedule:
        t, g = cfg.train, cfg.data.batch_size * world_size * cfg.train.grad_accum
        return cls(steps_per_epoch, total_steps, t.grad_accum, t.log_every, t.eval_every, t.save_every, g)

    def finished(self, state: TrainState) -> bool:
        """All train.max_steps (or train.epochs' worth of) optimizer steps are done."""
        return state.step >= self.total_steps

    def epoch_done(self, state: TrainState) -> bool:
        """The epoch in progress has had all its optimizer steps (the loader's batch count, on every rank)."""
        return state.epoch_step >= self.steps_per_epoch

    def should_log(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total_steps

    def should_evaluate(self, step: int, epoch_done: bool) -> bool:
        return bool(
            (self.eval_every and step % self.eval_every == 0)
            or (self.eval_every is None and epoch_done)
            or step == self.total_steps
        )

    def should_save(self, step: int, epoch_done: bool, evaluated: bool) -> bool:
        # after every evaluation (so best.pt is the evaluated weights) and at every epoch end
        return bool(epoch_done or evaluated or (self.save_every and step % self.save_every == 0))
