"""engine's loop decisions (Plan) and step bookkeeping (TrainState), without a training run."""

from __future__ import annotations

import pytest

from dist_seg.engine import Plan, StepOutput, TrainState


def _out(nonfinite_loss: bool = False) -> StepOutput:
    return StepOutput(1.0, 1.0, nonfinite_loss, 1.0, nonfinite_loss)


def test_epoch_end_evaluation_and_saving_by_default() -> None:
    plan = Plan(steps_per_epoch=3, total_steps=7, grad_accum=2, log_every=5, eval_every=None, save_every=None)
    state = TrainState()
    evaluated, saved, logged = [], [], []
    while state.step < plan.total_steps:
        state.record_step(_out(), plan.grad_accum, max_nonfinite=3)
        logged += [state.step] if plan.should_log(state.step) else []
        epoch_done = plan.epoch_done(state)
        if epoch_done:
            state.next_epoch()
        ev = plan.should_evaluate(state.step, epoch_done)
        evaluated += [state.step] if ev else []
        saved += [state.step] if plan.should_save(state.step, epoch_done, ev) else []
    assert evaluated == saved == [3, 6, 7]  # each epoch end and the last step
    assert logged == [5, 7] and state.epoch == 2 and state.batch_in_epoch == 2


def test_step_counted_evaluation_and_saving() -> None:
    plan = Plan(steps_per_epoch=100, total_steps=10, grad_accum=1, log_every=1, eval_every=4, save_every=3)
    assert [s for s in range(1, 11) if plan.should_evaluate(s, False)] == [4, 8, 10]
    assert [s for s in range(1, 11) if plan.should_save(s, False, plan.should_evaluate(s, False))] == [
        3,
        4,
        6,
        8,
        9,
        10,
    ]


def test_nonfinite_streak_stops_only_when_consecutive() -> None:
    state = TrainState()
    for bad in (True, True, False, True, True):
        state.record_step(_out(bad), 1, max_nonfinite=3)
    assert state.nonfinite_streak == 2
    with pytest.raises(RuntimeError, match="3 consecutive"):
        state.record_step(_out(True), 1, max_nonfinite=3)
