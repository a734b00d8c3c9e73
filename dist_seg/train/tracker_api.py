"""What a run tracker is (train.loggers): the contract TensorBoard, MLflow, W&B and a tracker of your own
implement, and what each is given.

A tracker is a class called with a `TrackerSetup`; it is built, opened and fed in its own thread on rank 0
(dist_seg.train.tracker_thread), one report at a time, in the order the run made them. Its constructor should
only keep the setup: the connection is made in `open`, whose failure leaves the tracker out of the run. Any
method may raise; the report is then counted as failed and the next one is tried. A method may also block:
it costs that tracker its later reports, never the run.

The reports, the same for every tracker (dist_seg.train.reporting makes them):

- `config`: once per attempt, the resolved config (URLs as urls.redact shows them) as a tree, as flat
  `section.key` parameters and as YAML text, stamped with the step the attempt starts at.
- `scalars`: tag -> value, at a step (train/..., val/..., val/iou/<class name>; README "Run tracking").
- `image`: an [H, W, 3] uint8 picture (val/samples, val/confusion) at a step.
- `final`: the run's main settings and its final metrics (miou, pixel_acc, mean_acc, image_miou) at the last
  step.
- `close`: how the attempt ended: "finished", "preempted" (a stop signal; it will be resumed) or "failed".

An optional `flush()` is called after each evaluation's reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dist_seg.config.schema import Config

OUTCOMES = ("finished", "preempted", "failed")


@dataclass(frozen=True)
class TrackerSetup:
    """What a tracker is built from."""

    cfg: Config  # the run's config (no credentials: the preflight refuses them in config keys)
    out_dir: Path  # train.out_dir; a tracker with local files keeps them under it
    run_name: str  # train.run_name, or the last part of out_dir
    run_key: str  # this training run's key, the same in every attempt (checkpoints keep it): a tracker finds
    # its tracked run by it (W&B: the run id; MLflow: a run tag) and makes one when there is none
    resumed_step: int | None  # the step of the checkpoint the attempt resumed from; None: step 0


@dataclass(frozen=True)
class TrackedRun:
    """What `Tracker.open` found or made."""

    run_id: str | None  # the tracker's own id of the run, for the log and trackers.json (None: it has none)
    last_step: int = 0  # the highest step the tracked run already holds: later reports at or below it are
    # not sent again (0 for a new run; what an interrupted attempt logged past its checkpoint otherwise)
    where: str = ""  # one line for the log: where the reports go (URLs redacted)


@dataclass(frozen=True)
class ConfigReport:
    """The resolved config, in the three forms trackers take it."""

    tree: dict[str, Any]  # nested sections, as in config.yaml
    params: dict[str, str]  # `section.key` -> value (strings as written, anything else as JSON)
    yaml: str


class Tracker(Protocol):
    def __init__(self, setup: TrackerSetup) -> None: ...

    def open(self) -> TrackedRun: ...

    def config(self, report: ConfigReport, step: int) -> None: ...

    def scalars(self, values: dict[str, float], step: int) -> None: ...

    def image(self, tag: str, image: np.ndarray, step: int) -> None: ...

    def final(self, settings: dict[str, Any], metrics: dict[str, float], step: int) -> None: ...

    def close(self, outcome: str) -> None: ...
