"""dist_seg.train.reporting helpers that do not need a training run."""

from __future__ import annotations

import json
from pathlib import Path

from dist_seg.train.reporting import hms, trim_history


def test_trim_history_drops_entries_after_the_resumed_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics_history.jsonl"
    path.write_text("".join(json.dumps({"step": s, "miou": s / 10}) + "\n" for s in (2, 4, 6)))
    trim_history(tmp_path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
    trim_history(tmp_path / "absent", 4)  # no history yet: nothing to do


def test_hms() -> None:
    assert hms(3725.9) == "1:02:05" and hms(0) == "0:00:00"
