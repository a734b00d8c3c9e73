"""Shards behind `python -m http.server` (a real process, no Range support): a 2-process torchrun run trains
with loader workers and evaluates during training, then `dist-seg evaluate` reads the same server through
data.cache_dir. Rank 0 names the server once; the run ends with the metrics a run from local shards has the
shape of (every validation image scored once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from launch_utils import REPO, torchrun
from servers import http_server_process


def test_two_process_run_trains_and_evaluates_from_python_http_server(
    tiny_shards: dict[str, Path], tmp_path: Path
) -> None:
    root = tiny_shards["train4"].parent.parent
    out = tmp_path / "run"
    with http_server_process(root) as base:
        train, val = (f"{base}/{tiny_shards[n].relative_to(root)}" for n in ("train4", "eval5"))
        common = ["data.crop_size=32", "model.name=fcn8s"]
        r = torchrun(
            ["--module", "dist_seg.train", "--config", str(REPO / "configs/cpu_small.yaml")]
            + [f"data.train_shards={train}", f"data.val_shards={val}", f"train.out_dir={out}", *common]
            + ["data.num_workers=1", "train.max_steps=6", "train.eval_every=6"],
            timeout=300,
        )
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert "final val mIoU" in r.stdout
        # one warning for the job (rank 0), naming the server
        warnings = [line for line in r.stderr.splitlines() if "ignore(s) HTTP Range requests" in line]
        assert len(warnings) == 2 and all(base in w for w in warnings), warnings  # training, evaluation
        assert json.loads((out / "metrics.json").read_text())["step"] == 6

        ev = tmp_path / "eval"
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "dist_seg.cli",
                "evaluate",
                "--config",
                str(REPO / "configs/cpu_small.yaml"),
            ]
            + ["--checkpoint", str(out / "last.pt"), "--shards", val, "--out", str(ev), *common]
            + [f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=1"],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads((ev / "metrics.json").read_text())["num_images"] == 23
        assert len(list((tmp_path / "cache").glob("*/*.tar"))) == 5  # every shard fetched whole, verified
