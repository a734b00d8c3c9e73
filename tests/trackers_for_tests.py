"""Run-tracking test helpers: readers of what MLflow and W&B hold (through the libraries themselves: MLflow's
client, W&B's record protobuf), and test-only trackers that raise or hang, named in train.loggers as
`trackers_for_tests:RaisingTracker` like any tracker of your own (tests/ is on the path of test runs)."""

from __future__ import annotations

import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from dist_seg.train.tracker_api import ConfigReport, TrackedRun, TrackerSetup


# ------------------------------------------------------------------------------------------------ MLflow
def mlflow_runs(uri: str, experiment: str = "dist_seg") -> list[Any]:
    """Every run of `experiment` in the store at `uri`, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} at {uri}"
    return sorted(client.search_runs([exp.experiment_id]), key=lambda r: r.info.start_time)


def mlflow_history(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] in step order, every point MLflow holds (duplicates included)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in run.data.metrics
    }


def mlflow_artifacts(uri: str, run_id: str, path: str = "") -> list[str]:
    """The run's artifact paths under `path`, recursively."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    out = []
    for a in client.list_artifacts(run_id, path or None):
        out += mlflow_artifacts(uri, run_id, a.path) if a.is_dir else [a.path]
    return out


# --------------------------------------------------------------------------------------------------- W&B
# W&B's run file: LevelDB log blocks after a 7-byte header (":W&B", magic, version)
_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list[Any]:
    """The records of a W&B run file (run-ID.wandb), each checked against its CRC32, as W&B's Record
    protobuf (wandb.proto.wandb_internal_pb2)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", _HEADER
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if (crc, length, kind) == (0, 0, 0):  # zero padding up to the block's end
            pos += left
            continue
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad chunk at byte {pos}"
        pos += 7 + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _finished_records(path: Path, wait_s: float = 60.0) -> list[Any]:
    """The records of a finished run's file. W&B's service process writes the file and may still be writing
    when run.finish() has returned in the training process; wait (bounded) for its exit record."""
    deadline = time.monotonic() + wait_s
    while True:
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def wandb_attempts(out_dir: Path) -> list[dict[str, Any]]:
    """Each W&B run directory under out_dir/wandb (one per attempt), oldest first, as {run_dir, run_id,
    config, history: {key: [(step, value)]} (an image's fields as key/field), summary, exit_code}."""
    import json

    attempts = []
    for run_dir in sorted((Path(out_dir) / "wandb").glob("offline-run-*")):
        [path] = run_dir.glob("run-*.wandb")
        got: dict[str, Any] = {"run_dir": run_dir, "run_id": None, "config": {}, "history": {}, "summary": {}}
        for r in _finished_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                got["run_id"] = r.run.run_id
            elif kind == "config":
                got["config"].update({i.key: json.loads(i.value_json) for i in r.config.update if i.key})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                for key, value in items.items():
                    if not key.startswith("_"):
                        got["history"].setdefault(key, []).append((items["_step"], value))
            elif kind == "summary":
                got["summary"].update({i.key: json.loads(i.value_json) for i in r.summary.update if i.key})
            elif kind == "exit":
                got["exit_code"] = r.exit.exit_code
        attempts.append(got)
    return attempts


# ---------------------------------------------------------------------------------- trackers that misbehave
CREATED: list[Any] = []  # every test tracker made in this process, in order


class RecordingTracker:
    """A tracker that accepts every report and keeps it (reports[method] = [args, ...])."""

    def __init__(self, setup: TrackerSetup) -> None:
        self.setup = setup
        self.reports: dict[str, list[tuple[Any, ...]]] = {}
        CREATED.append(self)

    def open(self) -> TrackedRun:
        return TrackedRun(f"{type(self).__name__}-{self.setup.run_key}", 0, "")

    def config(self, report: ConfigReport, step: int) -> None:
        self.reports.setdefault("config", []).append((report, step))

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.reports.setdefault("scalars", []).append((values, step))

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.reports.setdefault("image", []).append((tag, image, step))

    def final(self, settings: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        self.reports.setdefault("final", []).append((settings, metrics, step))

    def close(self, outcome: str) -> None:
        self.reports.setdefault("close", []).append((outcome,))


class RaisingTracker(RecordingTracker):
    """Opens, then raises at every scalars report (a tracking server that went away)."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        raise ConnectionError(f"tracking server gone at step {step}")


class UnopenableTracker(RecordingTracker):
    """Cannot open (bad credentials, unknown project...)."""

    def open(self) -> TrackedRun:
        raise PermissionError("the tracking server refused the credentials")


STUCK = threading.Event()  # set while a HangingTracker is blocked in a report
RELEASE = threading.Event()  # a test sets it to let hanging trackers go (a torchrun child never does)


class HangingTracker(RecordingTracker):
    """Opens, then blocks in its first scalars report until RELEASE is set (a stalled network call)."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        STUCK.set()
        RELEASE.wait()
        super().scalars(values, step)
