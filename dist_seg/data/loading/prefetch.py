"""Copy-ahead to the device: the next batch is copied to the accelerator while the current step runs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor


class Prefetcher:
    """Iterate batches already on `device`: on CUDA the next batch is copied on a side stream while the caller
    computes on the current one (pinned host memory makes the copy asynchronous); elsewhere a plain
    pass-through. `fields` names the tensor attributes of a batch to move (train_loader.TRAIN_TENSORS); the
    rest, such as the host-side content sizes the colour step reads, stays where it is."""

    def __init__(self, batches: Iterator[Any], device: torch.device, fields: Sequence[str]):
        self.batches, self.device, self.fields = batches, device, tuple(fields)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.next: Any = None
        self._load()

    def _load(self) -> None:
        try:
            batch = next(self.batches)
        except StopIteration:
            self.next = None
            return
        if self.stream is None:
            self.next = batch
            return
        with torch.cuda.stream(self.stream):
            for name in self.fields:
                value = getattr(batch, name)
                if isinstance(value, Tensor):
                    setattr(batch, name, value.to(self.device, non_blocking=True))
        self.next = batch

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if self.next is None:
            raise StopIteration
        batch = self.next
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            for name in self.fields:  # the tensors are now used on the compute stream too
                value = getattr(batch, name)
                if isinstance(value, Tensor):
                    value.record_stream(torch.cuda.current_stream(self.device))
        self._load()
        return batch
