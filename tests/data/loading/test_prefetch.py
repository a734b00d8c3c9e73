"""Copy-ahead to the device (dist_seg.data.loading.prefetch): on CPU a pass-through in order."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_seg.data.loading.prefetch import Prefetcher


@dataclass
class _Batch:
    images: torch.Tensor
    keys: list[str]


def test_the_prefetcher_passes_cpu_batches_through_in_order() -> None:
    batches = [_Batch(torch.full((1,), i), [str(i)]) for i in range(4)]
    got = list(Prefetcher(iter(batches), torch.device("cpu"), ("images",)))
    assert [b.keys for b in got] == [["0"], ["1"], ["2"], ["3"]]
    assert all(g is b for g, b in zip(got, batches, strict=True))
    assert list(Prefetcher(iter([]), torch.device("cpu"), ("images",))) == []
