"""What the training and evaluation loaders share: which DataLoader worker is running, and the DataLoader."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_seg.config.schema import DataConfig


def worker_slot() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader worker running this code; (0, 1) in the main process."""
    wi = get_worker_info()
    return (wi.id, wi.num_workers) if wi is not None else (0, 1)


def make_dataloader(cfg: DataConfig, dataset: IterableDataset) -> DataLoader:
    """The DataLoader both loaders use: workers yield whole batches themselves."""
    return DataLoader(
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
