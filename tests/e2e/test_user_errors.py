"""User errors under torchrun, typed as a user types them: each is one `dist_seg.train: error: KEY=VALUE: ...`
line, printed once (by local rank 0), before any process group starts, with no traceback from our code.

torchrun's agent, seeing its workers exit non-zero, raises ChildFailedError and prints its own traceback
(frames in torch/distributed/run.py and launcher/api.py only) and a summary naming each rank's exit code;
that part is torchrun's, so the test asserts on what we control: our lines, no dist_seg frames, exit code 2.
One torchrun for all four cases: every problem is reported, so one run shows each once (CI runs this on 2 cores).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from launch_utils import torchrun


def test_bad_names_and_paths_are_one_line_each_before_the_rendezvous(tmp_path: Path) -> None:
    shards, weights, classw = tmp_path / "no_shards", tmp_path / "no_vgg.pth", tmp_path / "no_weights.json"
    expected = [
        "model.name=nosuch: not a registered model; expected one of deconvnet, ",
        f"data.train_shards={shards}: shard directory {shards} does not exist",
        f"model.pretrained={weights}: file not found",
        f"loss.class_weights={classw}: file not found",
    ]
    args = [
        "-m", "dist_seg.train", "--config", "configs/cpu_small.yaml", "model.name=nosuch",
        f"data.train_shards={shards}", f"model.pretrained={weights}", f"loss.class_weights={classw}",
        f"train.out_dir={tmp_path / 'run'}", "data.num_workers=2",  # as real runs: refused before any loader
    ]  # fmt: skip
    start = time.monotonic()
    r = torchrun(args, nproc=2, timeout=150)
    took = time.monotonic() - start
    out = r.stdout + r.stderr
    ours = [line for line in out.splitlines() if line.startswith("dist_seg.train: error: ")]
    assert len(ours) == len(expected), out  # once per node, not once per rank
    for line, want in zip(ours, expected, strict=True):
        assert line.startswith(f"dist_seg.train: error: {want}"), out
    assert r.returncode != 0
    # the first rank to exit exits 2 (our usage error, not 1: no exception escaped); torchrun may SIGTERM the
    # other before it exits by itself
    assert re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", out, re.S).group(1) == "2", out
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", out)) <= {"2", "-15"}, out
    assert not re.search(r'File ".*dist_seg/', out), out  # the only traceback is torchrun's agent's
    assert out.count("Traceback (most recent call last)") <= 1, out
    assert "process(es) on" not in out and not (tmp_path / "run").exists(), out  # fit() never started
    assert took < 120, f"{took:.0f} s: a user error should not wait for a rendezvous or a timeout"
