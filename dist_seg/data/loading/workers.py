"""What the training and evaluation loaders share: which DataLoader worker is running, and the DataLoader.

Loader workers and stop signals: torchrun forwards a stop signal to each rank's whole process group, and
SLURM signals every process of the job, so a rank's loader workers get the signal too, and torch's worker
dies of SIGTERM, taking the rank down before its checkpoint. The DataLoader here starts its workers with the stop
signals the rank handles (dist_seg.runtime.preemption.handled_signals, set by the StopRequest that
train.stop_signals makes) blocked, and each worker discards them from then on (preemption.shield_child). A
worker leaves when the rank shuts the loader down (as the run ends, or an evaluation is cut short), or when
the rank is gone (torch's watchdog); a SIGTERM from the rank itself still ends it.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_seg.config.schema import DataConfig
from dist_seg.runtime import preemption


def worker_slot() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader worker running this code; (0, 1) in the main process."""
    wi = get_worker_info()
    return (wi.id, wi.num_workers) if wi is not None else (0, 1)


def _shield_worker(signals: tuple[signal.Signals, ...], worker_id: int) -> None:
    """worker_init_fn: torch has installed its worker signal handlers by now; the stop signals bypass them."""
    preemption.shield_child(signals)


class _StopSafeLoader(DataLoader):
    """A DataLoader whose workers outlive the stop signals this process handles when it starts them."""

    def __iter__(self) -> Iterator[Any]:
        signals = preemption.handled_signals() if self.num_workers > 0 else ()
        # read now, not at construction: the signals are the ones handled when the workers start
        self.worker_init_fn = functools.partial(_shield_worker, signals) if signals else None
        with preemption.signals_blocked(signals):  # workers fork with them blocked: no window to die in
            return super().__iter__()


def make_dataloader(cfg: DataConfig, dataset: IterableDataset) -> DataLoader:
    """The DataLoader both loaders use: workers yield whole batches themselves, and survive stop signals."""
    return _StopSafeLoader(
        dataset,
        batch_size=None,  # workers batch themselves: each owns whole batches
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        persistent_workers=cfg.persistent_workers and cfg.num_workers > 0,
        prefetch_factor=2 if cfg.num_workers > 0 else None,
        # workers seed themselves from (seed, rank, worker, epoch); a private generator keeps the loader's
        # base-seed draw out of the global RNG, so a resumed run's dropout masks match an uninterrupted run's
        generator=torch.Generator().manual_seed(0),
    )
