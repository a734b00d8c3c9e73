"""The train and eval loaders on 2 real torchrun ranks with 2 loader workers each, over shards of unequal
sizes: equal steps per rank, disjoint samples, every eval sample exactly once across ranks."""

from __future__ import annotations

import collections
import json
from pathlib import Path

from launch_utils import REPO, torchrun
from tiny_shards import tar_keys

from dist_seg.data.format.manifest import read_manifest


def test_torchrun_two_ranks_two_workers_unequal_shards(tiny_shards: dict[str, Path], tmp_path: Path) -> None:
    train_spec = f"{tiny_shards['u5']},{tiny_shards['u13']},{tiny_shards['u19']}"
    evals = [str(tiny_shards[f"eval{n}"]) for n in (1, 2, 5)]
    out = tmp_path / "seen.json"
    args = [str(REPO / "tests" / "workers" / "stream_worker.py"), "--train", train_spec, "--out", str(out)]
    for spec in evals:
        args += ["--eval", spec]
    proc = torchrun(args, nproc=2, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (
        "3 shard(s) for 2 ranks x 2 workers" in proc.stderr
    )  # fewer shards than readers: warned, still works
    ranks = json.loads(out.read_text())
    steps = 37 // (2 * 2)
    assert [r["steps_per_epoch"] for r in ranks] == [steps, steps]
    all_train = set(tar_keys(tiny_shards["u5"]) + tar_keys(tiny_shards["u13"]) + tar_keys(tiny_shards["u19"]))
    for epoch in range(2):
        assert [r["epochs"][epoch]["steps"] for r in ranks] == [steps, steps]
        keys = ranks[0]["epochs"][epoch]["keys"] + ranks[1]["epochs"][epoch]["keys"]
        assert len(keys) == len(set(keys)) == steps * 4 and set(keys) <= all_train
    assert ranks[0]["epochs"][0]["keys"] != ranks[0]["epochs"][1]["keys"]
    for spec in evals:
        got = collections.Counter(ranks[0]["eval"][spec] + ranks[1]["eval"][spec])
        assert got == collections.Counter(tar_keys(Path(spec)))
        assert sum(got.values()) == read_manifest(spec)["total_samples"]
