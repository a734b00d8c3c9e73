"""`ordered_map`: a process pool that keeps input order and memory flat, shared by the converter and the EDA."""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import get_context
from typing import Any

IN_FLIGHT_PER_WORKER = 4  # enough to keep workers busy; few enough that results never pile up in memory


def ordered_map(
    fn: Callable[..., Any], items: Iterable[Any], workers: int, args: tuple = ()
) -> Iterator[Any]:
    """`fn(item, *args)` for each item, in order; with workers > 1 in a process pool with at most
    IN_FLIGHT_PER_WORKER items per worker submitted ahead of the consumer."""
    if workers <= 1:
        yield from (fn(item, *args) for item in items)
        return
    with get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item, *args)))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
