"""Progress for long command-line jobs (convert, eda, predict): a tqdm bar on a terminal, plain lines otherwise.

A tqdm bar written to a file or a pipe (`dist-seg convert ... > log`, a batch job's log) becomes one line of
carriage returns; there, one ordinary line per 10% of the work or per `interval_s` seconds is readable.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from tqdm import tqdm


class _Reporter:
    """What every reporter shares: `write` prints a whole line; a context manager closes it."""

    file: IO[str]

    def update(self, k: int = 1) -> None:
        pass

    def write(self, msg: str) -> None:
        print(msg, file=self.file, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self) -> _Reporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class PlainProgress(_Reporter):
    """tqdm's `update` / `write` / `close` as plain lines: `convert: 120/300 img (40%), 25.1 img/s`."""

    def __init__(self, total: int, desc: str, unit: str, file: IO[str], interval_s: float = 30.0) -> None:
        self.total, self.desc, self.unit, self.file, self.interval_s = total, desc, unit, file, interval_s
        self.n = 0
        self._start = self._last_time = time.monotonic()
        self._next_fraction = 0.1
        self._printed_n = 0

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        fraction = self.n / self.total if self.total else 1.0
        if fraction >= self._next_fraction or now - self._last_time >= self.interval_s:
            self._line(now)
            while self._next_fraction <= fraction:
                self._next_fraction += 0.1

    def _line(self, now: float) -> None:
        rate = self.n / max(now - self._start, 1e-9)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        print(
            f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {rate:.1f} {self.unit}/s", file=self.file
        )
        self.file.flush()
        self._last_time, self._printed_n = now, self.n

    def close(self) -> None:
        if self.n != self._printed_n:  # the final count, unless the last line already showed it
            self._line(time.monotonic())


class _Disabled(_Reporter):
    """No progress at all (--quiet): warnings still reach stderr."""

    def __init__(self, file: IO[str]) -> None:
        self.file = file


class _Bar(_Reporter):
    """A tqdm bar whose `write` prints above the bar instead of through it."""

    def __init__(self, total: int, desc: str, unit: str, file: IO[str]) -> None:
        self._bar = tqdm(total=total, desc=desc, unit=unit, file=file)
        self.file = file

    def update(self, k: int = 1) -> None:
        self._bar.update(k)

    def write(self, msg: str) -> None:
        tqdm.write(msg, file=self.file)

    def close(self) -> None:
        self._bar.close()


def progress(
    total: int, desc: str, unit: str = "img", enabled: bool = True, file: IO[str] | None = None
) -> Any:
    """A progress reporter with `update(k)`, `write(msg)` and `close()` (also a context manager)."""
    file = file if file is not None else sys.stderr
    if not enabled:
        return _Disabled(file)
    if getattr(file, "isatty", lambda: False)():
        return _Bar(total, desc, unit, file)
    return PlainProgress(total, desc, unit, file)
