"""Fault injection for drills and tests. Every switch is an environment variable read here and nowhere else;
all are off unless set. A fault fires only in the torchrun attempt named by DIST_SEG_FAULT_ATTEMPT (default 0,
the first), so a restarted job runs clean.

    DIST_SEG_FAULT_KILL_AT_STEP=STEP[:RANK]       SIGKILL rank RANK (default 0) as step STEP starts
    DIST_SEG_FAULT_NAN_AT_STEP=STEP[,STEP...]     make the loss NaN at these steps (on every rank)
    DIST_SEG_FAULT_NAN_FROM_STEP=STEP[:RANK]      make the loss NaN from STEP on (on RANK only, default all)
    DIST_SEG_FAULT_STALL_AT_STEP=STEP:RANK:SECS   rank RANK sleeps SECS seconds as step STEP starts
    DIST_SEG_FAULT_KILL_IN_CHECKPOINT=STEP        SIGKILL the writer after the checkpoint of step STEP is
                                                  written and fsynced, before its rename

Not a fault, a record for drills: DIST_SEG_RECORD_KEYS=DIR appends "step key" lines of the samples each rank
trains on to DIR/keys-rank{RANK}.txt (in every attempt), so a test can check which samples a run used.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from typing import Any

import torch

_PREFIX = "DIST_SEG_FAULT_"


def _env(name: str) -> str | None:
    value = os.environ.get(_PREFIX + name)
    if not value:
        return None
    attempt = int(os.environ.get(_PREFIX + "ATTEMPT", "0"))
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) != attempt:
        return None
    return value


def _ints(value: str) -> list[int]:
    return [int(v) for v in value.replace(":", ",").split(",") if v.strip()]


def active() -> list[str]:
    """Names of the fault switches set in this process's environment (printed at start-up as a warning)."""
    return sorted(
        k for k, v in os.environ.items() if k.startswith(_PREFIX) and v and k != _PREFIX + "ATTEMPT"
    )


def on_step(step: int, rank: int) -> None:
    """Called as each optimizer step starts."""
    kill = _env("KILL_AT_STEP")
    if kill:
        parts = _ints(kill)
        if step == parts[0] and rank == (parts[1] if len(parts) > 1 else 0):
            print(f"[fault] SIGKILL rank {rank} at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    stall = _env("STALL_AT_STEP")
    if stall:
        s, r, secs = _ints(stall)
        if step == s and rank == r:
            print(f"[fault] rank {rank} stalls {secs}s at step {step}", flush=True)
            time.sleep(secs)


def poison_loss(loss: torch.Tensor, step: int) -> torch.Tensor:
    """The loss, or NaN where a NaN fault is set for this step."""
    at = _env("NAN_AT_STEP")
    if at and step in _ints(at):
        return loss * float("nan")
    frm = _env("NAN_FROM_STEP")
    if frm:
        parts = _ints(frm)
        rank = int(os.environ.get("RANK", "0"))
        if step >= parts[0] and (len(parts) == 1 or rank == parts[1]):
            return loss * float("nan")
    return loss


def before_checkpoint_rename(step: int | None) -> None:
    """Called by the checkpoint writer between fsync of the temp file and the rename."""
    at = _env("KILL_IN_CHECKPOINT")
    if at and step is not None and step == int(at):
        print(f"[fault] SIGKILL while writing the checkpoint of step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def record_keys(step: int, rank: int, batches: Iterable[Any]) -> None:
    """Append the sample keys of this step's batches (anything with `.keys`) to
    DIST_SEG_RECORD_KEYS/keys-rank{rank}.txt when that is set; nothing is built when it is not."""
    folder = os.environ.get("DIST_SEG_RECORD_KEYS")
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"keys-rank{rank}.txt"), "a") as f:
        f.writelines(f"{step} {k}\n" for b in batches for k in b.keys)
