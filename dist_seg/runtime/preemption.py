"""Stopping on a signal with a checkpoint: what a preempted, cancelled or drained job gets.

The signals of config key train.stop_signals (default SIGTERM, which scancel, a preemption or a node drain
send and torchrun forwards to its workers, and SIGUSR1, which SLURM's `--signal=USR1@SECONDS` sends ahead of
the time limit) only set a flag. The training loop carries the flag in the per-step all-reduce it already
makes, so every rank sees it at the same step boundary; then rank 0 writes a checkpoint of the step reached
(an evaluation in progress is abandoned at its next batch, and its partial result is not reported) and
every process exits with PREEMPTED_EXIT_CODE, leaving OUT/preempted.json behind. The time from the signal
to the exit is one training step (or one evaluation batch) plus one checkpoint write.

Helper processes must outlive the signal until that checkpoint is written. torchrun forwards a signal to each
rank's whole process group (os.killpg), and SLURM signals every process of a job step, so a rank's DataLoader
workers get it too. torch's worker installs its own SIGTERM handler, which dies of a SIGTERM from anyone but
the worker's parent, and the rank then fails with "DataLoader worker ... is killed by signal: Terminated".
So the stop signals a StopRequest handles are recorded here (handled_signals), the loader
(dist_seg.data.loading.workers) starts its workers with them blocked (signals_blocked), and each worker hands
them to a thread that discards them (shield_child), keeping only what torch relies on: SIGTERM from the
worker's own parent (DataLoader shutdown, multiprocessing's exit) still ends it. A worker leaves when its
rank shuts the loader down, or when its rank is gone (torch's watchdog).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: try again later (resume with train.resume=auto)
MARKER = "preempted.json"

# The stop signals the live StopRequest of this process handles; read by the loader as it starts workers.
_handled: tuple[signal.Signals, ...] = ()


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
        global _handled
        self.signal_name: str | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}
        _handled = tuple(signals)

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
        global _handled
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}
        _handled = ()


def handled_signals() -> tuple[signal.Signals, ...]:
    """The stop signals a StopRequest of this process handles now (none without one): those its helper
    processes must not die of."""
    return _handled


@contextmanager
def signals_blocked(signals: Collection[signal.Signals]) -> Iterator[None]:
    """Hold `signals` back in the calling thread meanwhile. A process forked meanwhile starts with them
    blocked, so one that arrives before it has called shield_child waits for it instead of killing it; this
    process gets any that arrived once the block ends (other threads take them meanwhile)."""
    if not signals:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def shield_child(signals: Collection[signal.Signals]) -> None:
    """In a helper process (a DataLoader worker): `signals` no longer end it, except SIGTERM from its parent.

    They are blocked and a daemon thread takes them with sigwaitinfo, which also names the sender. Ignoring
    them outright (SIG_IGN) would also ignore the parent's SIGTERM, which torch's DataLoader shutdown and
    multiprocessing's exit handler send before they join a worker: a parent exiting with a live loader
    (an uncaught error keeps its frames) would then wait forever."""
    if not signals:
        return
    wanted = frozenset(signals)
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)  # in this thread, and every thread it starts later
    parent = os.getppid()
    threading.Thread(target=_discard, args=(wanted, parent), name="stop-signals", daemon=True).start()


def _discard(signals: frozenset[signal.Signals], parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(signals)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)  # what torch's own SIGTERM handler does for its parent: leave quietly


def write_marker(out_dir: str | Path, stopped: Preempted) -> Path:
    """OUT/preempted.json: the step the checkpoint holds and the signal, for requeue scripts."""
    path = Path(out_dir) / MARKER
    record: dict[str, Any] = {"step": stopped.step, "signal": stopped.signal_name, "time": time.time()}
    path.write_text(json.dumps(record) + "\n")
    return path


def clear_marker(out_dir: str | Path) -> None:
    (Path(out_dir) / MARKER).unlink(missing_ok=True)
