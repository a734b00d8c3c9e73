"""Preemption: a stop signal ends a run at the next step with a checkpoint of the step reached, and the run
resumed from it ends with the same weights as an uninterrupted one (exact on CPU).

Real torchrun jobs in production shape: 2 ranks, each with 2 DataLoader workers (persistent, as by default),
and the signal delivered each way it arrives in practice:

- `agent`: to the torchrun agent only (a `kill` of torchrun; the agent forwards it to each rank's process
  group, which holds the rank's loader workers too);
- `job`: to every process of the job, loader workers included, as SLURM does on scancel, preemption and
  `--signal=USR1@...` (slurmstepd signals every process of the step); here at the moment an evaluation
  starts, so the evaluation loader's workers are starting or running when it lands;
- `rank`: to rank 1 alone (the flag reaches rank 0 through the step's all-reduce).

Each job is started in its own session with a tag in its environment, which every process of it inherits: the
test finds the ranks and the loader workers by that tag in /proc, and checks that none is left afterwards.
Also SIGUSR1 to a single-process run, and the SLURM script with `srun` and `scontrol` stubbed."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
from launch_utils import REPO, free_port, parent_pid, tagged_processes, torchrun

from dist_seg.checkpoint import load_checkpoint
from dist_seg.config.schema import DataConfig, ModelConfig
from dist_seg.data.loading.eval_loader import build_eval_loader
from dist_seg.infer.scoring import compute_confusion
from dist_seg.models import build_model, input_constraints
from dist_seg.runtime.preemption import MARKER, PREEMPTED_EXIT_CODE, StopRequest

STEPS, EVAL_AT = 20, 10  # 40 samples / (batch 2 x 2 ranks): epochs of 10 steps, evaluated at their end
FAST = [
    "model.name=fcn8s", "model.width_mult=0.0625", "data.crop_size=32", "train.log_every=1",
    "data.batch_size=2", "sched.name=poly", f"train.max_steps={STEPS}", "data.num_workers=2",
    "data.eval_batch_size=1", f"train.eval_every={EVAL_AT}",
]  # fmt: skip
TAG = "DIST_SEG_TEST_JOB"  # environment variable naming the job a process belongs to


def _args(shards: dict[str, Path], out: Path) -> list[str]:
    """dist_seg.train's arguments; torchrun takes them after `--module dist_seg.train`, python after `-m`."""
    config = str(REPO / "configs/cpu_small.yaml")
    # evaluated on the training set too: 40 batches of 1, long enough for a signal to land in it
    data = [f"data.train_shards={shards['train4']}", f"data.val_shards={shards['train4']}"]
    return ["--config", config, *data, f"train.out_dir={out}", *FAST]


def _torchrun_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--module", "dist_seg.train", *args]  # fmt: skip


def _start(
    cmd: list[str], cwd: Path = REPO, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, queue.Queue, str]:
    """Start `cmd` in its own session, tagged; its output (stdout and stderr) arrives line by line on a
    queue. Returns the process, the queue and the tag."""
    tag = uuid.uuid4().hex
    env = env or {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, cwd=cwd, env={**env, TAG: tag}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # a signal meant for the job never reaches pytest, and vice versa
    )  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    return proc, lines, tag


def _drain(lines: queue.Queue) -> list[str]:
    time.sleep(0.5)  # the reader thread hands over what the ended process printed last
    got = []
    while not lines.empty():
        got.append(lines.get())
    return got


def _proc_file(pid: int, name: str) -> bytes:
    return Path(f"/proc/{pid}/{name}").read_bytes()


def _job_processes(tag: str) -> dict[int, dict[str, str]]:
    """pid -> environment of every live process of the job `tag`."""
    return tagged_processes(TAG, tag)


def _describe(pids: Iterable[int]) -> str:
    """`pid: command line` of each process, for assertion messages."""
    out = []
    for pid in pids:
        try:
            cmdline = _proc_file(pid, "cmdline").replace(b"\0", b" ").decode()
            out.append(f"{pid}: {cmdline[:200]}")
        except OSError:
            pass
    return "; ".join(out)


