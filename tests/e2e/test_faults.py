"""Fault injection into real runs (issue: nothing hangs, nothing is lost). CPU, gloo, 2 processes, tiny models.

Faults come from the DIST_SEG_FAULT_* switches in dist_seg/runtime/fault_injection.py, the same ones users can drill with.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import resource
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import read_shards
from launch_utils import REPO, torchrun
from tiny_shards import tar_keys

from dist_seg.checkpoint import load_checkpoint, save_checkpoint
from dist_seg.train.tensorboard import read_scalars

# A fast model: the machinery is under test here, not the architecture.
FAST = [
    "model.name=fcn8s",
    "model.width_mult=0.0625",
    "data.crop_size=64",
    "data.num_workers=1",
    "train.log_every=1",
]


def _train_args(train: Path, out: Path, *extra: str, val: str | Path = "null") -> list[str]:
    return [
        "--module",
        "dist_seg.train",
        "--config",
        str(REPO / "configs/cpu_small.yaml"),
        f"data.train_shards={train}",
        f"data.val_shards={val}",
        f"train.out_dir={out}",
        *FAST,
        *extra,
    ]


def _steps(out: Path, tag: str = "train/loss") -> list[int]:
    return [s for s, _ in read_scalars(out / "tb")[tag]]


# ---------------------------------------------------------------- 1, 2: kills and restarts
@pytest.mark.slow
def test_sigkill_of_one_rank_restarts_and_resumes_without_gap(trash_shards, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = torchrun(
        _train_args(trash_shards[0], out, "train.max_steps=8", "train.save_every=3"),
        env={"DIST_SEG_FAULT_KILL_AT_STEP": "5:1"},
        extra=["--max-restarts=1"],
        timeout=400,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "[fault] SIGKILL rank 1 at step 5" in r.stdout
    assert "resumed from" in r.stdout and "at step 3" in r.stdout
    assert _steps(out) == list(range(1, 9))  # continues without gap or repeat, even in TensorBoard
    assert load_checkpoint(out / "last.pt")["train_state"]["step"] == 8


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous_checkpoint(trash_shards, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = torchrun(
        _train_args(trash_shards[0], out, "train.max_steps=6", "train.save_every=2"),
        env={"DIST_SEG_FAULT_KILL_IN_CHECKPOINT": "4"},
        extra=["--max-restarts=1"],
        timeout=400,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "[fault] SIGKILL while writing the checkpoint of step 4" in r.stdout
    assert "at step 2" in r.stdout  # the torn step-4 file was ignored; step 2's checkpoint was loaded
    assert _steps(out) == list(range(1, 7))
    assert not list(out.glob(".*.tmp"))


def _recorded(folder: Path, up_to: int | None = None) -> list[str]:
    """The keys the ranks recorded (DIST_SEG_RECORD_KEYS), of steps <= up_to when given."""
    lines = [ln.split() for f in sorted(folder.glob("keys-rank*.txt")) for ln in f.read_text().splitlines()]
    return [key for step, key in lines if up_to is None or int(step) <= up_to]


@pytest.mark.slow
def test_a_resume_in_another_data_order_uses_each_sample_of_the_epoch_once(
    tiny_shards, tmp_path: Path
) -> None:
    """40 samples, global batch 4: epochs of 10 steps. Killed at step 6 after the checkpoint of step 4, then
    resumed on the same geometry with train.seed and data.shuffle_shards changed: the rest of the epoch is
    re-planned over the samples not used yet, so the epoch uses every sample exactly once."""
    shards, out = tiny_shards["train4"], tmp_path / "run"
    args = ["train.max_steps=10", "data.batch_size=2", "data.num_workers=2"]
    keys_a, keys_b = tmp_path / "keys_a", tmp_path / "keys_b"
    a = torchrun(
        _train_args(shards, out, *args, "train.save_every=4"),
        env={"DIST_SEG_FAULT_KILL_AT_STEP": "6:0", "DIST_SEG_RECORD_KEYS": str(keys_a)},
    )
    assert a.returncode != 0 and "SIGKILL rank 0 at step 6" in a.stdout, a.stdout[-2000:] + a.stderr[-2000:]
    b = torchrun(
        _train_args(shards, out, *args, "train.seed=1", "data.shuffle_shards=false"),
        env={"DIST_SEG_RECORD_KEYS": str(keys_b)},
    )
    assert b.returncode == 0, b.stdout[-2000:] + b.stderr[-3000:]
    used = _recorded(keys_a, up_to=4) + _recorded(keys_b)
    assert sorted(used) == sorted(tar_keys(shards)), "a sample was used twice or never"
    assert (
        "epoch 0 continues in a new data order (train.seed 0 -> 1, data.shuffle_shards True -> False): "
        "16 of its 40 samples used so far" in b.stdout
    ), b.stdout[-2000:]


# ---------------------------------------------------------------- 4: non-finite losses (train_step: tests/train/test_loop.py)
@pytest.mark.slow
def test_repeated_nonfinite_on_one_rank_stops_every_rank(trash_shards, tmp_path: Path) -> None:
    r = torchrun(
        _train_args(trash_shards[0], tmp_path / "run", "train.max_steps=20", "train.max_nonfinite=3"),
        env={"DIST_SEG_FAULT_NAN_FROM_STEP": "3:1"},
        timeout=300,
    )
    assert r.returncode != 0
    msg = "non-finite loss or gradients at step 5: 3 consecutive steps skipped"
    assert r.stderr.count(msg) >= 2, r.stderr[-4000:]  # both ranks stop with the same error
    assert "step 6/" not in r.stdout


# ---------------------------------------------------------------- 5, 6: bad and uneven shards
def _write_shards(
    samples: dict[str, dict[str, bytes]],
    groups: list[list[str]],
    src: Path,
    out: Path,
    damage: dict[str, str] | None = None,
) -> Path:
    """Shards holding the given keys, with a manifest derived from `src`'s. damage: key -> how to break it."""
    out.mkdir(parents=True)
    damage = damage or {}
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["shards"] = []
    for i, keys in enumerate(groups):
        name = f"shard-{i:06d}.tar"
        with tarfile.open(out / name, "w") as tar:
            for key in keys:
                for ext, data in sorted(samples[key].items()):
                    if damage.get(key) == "no_seg" and ext == "seg.png":
                        continue
                    if damage.get(key) == "bad_jpeg" and ext == "jpg":
                        data = data[:2] + b"\x00garbage" * 20
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(data)
                    tar.addfile(ti, io.BytesIO(data))
        if "truncate" in damage.values() and any(damage.get(k) == "truncate" for k in keys):
            data = (out / name).read_bytes()
            (out / name).write_bytes(data[: len(data) // 2])
        sha = hashlib.sha256((out / name).read_bytes()).hexdigest()
        manifest["shards"].append(
            {"name": name, "samples": len(keys), "bytes": (out / name).stat().st_size, "sha256": sha}
        )
    manifest["total_samples"] = sum(len(g) for g in groups)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


BROKEN_GROUPS = [(0, 14), (14, 26), (26, 40)]


@pytest.fixture(scope="module")
def broken_shards(trash_shards, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[str]]]:
    samples = read_shards(trash_shards[0])
    keys = sorted(samples)[:40]
    groups = [keys[a:b] for a, b in BROKEN_GROUPS]
    damage = {keys[3]: "bad_jpeg", keys[16]: "no_seg", keys[30]: "truncate"}
    out = _write_shards(samples, groups, trash_shards[0], tmp_path_factory.mktemp("broken") / "s", damage)
    return out, groups


@pytest.mark.slow
def test_corrupt_data_raise_names_shard_and_key(broken_shards, tmp_path: Path) -> None:
    shards, groups = broken_shards
    r = torchrun(
        _train_args(shards, tmp_path / "run", "train.max_steps=6", "data.on_error=raise"), timeout=300
    )
    assert r.returncode != 0
    found = re.findall(r"shard \S*shard-00000(\d)\.tar: [^\n]*?'(\w+)'", r.stderr)
    assert found, r.stderr[-3000:]
    for shard_index, key in found:  # the key named is really in the shard named
        assert key in groups[int(shard_index)], (shard_index, key)


@pytest.mark.slow
def test_corrupt_data_skip_continues_and_logs_count(broken_shards, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = torchrun(
        _train_args(
            broken_shards[0],
            out,
            "train.max_steps=9",
            "data.on_error=skip",
            "data.batch_size=2",
            "data.shuffle_shards=false",
        ),
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert _steps(out) == list(range(1, 10))
    skipped = read_scalars(out / "tb")["train/skipped_samples"]
    assert skipped[-1][1] >= 3  # the corrupt JPEG, the missing label map, and the truncated shard's tail


@pytest.mark.slow
def test_uneven_and_empty_shards_same_steps_no_hang(trash_shards, tmp_path: Path) -> None:
    samples = read_shards(trash_shards[0])
    keys = sorted(samples)[:23]
    shards = _write_shards(samples, [keys[:3], [], keys[3:23]], trash_shards[0], tmp_path / "s")
    out = tmp_path / "run"
    # 23 samples, global batch 2 x 2 = 4 -> 5 steps per epoch; 2 epochs; 2 workers per rank over 3 shards
    r = torchrun(
        _train_args(
            shards, out, "train.epochs=2", "train.max_steps=null", "data.num_workers=2", "data.batch_size=2"
        ),
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "5 steps/epoch" in r.stdout and _steps(out) == list(range(1, 11))


# ---------------------------------------------------------------- 7: a stalled peer
@pytest.mark.slow
def test_stalled_rank_ends_in_a_timeout_error_not_a_hang(trash_shards, tmp_path: Path) -> None:
    r = torchrun(
        _train_args(trash_shards[0], tmp_path / "run", "train.max_steps=6", "train.timeout_s=10"),
        env={"DIST_SEG_FAULT_STALL_AT_STEP": "3:1:120"},
        timeout=150,
    )
    assert r.returncode != 0
    assert "rank 1 stalls" in r.stdout
    assert any(s in r.stderr for s in ("Timed out", "timed out", "Timeout", "timeout")), r.stderr[-3000:]


# ---------------------------------------------------------------- 8: poison
class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_resume_checkpoint_refused_through_the_trainer(trash_shards, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"model": _Evil(marker)}, f)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = _train_args(trash_shards[0], tmp_path / "run", f"train.resume={evil}")
    r = subprocess.run(
        [sys.executable, "-m", *args[1:]], env=env, capture_output=True, text=True, timeout=200
    )
    assert r.returncode != 0 and str(evil) in r.stderr, r.stderr[-2000:]
    assert not marker.exists()


# ---------------------------------------------------------------- 9: full disk
def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))


def test_full_disk_names_the_path_and_keeps_previous_checkpoint(trash_shards, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    previous = {"model": {"w": torch.ones(3)}, "train_state": {"step": 7}}
    save_checkpoint(out / "last.pt", previous)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [
        sys.executable,
        "-m",
        "dist_seg.train",
        "--config",
        str(REPO / "configs/cpu_small.yaml"),
        f"data.train_shards={trash_shards[0]}",
        f"train.out_dir={out}",
        *FAST,
        "train.max_steps=2",
        "train.resume=null",
        "model.name=deconvnet",
        "data.crop_size=224",
        "data.num_workers=0",  # worker shared memory would hit the file-size limit first
    ]
    r = subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size
    )
    assert r.returncode != 0
    assert f"cannot write checkpoint {out / 'last.pt'}" in r.stderr, r.stderr[-3000:]
    assert load_checkpoint(out / "last.pt")["train_state"]["step"] == 7
    # an out_dir that cannot be created is named too
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    args[args.index(f"train.out_dir={out}")] = f"train.out_dir={blocker / 'run'}"
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and str(blocker / "run") in r.stderr, r.stderr[-3000:]


@pytest.mark.slow
def test_resume_needs_a_checkpoint_every_node_can_read(trash_shards, tmp_path: Path) -> None:
    """Two 'nodes' with a relative out_dir in different working directories: node 0 sees last.pt, node 1
    does not. Instead of node 1 silently starting fresh, both stop with an error naming the file."""
    from launch_utils import free_port

    def agents(max_steps: int) -> list[subprocess.CompletedProcess]:
        port, procs = free_port(), []
        for node in range(2):
            cwd = tmp_path / f"node{node}"
            cwd.mkdir(exist_ok=True)
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={node}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                *_train_args(
                    trash_shards[0], Path("run"), f"train.max_steps={max_steps}", "train.timeout_s=60"
                ),
            ]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
            procs.append(
                subprocess.Popen(
                    cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            )
        outs = [p.communicate(timeout=300) for p in procs]
        return [
            subprocess.CompletedProcess(p.args, p.returncode, o, e)
            for p, (o, e) in zip(procs, outs, strict=True)
        ]

    first = agents(2)
    assert all(r.returncode == 0 for r in first), first[0].stderr[-2000:] + first[1].stderr[-2000:]
    second = agents(4)
    assert all(r.returncode != 0 for r in second)
    assert all("which rank(s) [1] cannot read" in r.stderr for r in second), second[0].stderr[-2000:]
    assert "run/last.pt" in second[1].stderr
