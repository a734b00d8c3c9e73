"""Stopping on a signal with a checkpoint: what a preempted, cancelled or drained job gets.

The signals of config key train.stop_signals (default SIGTERM, which scancel, a preemption or a node drain
send and torchrun forwards to its workers, and SIGUSR1, which SLURM's `--signal=USR1@SECONDS` sends ahead of
the time limit) only set a flag. The training loop carries the flag in the per-step all-reduce it already
makes, so every rank sees it at the same step boundary; then rank 0 writes a checkpoint of the step reached
(an evaluation in progress is abandoned at its next batch, and its partial result is not reported) and
every process exits with PREEMPTED_EXIT_CODE, leaving OUT/preempted.json behind. The time from the signal
to the exit is one training step (or one evaluation batch) plus one checkpoint write.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: try again later (resume with train.resume=auto)
MARKER = "preempted.json"


class Preempted(Exception):
    """Raised by the loop once the checkpoint of `step` is written after a stop signal."""

    def __init__(self, step: int, signal_name: str | None):
        super().__init__(f"stopped at step {step} on {signal_name or 'a stop signal on another rank'}")
        self.step, self.signal_name = step, signal_name


def parse_signals(text: str) -> list[signal.Signals]:
    """`SIGTERM,SIGUSR1` -> the signals; ValueError naming config key train.stop_signals otherwise."""
    out = []
    for name in (n.strip().upper() for n in text.split(",") if n.strip()):
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name in ("SIGKILL", "SIGSTOP") or not hasattr(signal.Signals, name):
            raise ValueError(f"config key train.stop_signals: {name} is not a signal a process can catch")
        out.append(signal.Signals[name])
    return out


class StopRequest:
    """The flag the stop signals set (in this process only; the loop makes every rank agree on it)."""

    def __init__(self, signals: list[signal.Signals]):
        self.signal_name: str | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            print(
                f"[dist_seg] {self.signal_name} received: checkpoint at the next step, then exit", flush=True
            )

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def close(self) -> None:
        """Put back the handlers that were there before."""
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}


def write_marker(out_dir: str | Path, stopped: Preempted) -> Path:
    """OUT/preempted.json: the step the checkpoint holds and the signal, for requeue scripts."""
    path = Path(out_dir) / MARKER
    record: dict[str, Any] = {"step": stopped.step, "signal": stopped.signal_name, "time": time.time()}
    path.write_text(json.dumps(record) + "\n")
    return path


def clear_marker(out_dir: str | Path) -> None:
    (Path(out_dir) / MARKER).unlink(missing_ok=True)