def _deliver(how: str, agent: subprocess.Popen, tag: str, sig: signal.Signals) -> None:
    """Send `sig` to the job the way `how` names (see the module docstring)."""
    if how == "agent":
        agent.send_signal(sig)
        return
    processes = _job_processes(tag)
    if how == "rank":
        ranks = [
            pid for pid, env in processes.items() if env.get("RANK") == "1" and parent_pid(pid) == agent.pid
        ]
        assert len(ranks) == 1, _describe(processes)
        os.kill(ranks[0], sig)
        return
    assert how == "job" and len(processes) >= 7, _describe(processes)  # agent, 2 ranks, >= 4 workers
    for pid in processes:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _no_process_left(tag: str) -> None:
    """Every process of the job is gone (a few seconds of grace for loader workers to be reaped)."""
    deadline = time.monotonic() + 15
    while (left := _job_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the job are left behind: {_describe(left)}"


def _kill_job(tag: str) -> None:
    for pid in _job_processes(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _signal_at(proc: subprocess.Popen, lines: queue.Queue, text: str, send: Callable[[], None]) -> list[str]:
    """Call `send()` once a line contains `text`; return every line until the process ends."""
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
            send()
            sent = True
    proc.wait(timeout=120)
    assert sent, "".join(seen[-50:])
    return seen + _drain(lines)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_shards: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The final weights of the uninterrupted run, shared by the delivery variants."""
    out = tmp_path_factory.mktemp("preemption_reference") / "run"
    straight = torchrun(["--module", "dist_seg.train", *_args(tiny_shards, out)], nproc=2, timeout=300)
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-2000:]
    return _weights(out / "last.pt")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "at"),
    [
        pytest.param("agent", "step 5/", id="sigterm-to-the-agent"),
        pytest.param("job", f"step {EVAL_AT}/", id="sigterm-to-every-process-as-evaluation-starts"),
        pytest.param("rank", "step 5/", id="sigterm-to-rank-1"),
    ],
)
def test_a_stop_signal_checkpoints_the_step_reached_and_the_restart_matches(
    tiny_shards, uninterrupted, tmp_path: Path, how: str, at: str
) -> None:
    out = tmp_path / "stopped"
    proc, lines, tag = _start(_torchrun_cmd(_args(tiny_shards, out)))
    try:
        log = "".join(_signal_at(proc, lines, at, lambda: _deliver(how, proc, tag, signal.SIGTERM)))
        _no_process_left(tag)
    finally:
        _kill_job(tag)
    assert proc.returncode != 0, log[-3000:]  # torchrun exits 1 when stopped (see the README)
    assert "checkpoint written" in log and "killed by signal" not in log, log[-4000:]
    marker = json.loads((out / MARKER).read_text())
    step = load_checkpoint(out / "last.pt")["train_state"]["step"]
    assert marker["step"] == step and int(at.split()[1].rstrip("/")) <= step < STEPS, (marker, step)
    if how == "job":  # it landed in the evaluation of step 10, which stopped at its next batch, unreported
        assert step == EVAL_AT and f"eval step {EVAL_AT}" not in log, log[-3000:]
    assert marker["signal"] == (None if how == "rank" else "SIGTERM")  # rank 0 was not signalled itself

    resumed = torchrun(["--module", "dist_seg.train", *_args(tiny_shards, out)], nproc=2, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resumed from {out / 'last.pt'} at step {step}" in resumed.stdout
    assert not (out / MARKER).exists()
    a, b = uninterrupted, _weights(out / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"


@pytest.mark.slow
def test_sigusr1_to_a_single_process_exits_with_the_preempted_code(tiny_shards, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc, lines, tag = _start([sys.executable, "-m", "dist_seg.train", *_args(tiny_shards, out)])
    try:
        log = "".join(_signal_at(proc, lines, "step 3/", lambda: proc.send_signal(signal.SIGUSR1)))
        _no_process_left(tag)
    finally:
        _kill_job(tag)
    assert proc.returncode == PREEMPTED_EXIT_CODE, log[-3000:]
    step = load_checkpoint(out / "last.pt")["train_state"]["step"]
    assert json.loads((out / MARKER).read_text())["step"] == step and step < STEPS


def _kill_from_outside(pids: list[int], sig: signal.Signals) -> None:
    """Signal `pids` from another process, as torchrun or slurmstepd would (not from their parent)."""
    subprocess.run(["kill", f"-{sig.name[3:]}", *map(str, pids)], check=True, timeout=30)


def _children() -> list[int]:
    """This process's live child processes (here: the loader workers)."""
    me = os.getpid()
    kids = Path(f"/proc/{me}/task/{me}/children").read_text().split()
    return [int(k) for k in kids]


class _SignalAfterFirstBatch:
    """Iterates `loader`; after its first batch, SIGTERM goes to this process and to the loader's workers
    (the child processes that appeared since)."""

    def __init__(self, loader) -> None:
        self.loader, self.before = loader, set(_children())

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == 1:
                workers = sorted(set(_children()) - self.before)
                assert len(workers) == self.loader.loader.num_workers
                _kill_from_outside([os.getpid(), *workers], signal.SIGTERM)
                time.sleep(0.5)  # the handler has run, and an unshielded worker has died, by now
            yield batch


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_evaluation_stops_at_its_next_batch_after_a_stop_signal(tiny_shards, num_workers: int) -> None:
    """Also with loader workers that get the signal too (SLURM signals every process): they live on until
    the evaluation stops and shuts its loader down, instead of dying and taking the process with them."""
    model = build_model(ModelConfig(name="fcn8s", width_mult=0.0625), 3).eval()
    cfg = DataConfig(
        val_shards=str(tiny_shards["eval5"]), eval_batch_size=2, num_workers=num_workers, pin_memory=False,
        persistent_workers=False,  # each pass starts its own workers: the signalled ones are the cut pass's
    )  # fmt: skip
    loader = build_eval_loader(cfg, 0, 1, *input_constraints(model))
    ours = set(_children())  # whatever the session started before this test
    stop = StopRequest([signal.SIGTERM])
    try:
        whole, _ = compute_confusion(model, loader, 3, torch.device("cpu"), None, stop=stop)
        cut, _ = compute_confusion(
            model, _SignalAfterFirstBatch(loader), 3, torch.device("cpu"), None, stop=stop
        )
        assert stop.requested and stop.signal_name == "SIGTERM"
        again, _ = compute_confusion(model, loader, 3, torch.device("cpu"), None, stop=stop)
    finally:
        stop.close()
    assert 0 < int(cut.matrix.sum()) < int(whole.matrix.sum()) and int(again.matrix.sum()) == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and set(_children()) - ours:  # the cut pass's workers, being reaped
        time.sleep(0.2)
    assert not set(_children()) - ours, "loader workers left behind"


@pytest.mark.slow
def test_slurm_script_requeues_after_the_time_limit_signal(tiny_shards, tmp_path: Path) -> None:
    """launch/slurm.sbatch as SLURM runs it, with `srun` and `scontrol` replaced by stubs: SIGUSR1 to every
    process of the job (SLURM's --signal=USR1@180 signals the whole step, loader workers included) makes
    the ranks checkpoint and stop, and the script requeues the job."""
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
           *_args(tiny_shards, out)[2:]]  # fmt: skip
    proc, lines, tag = _start(cmd, cwd=tmp_path, env=env)
    agent = []

    def to_the_step() -> None:  # the batch shell is not signalled: --signal without B: spares it
        agent.append(next(pid for pid in _job_processes(tag) if parent_pid(pid) == proc.pid))
        for pid in _job_processes(tag):
            if pid != proc.pid:
                os.kill(pid, signal.SIGUSR1)

    try:
        log = "".join(_signal_at(proc, lines, "step 3/", to_the_step))
        _no_process_left(tag)
    finally:
        _kill_job(tag)
    assert agent and proc.returncode == 0, log[-3000:]
    assert "SIGUSR1 received" in log and "requeueing job" in log, log[-3000:]
    assert (tmp_path / "scontrol.log").read_text().startswith("requeue ")
    assert json.loads((out / MARKER).read_text())["signal"] == "SIGUSR1"
