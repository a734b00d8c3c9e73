"""Preemption: a stop signal ends a run at the next step with a checkpoint of the step reached, and the run
resumed from it ends with the same weights as an uninterrupted one (exact on CPU). Real processes: SIGTERM
to the torchrun agent (what scancel, a preemption or a node drain does; torchrun forwards it to the ranks) and
SIGUSR1 to a single-process run (what SLURM's --signal sends ahead of the time limit)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from launch_utils import REPO, free_port, torchrun

from dist_seg.checkpoint import load_checkpoint
from dist_seg.config.schema import DataConfig, ModelConfig
from dist_seg.data.loading.eval_loader import build_eval_loader
from dist_seg.infer.scoring import compute_confusion
from dist_seg.models import build_model, input_constraints
from dist_seg.runtime.preemption import MARKER, PREEMPTED_EXIT_CODE, StopRequest

STEPS = 30
FAST = [
    "model.name=fcn8s", "model.width_mult=0.0625", "data.crop_size=32", "train.log_every=1",
    "data.batch_size=2", "sched.name=poly", f"train.max_steps={STEPS}", "data.val_shards=null",
]  # fmt: skip


def _args(shards: Path, out: Path) -> list[str]:
    """dist_seg.train's arguments; torchrun takes them after `--module dist_seg.train`, python after `-m`."""
    config = str(REPO / "configs/cpu_small.yaml")
    return ["--config", config, f"data.train_shards={shards}", f"train.out_dir={out}", *FAST]


def _start(
    cmd: list[str], cwd: Path = REPO, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, queue.Queue]:
    """Start `cmd` with its output (stdout and stderr) arriving line by line on a queue."""
    env = env or {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    return proc, lines


def _drain(lines: queue.Queue) -> list[str]:
    time.sleep(0.5)  # the reader thread hands over what the ended process printed last
    got = []
    while not lines.empty():
        got.append(lines.get())
    return got


def _child(pid: int) -> int:
    r = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=10)
    return int(r.stdout.split()[0])


def _signal_at(proc: subprocess.Popen, lines: queue.Queue, text: str, sig: signal.Signals) -> list[str]:
    """Send `sig` to `proc` once a line contains `text`; return every line until the process ends."""
    seen, deadline, sent = [], time.monotonic() + 240, False
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if not sent and text in line:
            proc.send_signal(sig)
            sent = True
    proc.wait(timeout=120)
    assert sent, "".join(seen[-50:])
    return seen


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_the_step_reached_and_the_restart_matches(
    tiny_shards, tmp_path: Path
) -> None:
    shards = tiny_shards["train4"]
    straight = torchrun(
        ["--module", "dist_seg.train", *_args(shards, tmp_path / "straight")], nproc=2, timeout=300
    )
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-2000:]

    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--module", "dist_seg.train", *_args(shards, out)]  # fmt: skip
    proc, lines = _start(cmd)
    log = "".join(_signal_at(proc, lines, f"step 5/{STEPS}", signal.SIGTERM))
    assert proc.returncode != 0, log[-3000:]  # torchrun itself, signalled, exits 1 (see the README)
    assert "SIGTERM received" in log and "checkpoint written" in log, log[-3000:]
    marker = json.loads((out / MARKER).read_text())
    step = load_checkpoint(out / "last.pt")["train_state"]["step"]
    assert marker == {**marker, "step": step, "signal": "SIGTERM"} and 5 <= step < STEPS

    resumed = torchrun(["--module", "dist_seg.train", *_args(shards, out)], nproc=2, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resumed from {out / 'last.pt'} at step {step}" in resumed.stdout
    assert not (out / MARKER).exists()
    a, b = _weights(tmp_path / "straight" / "last.pt"), _weights(out / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"


@pytest.mark.slow
def test_sigusr1_to_a_single_process_exits_with_the_preempted_code(tiny_shards, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc, lines = _start([sys.executable, "-m", "dist_seg.train", *_args(tiny_shards["train4"], out)])
    log = "".join(_signal_at(proc, lines, f"step 3/{STEPS}", signal.SIGUSR1))
    assert proc.returncode == PREEMPTED_EXIT_CODE, log[-3000:]
    step = load_checkpoint(out / "last.pt")["train_state"]["step"]
    assert json.loads((out / MARKER).read_text())["step"] == step and step < STEPS


def test_an_evaluation_stops_at_its_next_batch_after_a_stop_signal(tiny_shards) -> None:
    model = build_model(ModelConfig(name="fcn8s", width_mult=0.0625), 3).eval()
    cfg = DataConfig(val_shards=str(tiny_shards["eval5"]), eval_batch_size=2, num_workers=0, pin_memory=False)
    loader = build_eval_loader(cfg, 0, 1, *input_constraints(model))
    stop = StopRequest([signal.SIGUSR1])
    try:
        whole, _ = compute_confusion(model, loader, 3, torch.device("cpu"), None, stop=stop)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signal_name == "SIGUSR1"
        cut, _ = compute_confusion(model, loader, 3, torch.device("cpu"), None, stop=stop)
    finally:
        stop.close()
    assert int(whole.matrix.sum()) > 0 and int(cut.matrix.sum()) == 0


@pytest.mark.slow
def test_slurm_script_requeues_after_the_time_limit_signal(tiny_shards, tmp_path: Path) -> None:
    """launch/slurm.sbatch as SLURM runs it, with `srun` and `scontrol` replaced by stubs: SIGUSR1 to the
    torchrun agent (SLURM's --signal=USR1@180) reaches the ranks, they checkpoint and stop, and the script
    requeues the job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nshift\nexec "$@"\n')  # drop --kill-on-bad-exit=1
    (bin_dir / "scontrol").write_text(
        f'#!/usr/bin/env bash\nif [ "$1" = show ]; then echo 127.0.0.1; else echo "$@" >> {tmp_path}/scontrol.log; fi\n'
    )
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    out = tmp_path / "run"
    env = {
        **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
        "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1",
        "SLURM_JOB_ID": str(free_port()), "SLURM_GPUS_ON_NODE": "2",
    }  # fmt: skip
    cmd = ["bash", str(REPO / "launch/slurm.sbatch"), str(REPO / "configs/cpu_small.yaml"),
           f"data.train_shards={tiny_shards['train4']}", f"train.out_dir={out}", *FAST]  # fmt: skip
    proc, lines = _start(cmd, cwd=tmp_path, env=env)
    seen, deadline, agent = [], time.monotonic() + 240, None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            seen.append(lines.get(timeout=1))
        except queue.Empty:
            continue
        if agent is None and f"step 3/{STEPS}" in seen[-1]:
            agent = _child(proc.pid)  # the torchrun agent: the stub srun exec'd it
            os.kill(agent, signal.SIGUSR1)
    proc.wait(timeout=120)
    log = "".join(seen + _drain(lines))
    assert agent is not None and proc.returncode == 0, log[-3000:]
    assert "SIGUSR1 received" in log and "requeueing job" in log, log[-3000:]
    assert (tmp_path / "scontrol.log").read_text().startswith("requeue ")
    assert json.loads((out / MARKER).read_text())["signal"] == "SIGUSR1"
