"""progress.py: plain lines, never carriage returns, when the output is a file or a pipe (as in a job's log)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from launch_utils import REPO

from dist_seg.runtime.progress_lines import PlainProgress, progress


def test_plain_lines_every_tenth_and_a_final_count() -> None:
    out = io.StringIO()  # not a terminal
    bar = progress(25, "convert", file=out)
    assert isinstance(bar, PlainProgress)
    bar.write("skipped [bad_polygon] image 3")
    for _ in range(25):
        bar.update(1)
    bar.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert lines[0] == "skipped [bad_polygon] image 3"
    # 3/25 = 12% is the first count at or past 10%, ..., and 25/25 once (close() does not repeat it)
    counts = [line.split()[1] for line in lines[1:]]
    assert counts == ["3/25", "5/25", "8/25", "10/25", "13/25", "15/25", "18/25", "20/25", "23/25", "25/25"]
    assert lines[-1].startswith("convert: 25/25 img (100%), ")


def test_close_prints_the_final_count_when_the_last_update_did_not() -> None:
    out = io.StringIO()
    bar = PlainProgress(1000, "eda", "img", out, interval_s=3600)
    for _ in range(5):
        bar.update(1)
    bar.close()
    assert len(out.getvalue().splitlines()) == 1
    assert out.getvalue().startswith("eda: 5/1000 img (0%), ")


def test_convert_into_a_log_file_writes_readable_lines(tmp_path: Path) -> None:
    env_py = [sys.executable, "-m", "dist_seg.cli"]
    synth = subprocess.run(
        [
            *env_py,
            "synth",
            "--out",
            str(tmp_path / "s"),
            "--images",
            "12",
            "--val-images",
            "2",
            "--size",
            "64",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert synth.returncode == 0, synth.stderr
    log = tmp_path / "convert.log"
    with open(log, "w") as f:  # `dist-seg convert ... > log 2>&1`
        r = subprocess.run(
            [
                *env_py,
                "convert",
                "--coco",
                str(tmp_path / "s/train.json"),
                "--images",
                str(tmp_path / "s/images"),
                "--out",
                str(tmp_path / "shards"),
                "--workers",
                "1",
            ],
            cwd=REPO,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    text = log.read_text()
    assert r.returncode == 0, text
    assert "\r" not in text, repr(text[:500])
    assert "convert: 12/12 img (100%)" in text, text
