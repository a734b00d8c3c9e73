"""One tracker in its own thread: what keeps a failing or stalled tracker from blocking or killing the run.

The training thread hands each report to `TrackerThread.submit`, which never waits: the report goes into a
bounded queue, or, when the queue is full (the tracker is slower than training, or stalled), it is dropped
and counted. The thread builds and opens the tracker, then delivers the reports in order. A report that
raises is counted and the next one is tried (a tracking server may come back); a tracker that cannot be
opened is left out of the run. Each kind of trouble is said once, when it first happens, and counted in one
line at the end. `finish` gives the thread until a deadline to deliver what it holds and close its tracked
run; a thread still busy then (Python cannot interrupt a hung call) is left behind, a daemon that does not
keep the process alive, and the run ends without it.

Resumes: an interrupted attempt may have logged steps past the checkpoint it is resumed from. Reports
stamped with a step the tracked run already holds (TrackedRun.last_step, or the run directory's record of
what was delivered, `RunRecord`) are not sent again, so no step appears twice in MLflow or W&B.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_seg.data.format.urls import redact
from dist_seg.train.tracker_api import TrackedRun, Tracker

QUEUE_SIZE = 1000  # reports: a run makes a few per train.log_every steps, so this is a long backlog
RECORD_NAME = "trackers.json"

# credentials trackers read from the environment; a library's error message could quote one
_SECRET_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "WANDB_API_KEY")


def scrub(text: str) -> str:
    """A tracker's message as the run's log may show it: the URLs in it redacted (urls.redact), and the values
    of the credential environment variables masked (they are not URLs, so redact cannot know them)."""
    text = redact(text)
    for var in _SECRET_VARIABLES:
        if secret := os.environ.get(var):
            text = text.replace(secret, "***")
    return text


def describe(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return scrub(f"{type(e).__name__}: {first}" if first else type(e).__name__)


class RunRecord:
    """out_dir/trackers.json: per tracker, the tracked run's id and the last step delivered to it. A resume
    in the same run directory reads it to know what the interrupted attempt delivered past its checkpoint,
    which a tracker cannot always tell itself (W&B offline). Written atomically; None: rank > 0 or no
    run directory, nothing is kept."""

    def __init__(self, out_dir: Path | None) -> None:
        self.path = Path(out_dir) / RECORD_NAME if out_dir is not None else None
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
                self._data = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):  # a torn or foreign file: it only ever raises the floor
                self._data = {}

    def last_step(self, name: str, run_id: str | None) -> int:
        entry = self._data.get(name)
        if run_id is None or not isinstance(entry, dict) or entry.get("run_id") != run_id:
            return 0
        return int(entry.get("last_step", 0))

    def delivered(self, name: str, run_id: str, step: int) -> None:
        with self._lock:
            entry = self._data.get(name, {})
            if entry.get("run_id") == run_id and int(entry.get("last_step", 0)) >= step:
                return
            self._data[name] = {"run_id": run_id, "last_step": step}
            if self.path is not None:
                tmp = self.path.with_name(f".{self.path.name}.tmp")
                tmp.write_text(json.dumps(self._data, indent=1))
                os.replace(tmp, self.path)


@dataclass(frozen=True)
class Report:
    method: str  # the Tracker method that takes it
    args: tuple[Any, ...]
    step: int | None  # the step it is stamped with; None for reports that are not per step (flush)


class TrackerThread:
    """`open_tracker` builds and opens the tracker (in this thread); reports are delivered in order."""

    def __init__(
        self,
        name: str,
        open_tracker: Callable[[], tuple[Tracker, TrackedRun]],
        record: RunRecord,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.name, self._open_tracker, self._record = name, open_tracker, record
        self._queue: queue.Queue[Report] = queue.Queue(maxsize=queue_size)
        self._closing = threading.Event()
        self._outcome = "finished"
        self._said: set[str] = set()
        self.run: TrackedRun | None = None  # set once the tracker is open
        self.delivered = self.failed = self.dropped = self.repeated = 0
        self._dead = False  # could not be opened: reports are dropped at once
        self._thread = threading.Thread(target=self._work, name=f"tracker-{name}", daemon=True)
        self._thread.start()

    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run is not None else None

    def submit(self, method: str, args: tuple[Any, ...], step: int | None) -> None:
        """Queue a report for the tracker; never waits."""
        if self._dead or self._closing.is_set():
            self.dropped += 1
            return
        try:
            self._queue.put_nowait(Report(method, args, step))
        except queue.Full:
            self.dropped += 1
            self._say_once(
                "full",
                f"{self._queue.maxsize} reports are waiting (the tracker is slower than training, or "
                "stalled): reports are dropped until it catches up",
            )

    def request_close(self, outcome: str) -> None:
        """Deliver what is queued, then close the tracked run with `outcome`; returns at once."""
        self._outcome = outcome
        self._closing.set()

    def finish(self, deadline: float, timeout_s: float) -> None:
        """Wait until `deadline` (time.monotonic) for the thread to close its tracker, then say what was lost."""
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self.dropped += self._queue.qsize()
            self._say(f"still busy after train.logger_timeout_s={timeout_s:g} s: the run ends without it")
        elif self._dead:
            self.dropped += self._queue.qsize()
        if self.failed or self.dropped:
            self._say(f"reports: {self.delivered} delivered, {self.failed} failed, {self.dropped} dropped")

    # ---------------------------------------------------------------------------------------- the thread
    def _work(self) -> None:
        try:
            tracker, run = self._open_tracker()
        except Exception as e:
            self._dead = True
            self._say(f"cannot start ({describe(e)}); it is left out of this run")
            return
        floor = max(run.last_step, self._record.last_step(self.name, run.run_id))
        self.run = run
        if run.where:
            _print(f"train.loggers: {self.name}: {run.where}", sys.stdout)
        if floor > 0:
            _print(
                f"train.loggers: {self.name}: run {run.run_id} already holds steps up to {floor}; "
                "this attempt's reports at those steps are not sent again",
                sys.stdout,
            )
        while True:
            try:
                report = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._closing.is_set():
                    break
                continue
            if report.step is not None and report.step <= floor:
                self.repeated += 1
                continue
            self._deliver(tracker, run, report)
        try:
            tracker.close(self._outcome)
        except Exception as e:
            self._say(f"close failed ({describe(e)})")

    def _deliver(self, tracker: Tracker, run: TrackedRun, report: Report) -> None:
        method = getattr(tracker, report.method, None)
        if method is None:  # an optional method (flush) the tracker does not have
            return
        try:
            method(*report.args)
        except Exception as e:
            self.failed += 1
            self._say_once("error", f"{report.method} failed ({describe(e)}); later reports are still tried")
            return
        if report.method == "flush":  # housekeeping, not a report
            return
        self.delivered += 1
        if report.step is not None and run.run_id is not None:
            try:
                self._record.delivered(self.name, run.run_id, report.step)
            except OSError as e:
                self._say_once("record", f"cannot update {RECORD_NAME} ({describe(e)})")

    def _say_once(self, kind: str, text: str) -> None:
        if kind not in self._said:
            self._said.add(kind)
            self._say(text)

    def _say(self, text: str) -> None:
        _print(f"train.loggers: {self.name}: {scrub(text)}", sys.stderr)


def _print(line: str, stream: Any) -> None:
    print(line, file=stream, flush=True)
