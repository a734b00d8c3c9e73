"""Run tracking: the one path a training run's reports take to every tracker in train.loggers.

The loop reports to a `RunLog` (dist_seg.train.reporting makes the reports). Each report is made once, on
rank 0: values as floats, images rendered, the config in its three forms (tracker_api.ConfigReport), and
handed to each tracker's TrackerThread, so TensorBoard, MLflow, W&B and a tracker of your own receive the same
reports and none of them can block or kill the run (dist_seg.train.tracker_thread). On other ranks a RunLog
holds no trackers and every call does nothing.

Trackers by name: `BUILTIN` maps tensorboard, mlflow and wandb to their classes and the pip extras they need;
any other train.loggers entry is `package.module:Class`, a class with tracker_api.Tracker's methods.

Resumes: a training run has a key, made at its first step and kept in every checkpoint from the first on
(`run_key`), by which each tracker finds its tracked run again, so a resume continues the same MLflow and W&B
runs, in the same run directory or a fresh one, whether or not a tracker had finished opening when the
checkpoint was written.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import secrets
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from dist_seg.config.schema import Config, to_dict, to_yaml
from dist_seg.data.format.urls import redacted_config
from dist_seg.runtime import distributed as D
from dist_seg.runtime.preemption import Preempted
from dist_seg.train.tracker_api import ConfigReport, TrackedRun, Tracker, TrackerSetup
from dist_seg.train.tracker_thread import RunRecord, TrackerThread

# name -> (module:Class, the pip extra whose package it imports, or None)
BUILTIN: dict[str, tuple[str, str | None]] = {
    "tensorboard": ("dist_seg.train.tensorboard:TensorBoardTracker", None),
    "mlflow": ("dist_seg.train.mlflow_tracker:MLflowTracker", "mlflow"),
    "wandb": ("dist_seg.train.wandb_tracker:WandbTracker", "wandb"),
}


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None for it, i.e. its import is blocked
        return False


def missing_extra(spec: str) -> str | None:
    """For a built-in tracker whose package is not installed, what to install; None otherwise."""
    extra = BUILTIN.get(spec, ("", None))[1]
    if extra is None or installed(extra):
        return None
    return f"{extra} is not installed: pip install -e .[{extra}] (or pip install {extra})"


def tracker_class(spec: str) -> type[Tracker]:
    """The class a train.loggers entry names; ImportError or ValueError saying what is wrong."""
    if (missing := missing_extra(spec)) is not None:
        raise ImportError(missing)
    path = BUILTIN[spec][0] if spec in BUILTIN else spec
    module_name, _, attr = path.partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise ValueError(f"module {module_name} has no class {attr}")
    return cls


def config_report(cfg: Config) -> ConfigReport:
    """The config as trackers get it: every URL in it redacted (urls.redacted_config), as config.yaml is."""
    shown = redacted_config(cfg)
    tree = to_dict(shown)
    params = {key: v if isinstance(v, str) else json.dumps(v) for key, v in _flatten(tree).items()}
    return ConfigReport(tree, params, to_yaml(shown))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _open(spec: str, setup: TrackerSetup) -> tuple[Tracker, TrackedRun]:
    tracker = tracker_class(spec)(setup)
    return tracker, tracker.open()


class RunLog:
    """Where the loop's reports go: every tracker of train.loggers, each in its own thread (rank 0 only)."""

    def __init__(self, threads: list[TrackerThread], timeout_s: float, run_key: str | None) -> None:
        self.threads, self.timeout_s = threads, timeout_s
        self.run_key = run_key  # what checkpoints keep (None on ranks other than 0, which write none)
        self._closed = False

    @classmethod
    def start(cls, cfg: Config, world: D.World, resumed_step: int | None, run_key: str | None) -> RunLog:
        """Start the trackers of cfg.train.loggers on rank 0 (opening them happens in their threads).
        `resumed_step` and `run_key`: the checkpoint's, when resuming (a checkpoint without a key, or a
        new run, gets a new key)."""
        t = cfg.train
        if not world.is_main:
            return cls([], t.logger_timeout_s, None)
        key = run_key or secrets.token_hex(8)
        out = Path(t.out_dir)
        record = RunRecord(out)
        run_name = t.run_name or out.resolve().name
        threads = []
        for spec in t.loggers:
            setup = TrackerSetup(cfg, out, run_name, key, resumed_step)
            threads.append(TrackerThread(spec, partial(_open, spec, setup), record))
        return cls(threads, t.logger_timeout_s, key)

    @property
    def active(self) -> bool:
        """Whether any tracker takes reports here (rank 0 with train.loggers set)."""
        return bool(self.threads)

    def _submit(self, method: str, args: tuple[Any, ...], step: int | None) -> None:
        for thread in self.threads:
            thread.submit(method, args, step)

    def config(self, cfg: Config, step: int) -> None:
        """The resolved config, once per attempt (`step`: the step it starts at)."""
        if self.active:
            self._submit("config", (config_report(cfg), step), None)

    def scalars(self, values: dict[str, Any], step: int) -> None:
        if self.active:
            self._submit("scalars", ({k: float(v) for k, v in values.items()}, step), step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An [H, W, 3] uint8 picture."""
        if self.active:
            self._submit("image", (tag, image, step), step)

    def final(self, settings: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        if self.active:
            self._submit("final", (settings, {k: float(v) for k, v in metrics.items()}, step), step)

    def flush(self) -> None:
        self._submit("flush", (), None)

    def close(self, outcome: str = "finished") -> None:
        """Let every tracker deliver what it holds and close its run, all within train.logger_timeout_s."""
        if self._closed:
            return
        self._closed = True
        for thread in self.threads:
            thread.request_close(outcome)
        deadline = time.monotonic() + self.timeout_s
        for thread in self.threads:
            thread.finish(deadline, self.timeout_s)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.close("finished")
        else:
            self.close("preempted" if isinstance(exc, Preempted) else "failed")
