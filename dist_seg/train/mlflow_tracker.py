"""train.loggers `mlflow`: the run's reports in an MLflow run (the `mlflow` extra: pip install -e .[mlflow]).

Where: train.mlflow_tracking_uri, else MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db in
the working directory); experiment train.mlflow_experiment, else MLFLOW_EXPERIMENT_NAME, else `dist_seg`.
What lands where in the MLflow run:

- params: the resolved config as `section.key` (a resumed attempt adds keys that are new; MLflow does not
  let a param change, so a changed value is said in the log, and the attempt's config.yaml artifact has it);
- metrics: every scalar at its step (train/..., val/..., val/iou/<class>), names as MLflow allows them
  (characters other than letters, digits, `_ - . / space` become `_`), and final/<metric> at the last step;
- artifacts: config.yaml (config-resumed-at-step-N.yaml for a resumed attempt) and the images, by step
  (MLflow's log_image: images/val~samples+step+N+...png);
- tags: dist_seg.run_key (by which a resume finds the run: every attempt of a training run, wherever its
  run directory, continues the same MLflow run) and dist_seg.out_dir;
- status: FINISHED, KILLED (a stop signal; the run is resumed later) or FAILED.

Credentials stay out of every config key (the preflight refuses them there). MLFLOW_TRACKING_URI may carry
them as user info; for http(s) they are moved into MLFLOW_TRACKING_USERNAME/PASSWORD of this process before
MLflow sees the URI, so that the URLs MLflow prints or puts in its errors have none.

A new experiment on a local sqlite store keeps its artifacts beside the database (mlartifacts/<experiment>)
rather than in ./mlruns of whatever directory the run was started from.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import numpy as np

from dist_seg.data.format.urls import redact
from dist_seg.train.tracker_api import ConfigReport, TrackedRun, TrackerSetup

DEFAULT_EXPERIMENT = "dist_seg"
KEY_TAG = "dist_seg.run_key"  # the run tag by which a resume finds the run (TrackerSetup.run_key)
STATUS = {"finished": "FINISHED", "preempted": "KILLED", "failed": "FAILED"}
_BATCH = 100  # MLflow's limit of params per log_batch call (metrics: 1000)
STEP_KEYS = ("train/loss", "val/miou", "val_ema/miou", "final/miou")


def metric_key(tag: str) -> str:
    """`tag` as an MLflow metric name: letters, digits, `_ - . / space`, and no empty, `.` or `..` parts."""
    key = re.sub(r"[^/\w.\- ]", "_", tag)
    return "/".join(p if p not in ("", ".", "..") else "_" for p in key.split("/"))


def tracking_uri(configured: str | None) -> str | None:
    """The tracking URI to use (None: MLflow's default). User info of an http(s) URI from the environment
    moves into MLFLOW_TRACKING_USERNAME/PASSWORD (unless those are set) and out of MLFLOW_TRACKING_URI."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    p = urlsplit(uri)
    if p.scheme in ("http", "https") and p.username is not None:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(p.username))
        if p.password is not None:
            os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(p.password))
        netloc = (p.hostname or "") + (f":{p.port}" if p.port else "")
        uri = urlunsplit((p.scheme, netloc, p.path, p.query, p.fragment))
        if not configured:  # MLflow's artifact client reads the variable again
            os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def shown_uri(uri: str) -> str:
    """The URI as the log shows it: redacted when it names a server (a local store's path has nothing to hide,
    and redact would fold its `///`)."""
    return redact(uri) if urlsplit(uri).netloc else uri


def _artifact_location(uri: str, experiment: str) -> str | None:
    """For a local sqlite store, the new experiment's artifact directory beside the database."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :]).resolve()
    return (db.parent / "mlartifacts" / quote(experiment, safe="")).as_uri()


class MLflowTracker:
    def __init__(self, setup: TrackerSetup) -> None:
        self.setup = setup
        self.client: Any = None
        self.run_id = ""

    def open(self) -> TrackedRun:
        import mlflow
        from mlflow.tracking import MlflowClient

        t = self.setup.cfg.train
        uri = tracking_uri(t.mlflow_tracking_uri)
        self.client = client = MlflowClient(tracking_uri=uri)
        uri = uri or mlflow.get_tracking_uri()
        name = t.mlflow_experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = client.create_experiment(name, artifact_location=_artifact_location(uri, name))
        key = self.setup.run_key
        found = client.search_runs([experiment_id], f"tags.`{KEY_TAG}` = '{key}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            last_step, how = self._last_step(found[0]), "continues run"
        else:
            tags = {KEY_TAG: key, "dist_seg.out_dir": str(self.setup.out_dir.resolve())}
            made = client.create_run(experiment_id, run_name=self.setup.run_name, tags=tags)
            self.run_id, last_step, how = made.info.run_id, 0, "new run"
        where = f"{how} {self.run_id} in experiment {name!r} at {shown_uri(uri)}"
        return TrackedRun(self.run_id, last_step, where)

    def _last_step(self, run: Any) -> int:
        """The highest step the run holds (what an interrupted attempt logged). Every logging step writes
        train/loss, every evaluation val/miou (val_ema/miou) and the end final/miou, so their histories
        tell; reading every per-class series of a long run would fetch far more."""
        keys = [k for k in STEP_KEYS if k in run.data.metrics] or list(run.data.metrics)
        steps = [m.step for key in keys for m in self.client.get_metric_history(self.run_id, key)]
        return max(steps, default=0)

    def config(self, report: ConfigReport, step: int) -> None:
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in report.params.items() if k not in have]
        for i in range(0, len(new), _BATCH):
            self.client.log_batch(self.run_id, params=new[i : i + _BATCH])
        changed = [k for k, v in report.params.items() if k in have and have[k] != v]
        name = "config.yaml" if not have else f"config-resumed-at-step-{step}.yaml"
        self.client.log_text(self.run_id, report.yaml, name)
        if changed:
            print(
                f"train.loggers: mlflow: run {self.run_id} keeps its first attempt's params; this attempt "
                f"changed {', '.join(changed)} (see its {name} artifact)",
                flush=True,
            )

    def scalars(self, values: dict[str, float], step: int) -> None:
        self._metrics({metric_key(k): v for k, v in values.items()}, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.client.log_image(self.run_id, image, key=metric_key(tag), step=step)

    def final(self, settings: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        self._metrics({f"final/{k}": v for k, v in metrics.items()}, step)

    def close(self, outcome: str) -> None:
        self.client.set_terminated(self.run_id, status=STATUS[outcome])

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if not values:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
