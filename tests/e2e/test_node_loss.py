"""A live node loss under torchrun's elastic c10d rendezvous, staged on loopback (issue 25 item 3).

Two torchrun agents on 127.0.0.1 stand for two nodes (one rank each, --nnodes=1:2); the rendezvous store runs
as its own process (launch/rdzv_store.py, agents with is_host=false), the configuration README "Preemption,
node loss and resize" recommends and launch/multinode.sh runs with RDZV_HOST set. Mid-run, the agent that
started first is SIGKILLed together with its workers: torchrun starts each worker in its own session, so
killing the agent's process group alone leaves its worker training on (not a node loss). The survivor must
re-form a 1-node world, resume from the last checkpoint with the global batch kept, and finish.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from launch_utils import REPO, free_port, parent_pid, tagged_processes

from dist_seg.checkpoint import load_checkpoint

TAG = "DIST_SEG_NODE_LOSS_TEST"
MAX_STEPS, SAVE_EVERY, KILL_AFTER_STEP = 60, 5, 12
# Short timeouts for the test (launch/multinode.sh defaults: last_call 10, keep-alive 2 x 5, join 900).
RDZV_CONF = "join_timeout=60,last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=3,is_host=false"


def _children(pid: int) -> list[int]:
    out = []
    for p in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            if parent_pid(p) == pid:
                out.append(p)
        except OSError:
            continue
    return out


def _tagged(tag: str) -> list[int]:
    """Every live process whose environment carries this test's tag (agents, workers, loader workers)."""
    return list(tagged_processes(TAG, tag))


def _killpg(pid: int) -> None:
    try:
        os.killpg(os.getpgid(pid), signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_for(pattern: str, logs: list[Path], timeout: float, procs: list[subprocess.Popen]) -> None:
    """Until `pattern` is in one of the logs (only global rank 0 logs training, on whichever agent it is)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        texts = [log.read_text(errors="replace") for log in logs]
        if any(re.search(pattern, t) for t in texts):
            return
        assert all(p.poll() is None for p in procs), "a process exited early:\n" + "\n".join(texts)[-4000:]
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in {timeout} s:\n" + "\n".join(texts)[-4000:])


def test_a_lost_node_is_survived_with_the_global_batch_kept(tiny_shards, tmp_path: Path) -> None:
    tag, port, out = uuid.uuid4().hex, free_port(), tmp_path / "run"
    env = {
        **os.environ,
        TAG: tag,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO),
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    agent_cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1:2",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-id=node_loss_{tag[:8]}",
        f"--rdzv-conf={RDZV_CONF}",
        "--max-restarts=3",
        "-m",
        "dist_seg.train",
        "--config",
        str(REPO / "configs/cpu_small.yaml"),
        f"data.train_shards={tiny_shards['train4']}",  # 40 samples in 4 shards
        "data.val_shards=null",
        f"train.out_dir={out}",
        "model.name=fcn8s",
        "model.width_mult=0.0625",
        "data.crop_size=32",
        "data.num_workers=1",
        f"train.max_steps={MAX_STEPS}",
        f"train.save_every={SAVE_EVERY}",
        "train.log_every=1",
        "train.timeout_s=60",
    ]
    logs = {name: tmp_path / f"{name}.log" for name in ("store", "A", "B")}
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        with logs[name].open("w") as f:
            procs[name] = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        return procs[name]

    try:
        t0 = time.monotonic()
        store = start("store", [sys.executable, str(REPO / "launch/rdzv_store.py"), str(port)])
        _wait_for("listening", [logs["store"]], 30, [store])
        a = start("A", agent_cmd)
        time.sleep(0.5)
        b = start("B", agent_cmd)
        both = [store, a, b]
        _wait_for(r"2 process\(es\)", [logs["A"], logs["B"]], 60, both)
        _wait_for(rf"step {KILL_AFTER_STEP}/", [logs["A"], logs["B"]], 60, both)

        # Node A is lost: its agent's process group and each worker's own session (with its loader workers).
        workers = _children(a.pid)
        assert workers, "agent A has no worker to kill"
        t_kill = time.monotonic()
        for pid in [a.pid, *workers]:
            _killpg(pid)
        a.wait(timeout=10)
        before = logs["B"].read_text(errors="replace")
        done_steps = [int(s) for s in re.findall(r"step (\d+)/", logs["A"].read_text() + before)]
        assert done_steps and max(done_steps) < MAX_STEPS, "the kill did not land mid-run"

        b.wait(timeout=120)
        elapsed = time.monotonic() - t_kill
        log_b = logs["B"].read_text(errors="replace")
        assert b.returncode == 0, log_b[-4000:]
        after = log_b[len(before) :]
        assert "1 process(es)" in after, after[-3000:]
        resumed = re.search(r"resumed from \S*last\.pt at step (\d+)", after)
        assert resumed, after[-3000:]
        step = int(resumed.group(1))
        assert KILL_AFTER_STEP - SAVE_EVERY < step < MAX_STEPS and step % SAVE_EVERY == 0, resumed.group(0)
        # global batch 2 ranks x batch 2 = 4, kept on 1 rank through grad_accum 2
        assert re.search(
            r"global batch 4 kept: data\.batch_size=2 x 1 rank\(s\) x train\.grad_accum=2", after
        )
        assert f"step {MAX_STEPS}/" in after
        state = load_checkpoint(out / "last.pt")["train_state"]
        assert state["step"] == MAX_STEPS and state["global_batch"] == 4, state
        print(
            f"node loss: survivor resumed at step {step}, finished {elapsed:.1f} s after the kill, "
            f"{time.monotonic() - t0:.1f} s in all"
        )
    finally:
        for p in procs.values():
            _killpg(p.pid)
        for pid in _tagged(tag):
            _killpg(pid)
        for p in procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        end = time.monotonic() + 10  # SIGKILLed processes that are not our children vanish asynchronously
        while _tagged(tag) and time.monotonic() < end:
            time.sleep(0.2)
        assert not _tagged(tag), "processes of the test outlived it"
