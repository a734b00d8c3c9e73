"""The loop's checkpoints: the one a run resumes from (find_resume), writing them when they are due
(Checkpointer), and the stop-signal path that ends a run with one (StopSignalExit).

What a checkpoint holds and how it is written atomically is dist_seg.checkpoint; what its data position and
global batch mean on another geometry is dist_seg.train.resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dist_seg.checkpoint import CheckpointManager, load_checkpoint, training_checkpoint
from dist_seg.config.schema import Config
from dist_seg.runtime import distributed as D
from dist_seg.runtime import fault_injection as faults
from dist_seg.runtime.preemption import Preempted, StopRequest
from dist_seg.runtime.rng_state import capture_rng_state
from dist_seg.train import resume
from dist_seg.train.state import StepSchedule, TrainState
from dist_seg.train.step import StepContext

Saved = tuple[Path, dict[str, Any]]  # a checkpoint's path and its contents, read to the host


def find_resume(cfg: Config, world: D.World) -> tuple[CheckpointManager, Saved | None]:
    """The run's checkpoint directory (train.out_dir), and the checkpoint train.resume names there, which
    every rank has agreed on and read; None to start at step 0."""
    ckpts = CheckpointManager(Path(cfg.train.out_dir), cfg.train.keep_last)
    ckpts.before_rename = faults.before_checkpoint_rename
    path = resume.agree_on_checkpoint(ckpts, cfg, world)
    return ckpts, ((path, load_checkpoint(path, map_location="cpu")) if path is not None else None)


class Checkpointer:
    """Decides when the loop writes a checkpoint, and writes it (every rank calls it at the same steps: the
    RNG states of all ranks are gathered; rank 0 writes last.pt, a step-stamped copy and best.pt)."""

    def __init__(
        self,
        cfg: Config,
        world: D.World,
        ctx: StepContext,
        ckpts: CheckpointManager,
        schedule: StepSchedule,
        num_classes: int,
        class_names: list[str],
        run_key: str | None = None,
    ) -> None:
        self.cfg, self.world, self.ctx, self.ckpts, self.schedule = cfg, world, ctx, ckpts, schedule
        self.num_classes, self.class_names = num_classes, class_names
        self.run_key = run_key  # by which a resume finds the run's MLflow and W&B runs (RunLog.run_key)

    def save_if_due(
        self, state: TrainState, epoch_done: bool, evaluated: bool, is_best: bool, stopping_early: bool
    ) -> None:
        """After a step: save when the schedule says (after every evaluation, so that best.pt holds the
        evaluated weights; at every epoch end; every train.save_every steps), and before an early stop ends
        the run, so that its last.pt is the step it stopped at and a resume does not train on."""
        if self.schedule.should_save(state.step, epoch_done, evaluated) or stopping_early:
            self.save(state, is_best)

    def save(self, state: TrainState, is_best: bool) -> None:
        """A collective: every rank's RNG state is gathered (each restores its own on resume); rank 0
        writes."""
        ctx = self.ctx
        rng = D.all_gather_object(capture_rng_state())
        ck = training_checkpoint(
            self.cfg,
            ctx.model,
            ctx.optimizer,
            ctx.scheduler,
            ctx.scaler,
            state.state_dict(),
            rng,
            self.num_classes,
            self.class_names,
            ctx.ema,
            self.run_key,
        )
        if self.world.is_main:
            self.ckpts.save(ck, state.step, is_best)


class StopSignalExit:
    """The stop-signal path. A stop signal (train.stop_signals) only sets a flag on the rank that got it;
    every rank learns of it at the same point, in the step's all-reduce or an evaluation's. There the run
    ends on every rank at once: a checkpoint of the step reached, then preemption.Preempted."""

    def __init__(self, checkpointer: Checkpointer, stop: StopRequest | None) -> None:
        self.checkpointer, self.stop = checkpointer, stop

    def exit_if_signalled(self, signalled: bool, state: TrainState) -> None:
        """`signalled`: every rank's agreed flag. When set, checkpoint `state` and raise Preempted."""
        if signalled:
            self.checkpointer.save(state, is_best=False)
            raise Preempted(state.step, self.stop.signal_name if self.stop is not None else None)
