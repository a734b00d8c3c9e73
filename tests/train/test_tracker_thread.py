"""dist_seg.train.tracker_thread: what a tracker that raises, hangs or cannot open costs (its own reports,
counted and said once, never the caller's time), the record of what a tracked run already holds, and the
messages' redaction. The trackers that misbehave are test classes (tests/trackers_for_tests.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trackers_for_tests as tt

from dist_seg.config.schema import Config, TrainConfig
from dist_seg.train.tracker_api import TrackerSetup
from dist_seg.train.tracker_thread import RECORD_NAME, RunRecord, TrackerThread, scrub
from dist_seg.train.tracking import config_report


@pytest.fixture(autouse=True)
def fresh_trackers() -> Iterator[None]:
    """Each test starts with no test trackers made and nothing stuck; a hanging tracker is let go after."""
    tt.CREATED.clear()
    tt.STUCK.clear()
    tt.RELEASE.clear()
    yield
    tt.RELEASE.set()


def _thread(
    cls: type, tmp_path: Path, queue_size: int = 1000, record: RunRecord | None = None
) -> TrackerThread:
    """`cls` in a TrackerThread, as RunLog makes them."""
    setup = TrackerSetup(Config(train=TrainConfig(out_dir=str(tmp_path))), tmp_path, "run", "key0", None)

    def open_tracker():
        tracker = cls(setup)
        return tracker, tracker.open()

    return TrackerThread(cls.__name__, open_tracker, record or RunRecord(None), queue_size)


def test_a_raising_tracker_is_said_once_and_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    thread = _thread(tt.RaisingTracker, tmp_path)
    for step in range(1, 6):
        thread.submit("scalars", ({"train/loss": 1.0}, step), step)
    thread.submit("final", ({}, {"miou": 0.5}, 5), 5)
    thread.request_close("finished")
    thread.finish(time.monotonic() + 30, 30)
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "train.loggers: RaisingTracker: scalars failed (ConnectionError: tracking server gone at step 1); later "
        "reports are still tried",
        "train.loggers: RaisingTracker: reports: 1 delivered, 5 failed, 0 dropped",
    ]
    assert tt.CREATED[0].reports["final"] == [({}, {"miou": 0.5}, 5)]


def test_a_hanging_tracker_never_blocks_the_run_and_is_left_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first scalars report hangs; the run keeps submitting (were a submit to wait, this test would hang
    until pytest's timeout), the queue of 4 fills, the rest is dropped, and at the end the thread is left
    behind after the deadline with everything it held counted as not delivered."""
    thread = _thread(tt.HangingTracker, tmp_path, queue_size=4)
    thread.submit("scalars", ({"train/loss": 1.0}, 1), 1)
    assert tt.STUCK.wait(30)
    for step in range(2, 11):
        thread.submit("scalars", ({"train/loss": 1.0}, step), step)
    thread.request_close("finished")
    thread.finish(time.monotonic() + 0.2, 0.2)
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "train.loggers: HangingTracker: 4 reports are waiting (the tracker is slower than training, or "
        "stalled): reports are dropped until it catches up",
        "train.loggers: HangingTracker: still busy after train.logger_timeout_s=0.2 s: the run ends without it",
        "train.loggers: HangingTracker: reports: 0 delivered, 0 failed, 9 dropped",
    ]


def test_a_tracker_that_cannot_open_is_left_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    thread = _thread(tt.UnopenableTracker, tmp_path)
    thread.submit("scalars", ({"train/loss": 1.0}, 1), 1)
    thread.request_close("failed")
    thread.finish(time.monotonic() + 30, 30)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        "train.loggers: UnopenableTracker: cannot start (PermissionError: the tracking server refused the "
        "credentials); it is left out of this run"
    )
    assert err[1:] == ["train.loggers: UnopenableTracker: reports: 0 delivered, 0 failed, 1 dropped"]
    assert thread.run_id is None


def test_steps_the_tracked_run_already_holds_are_not_sent_again(tmp_path: Path) -> None:
    """The run directory's record says the interrupted attempt delivered up to step 5 to this tracked run:
    a resume from step 3 sends its steps 6 and 7 only; the config is sent whatever its step."""
    (tmp_path / RECORD_NAME).write_text(
        json.dumps({"RecordingTracker": {"run_id": "RecordingTracker-key0", "last_step": 5}})
    )
    thread = _thread(tt.RecordingTracker, tmp_path, record=RunRecord(tmp_path))
    thread.submit("config", (config_report(Config()), 3), None)
    for step in range(4, 8):
        thread.submit("scalars", ({"train/loss": float(step)}, step), step)
    thread.request_close("finished")
    thread.finish(time.monotonic() + 30, 30)
    reports = tt.CREATED[0].reports
    assert [step for _, step in reports["scalars"]] == [6, 7] and len(reports["config"]) == 1
    assert json.loads((tmp_path / RECORD_NAME).read_text())["RecordingTracker"] == {
        "run_id": "RecordingTracker-key0",
        "last_step": 7,
    }
    assert thread.repeated == 2


def test_the_record_belongs_to_one_tracked_run(tmp_path: Path) -> None:
    record = RunRecord(tmp_path)
    record.delivered("mlflow", "run-a", 4)
    assert RunRecord(tmp_path).last_step("mlflow", "run-a") == 4
    assert RunRecord(tmp_path).last_step("mlflow", "run-b") == 0  # another run: nothing known
    (tmp_path / RECORD_NAME).write_text("{torn")
    assert RunRecord(tmp_path).last_step("mlflow", "run-a") == 0


def test_messages_never_show_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "wk-0123456789")
    text = "POST http://alice:s3cret@mlflow.example:5000/api/2.0/runs?token=t0k failed; key wk-0123456789"
    shown = scrub(text)
    assert "s3cret" not in shown and "t0k" not in shown and "wk-0123456789" not in shown
    assert "http://mlflow.example:5000/api/2.0/runs" in shown
