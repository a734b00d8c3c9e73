import errno
import os
import pickle
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from dist_seg.checkpoint import CheckpointManager, load_checkpoint, save_checkpoint
from dist_seg.runtime.rng_state import capture_rng_state, restore_rng_state


def _state(step, size=8):
    model = torch.nn.Linear(size, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, size)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "best_miou": 0.5,
        "config": {"train": {"out_dir": "runs/x", "resume": None}},
        "rng": capture_rng_state(),
    }


def _temp_files(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_round_trip(tmp_path):
    state = _state(7)
    save_checkpoint(tmp_path / "a.pt", state)
    loaded = load_checkpoint(tmp_path / "a.pt")
    assert loaded["step"] == 7 and loaded["config"] == state["config"]
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    assert loaded["optimizer"]["state"][0]["momentum_buffer"].shape == (3, 8)
    assert _temp_files(tmp_path) == []


def test_failure_before_rename_keeps_previous(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(1))
    seen = []

    def fail(tmp):
        seen.append(tmp.name)
        raise OSError(errno.EIO, "simulated I/O error between write and rename")

    with pytest.raises(OSError, match=str(path)):
        save_checkpoint(path, _state(2), before_rename=fail)
    assert seen and seen[0].startswith(".last.pt.") and seen[0].endswith(".tmp")
    assert load_checkpoint(path)["step"] == 1
    assert _temp_files(tmp_path) == []


_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from dist_seg.checkpoint import CheckpointManager
mgr = CheckpointManager(Path(sys.argv[1]), keep_last=1,
                        before_rename=lambda tmp: os.kill(os.getpid(), signal.SIGKILL))
mgr.save({"step": 2}, step=2, is_best=False)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_kill_before_rename_leaves_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    CheckpointManager(run, keep_last=1).save({"step": 1}, step=1, is_best=False)
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(run)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(_temp_files(run)) == 1  # the complete but unrenamed write is left behind
    mgr = CheckpointManager(run, keep_last=1)
    assert mgr.resume_path("auto") == run / "last.pt"
    assert load_checkpoint(mgr.resume_path("auto"))["step"] == 1
    mgr.save({"step": 3}, step=3, is_best=False)
    assert _temp_files(run) == []


def test_parent_not_a_directory_names_path(tmp_path):
    # Works as root too (root ignores permission bits, but not a file standing where a directory should be).
    blocker = tmp_path / "run"
    blocker.write_text("a file, not a directory")
    with pytest.raises(OSError, match=str(blocker / "last.pt")):
        save_checkpoint(blocker / "last.pt", {"step": 1})
    with pytest.raises(OSError, match=str(blocker)):
        CheckpointManager(blocker / "sub", keep_last=1).save({"step": 1}, step=1, is_best=False)


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_dir_names_path(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(OSError, match=str(path)):
            save_checkpoint(path, {"step": 2})
    finally:
        tmp_path.chmod(0o700)
    assert load_checkpoint(path)["step"] == 1


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_disk_full_keeps_previous_and_names_path(tmp_path):
    # RLIMIT_FSIZE makes writes past the limit fail with EFBIG, as a full disk fails them with ENOSPC, even
    # for root; SIGXFSZ is ignored so the write returns an error instead of killing the process.
    import resource

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    big = {"step": 2, "w": torch.zeros(1 << 20)}  # 4 MiB
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        with pytest.raises(OSError, match=str(path)) as err:
            save_checkpoint(path, big)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert err.value.errno == errno.EFBIG  # the real cause, not torch's "unexpected pos"
    assert load_checkpoint(path)["step"] == 1
    assert _temp_files(tmp_path) == []


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused(tmp_path, writer):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pt"
    if writer == "torch":
        torch.save({"model": _Evil(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"model": _Evil(marker)}, f, protocol=2)
    with pytest.raises(RuntimeError, match=str(path)) as err:
        load_checkpoint(path)
    assert "refused" in str(err.value)
    assert not os.path.exists(marker)


def test_bad_files_are_named(tmp_path):
    torn = tmp_path / "torn.pt"
    save_checkpoint(torn, _state(3))
    torn.write_bytes(torn.read_bytes()[:200])
    with pytest.raises(RuntimeError, match=str(torn)):
        load_checkpoint(torn)
    tensor_only = tmp_path / "t.pt"
    torch.save(torch.zeros(2), tensor_only)
    with pytest.raises(ValueError, match=str(tensor_only)):
        load_checkpoint(tensor_only)
    with pytest.raises(ValueError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def _draw():
    return (
        random.random(),
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        np.random.standard_normal(),
        torch.rand(3).tolist(),
    )


def test_rng_round_trip_through_file(tmp_path):
    random.gauss(0, 1)  # leaves a cached second gaussian in both python and numpy states
    np.random.standard_normal()
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    expected = _draw()
    _draw()
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draw() == expected


def test_manager_prunes_and_copies_best(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", keep_last=2)
    for step in (10, 20, 30, 40):
        mgr.save({"step": step}, step=step, is_best=step == 20)
    assert [s for s, _ in mgr.step_files()] == [30, 40]
    assert load_checkpoint(mgr.last)["step"] == 40
    assert load_checkpoint(mgr.best)["step"] == 20
    assert load_checkpoint(mgr.step_path(30))["step"] == 30

    none_kept = CheckpointManager(tmp_path / "run0", keep_last=0)
    none_kept.save({"step": 5}, step=5, is_best=True)
    assert sorted(p.name for p in (tmp_path / "run0").iterdir()) == ["best.pt", "last.pt"]


def test_resume_path_and_leftover_temp_files(tmp_path):
    run = tmp_path / "run"
    mgr = CheckpointManager(run, keep_last=1)
    assert mgr.resume_path(None) is None
    assert mgr.resume_path("auto") is None  # no directory yet
    run.mkdir()
    leftover = run / ".last.pt.crash123.tmp"  # what a write killed before its rename leaves behind
    leftover.write_bytes(b"PK\x03\x04 half a zip")
    assert mgr.resume_path("auto") is None

    mgr.save({"step": 3}, step=3, is_best=False)
    assert not leftover.exists()
    assert mgr.resume_path("auto") == run / "last.pt"
    assert mgr.resume_path(str(run / "step-00000003.pt")) == run / "step-00000003.pt"
    with pytest.raises(ValueError, match="train.resume.*nothere.pt"):
        mgr.resume_path(str(run / "nothere.pt"))
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(run, keep_last=-1)
