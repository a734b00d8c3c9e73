"""Loader workers and stop signals (dist_seg.data.loading.workers, dist_seg.runtime.preemption): a worker that
gets a stop signal from outside (torchrun's os.killpg of a rank's group, SLURM signalling every process)
lives on while its rank iterates, and leaves when the loader is shut down; its parent's SIGTERM still ends
it, so a process that exits with a live loader does not wait on it forever."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import torch
from torch.utils.data import IterableDataset

from dist_seg.config.schema import DataConfig
from dist_seg.data.loading.workers import make_dataloader, worker_slot
from dist_seg.runtime.preemption import StopRequest, shield_child

N = 40


class _Numbers(IterableDataset):
    """0..N-1 split over the workers, slowly enough that the signal lands mid-pass; each item says which
    process made it."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        worker, workers = worker_slot()
        for i in range(worker, N, workers):
            time.sleep(0.02)
            yield os.getpid(), i


def _kill_from_outside(pids: Iterable[int], sig: signal.Signals) -> None:
    """Signal `pids` from another process, as torchrun or slurmstepd do (not from the workers' parent)."""
    subprocess.run(["kill", f"-{sig.name[3:]}", *map(str, pids)], check=True, timeout=30)


def _gone(pids: Iterable[int], within: float = 10) -> bool:
    """Every pid has exited and been reaped, within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _loader(pin_memory: bool = False, persistent: bool = False):
    cfg = DataConfig(num_workers=2, pin_memory=pin_memory, persistent_workers=persistent)
    return make_dataloader(cfg, _Numbers())


@pytest.mark.parametrize(
    "pin_memory",
    [
        False,
        pytest.param(
            True,
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
        ),
    ],
)
def test_a_worker_survives_a_stop_signal_and_leaves_with_the_loader(pin_memory: bool) -> None:
    stop = StopRequest([signal.SIGTERM, signal.SIGUSR1])
    try:
        loader = _loader(pin_memory, persistent=True)  # as the train loader: workers outlive a pass
        batches = iter(loader)
        got = [next(batches) for _ in range(4)]  # the DataLoader takes the workers' items in turn
        workers = {pid for pid, _ in got}
        assert len(workers) == 2 and os.getpid() not in workers
        _kill_from_outside(workers, signal.SIGTERM)
        _kill_from_outside(workers, signal.SIGUSR1)  # SIGUSR1's default action would end them too
        got += list(batches)
    finally:
        stop.close()
    assert sorted(i for _, i in got) == list(range(N))  # the pass went on to its end
    assert not stop.requested  # the rank itself was not signalled
    assert not _gone(workers, within=0.5)  # persistent workers outlive the pass...
    del loader, batches  # ...until the loader is shut down
    assert _gone(workers)


def test_without_a_stop_request_the_signal_ends_the_worker_and_the_pass() -> None:
    """The failure the shield prevents: torch's worker dies of SIGTERM, and its rank raises."""
    batches = iter(_loader())
    workers = {pid for pid, _ in (next(batches) for _ in range(4))}
    with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid.*\) (is killed by signal|exited)"):
        _kill_from_outside(workers, signal.SIGTERM)
        for _ in batches:
            pass
    del batches
    assert _gone(workers)


def _shielded_sleeper(ready: multiprocessing.synchronize.Event) -> None:
    shield_child([signal.SIGTERM, signal.SIGUSR1])
    ready.set()
    time.sleep(60)


def test_a_shielded_process_still_leaves_on_its_parents_sigterm() -> None:
    """torch's DataLoader shutdown and multiprocessing's exit handler terminate() workers (SIGTERM from the
    parent) before joining them: that must still end a shielded worker."""
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_shielded_sleeper, args=(ready,), daemon=True)
    child.start()
    try:
        assert ready.wait(30)
        _kill_from_outside([child.pid], signal.SIGTERM)
        _kill_from_outside([child.pid], signal.SIGUSR1)
        child.join(1)
        assert child.is_alive()  # signals from others are discarded
        child.terminate()  # SIGTERM from its parent
        child.join(10)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()


def test_a_process_that_fails_with_a_live_loader_still_exits() -> None:
    """An uncaught error keeps the loader alive until the interpreter exits; multiprocessing then
    terminates and joins the workers. Were the stop signals simply ignored (SIG_IGN), that join would wait
    forever."""
    script = (
        "import signal, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from test_workers import _loader\n"
        "from dist_seg.runtime.preemption import StopRequest\n"
        "stop = StopRequest([signal.SIGTERM])\n"
        "batches = iter(_loader())\n"
        "next(batches)\n"
        "raise RuntimeError('failed with a live loader')\n"
    )
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(here.parents[2])}  # the repository
    r = subprocess.run(
        [sys.executable, "-c", script, str(here)], capture_output=True, text=True, timeout=60, env=env
    )
    assert r.returncode == 1 and "failed with a live loader" in r.stderr, r.stderr[-2000:]
