"""The training loop's bookkeeping: what it has done (TrainState, saved in checkpoints) and when it logs,
evaluates and saves (Plan). Pure: no tensors, no collectives, so tests/test_engine.py checks them directly."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

from dist_seg.config import Config


class StepResult(Protocol):
    """What the bookkeeping and the monitor read of one optimizer step (engine.StepOutput; a protocol, so that
    neither imports the engine, which imports both)."""

    loss: float
    grad_norm: float
    skipped: bool  # no optimizer update this step
    loss_scale: float
    nonfinite_loss: bool  # the loss itself was non-finite on some rank


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    batch_in_epoch: int = 0  # loader batches of this epoch already consumed
    best_miou: float = -1.0
    nonfinite_streak: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record_step(self, out: StepResult, grad_accum: int, max_nonfinite: int) -> None:
        """Count one optimizer step; RuntimeError after max_nonfinite non-finite losses in a row (every rank
        sees the same flags, so every rank stops at the same step)."""
        self.step += 1
        self.batch_in_epoch += grad_accum
        # a GradScaler overflow while fp16 tunes its scale is routine: only non-finite losses count
        self.nonfinite_streak = self.nonfinite_streak + 1 if out.nonfinite_loss else 0
        if self.nonfinite_streak >= max_nonfinite:
            raise RuntimeError(
                f"non-finite loss or gradients at step {self.step}: {self.nonfinite_streak} consecutive "
                f"steps skipped (train.max_nonfinite={max_nonfinite}); stopping on every rank"
            )

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            setattr(self, k, v)


@dataclass(frozen=True)
class Plan:
    """When the loop logs, evaluates and saves: each decision in one predicate."""

    steps_per_epoch: int
    total_steps: int
    grad_accum: int
    log_every: int
    eval_every: int | None  # None: at the end of every epoch
    save_every: int | None

    @classmethod
    def from_config(cls, cfg: Config, steps_per_epoch: int, total_steps: int) -> Plan:
        t = cfg.train
        return cls(steps_per_epoch, total_steps, t.grad_accum, t.log_every, t.eval_every, t.save_every)

    def epoch_done(self, state: TrainState) -> bool:
        return state.batch_in_epoch >= self.steps_per_epoch * self.grad_accum

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
