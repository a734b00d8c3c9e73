"""Start real `torchrun` jobs from tests: free ports, a bounded wall time, output captured; and find a job's
processes in /proc (its agent, ranks and their loader workers, each in its own session under torchrun)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The venv these tests run in, for launch scripts' DIST_SEG_VENV (their set-up is then a no-op). sys.prefix,
# not Path(sys.executable).resolve(): a venv's python is a symlink to the base interpreter, so resolving it
# names the base installation, and launch/_setup.sh would install dist_seg there (editable, from whichever
# checkout ran first) and the scripts would run that copy's console commands.
THIS_VENV = sys.prefix


def setup_used_this_venv(output: str) -> bool:
    """Whether a launch script's output says its set-up found THIS_VENV ready (and so used it)."""
    return f"[setup] {THIS_VENV} is up to date" in output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    args: list[str],
    nproc: int = 2,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    extra: list[str] | None = None,
) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=nproc ARGS` on localhost; a hang fails the test through `timeout`."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *(extra or []),
        *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def tagged_processes(var: str, value: str) -> dict[int, dict[str, str]]:
    """pid -> environment of every live process whose environment has `var`=`value`: a test starts a job with
    a tag in its environment, and every process it starts inherits it (zombies have an empty environment)."""
    found = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours
            continue
        pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
        env = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}
        if env.get(var) == value:
            found[pid] = env
    return found


def parent_pid(pid: int) -> int:
    """The parent of `pid`, from /proc/PID/stat (the field after the state, past the command name)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])
