"""Stop-signal latency: seconds from a stop signal to the checkpoint written and to the job's exit.

    python benchmarks/stop_latency.py                       # SIGTERM to the torchrun agent at step 12
    python benchmarks/stop_latency.py --to job              # to every process of the job, as SLURM does
    python benchmarks/stop_latency.py --repeat 3 -- model.width_mult=0.25     # overrides after --

The recipe's shape scaled to a CPU machine: 2 processes under torchrun (gloo), configs/deconvnet_vgg16bn.yaml
with model.width_mult=0.125 data.crop_size=224 data.batch_size=2 data.num_workers=2 train.amp=off
train.save_every=1000 train.max_steps=200 (no evaluation: data.val_shards=null), trained on `dist-seg synth`
images at 224 px converted by `dist-seg convert`. The signal goes out when the progress line of --at-step
appears; the run then finishes the step it is in, writes last.pt (and, with train.keep_last > 0, its
step-stamped copy) and OUT/preempted.json, and every process exits.

Prints the step time (median between progress lines), then per repeat: seconds from the signal to last.pt,
to preempted.json (the checkpoint complete) and to torchrun's exit, and the checkpoint's size in bytes; then
the time to write that checkpoint alone (load it, save it again atomically with fsync) as the disk's rate.
"""

from __future__ import annotations

import argparse
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from synthetic_shards import synthetic_shards  # noqa: E402

from dist_seg.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

RECIPE = [
    "model.width_mult=0.125", "data.crop_size=224", "data.batch_size=2", "data.num_workers=2",
    "train.amp=off", "train.save_every=1000", "train.max_steps=200", "data.val_shards=null",
    "train.log_every=1",
]  # fmt: skip
TAG = "DIST_SEG_STOP_LATENCY"  # environment variable marking the processes of the job


def _job_processes(tag: str) -> list[int]:
    """Every live process whose environment carries the job's tag (agent, ranks, loader workers)."""
    found = []
    needle = f"{TAG}={tag}".encode()
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(pid)
        except OSError:
            continue
    return found


def _send(to: str, agent: subprocess.Popen, tag: str) -> None:
    pids = [agent.pid] if to == "agent" else _job_processes(tag)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _one_run(shards: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    """Train until --at-step, signal, and time the checkpoint and the exit."""
    tag = uuid.uuid4().hex
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--standalone",
        f"--shutdown-timeout={args.shutdown_timeout}", "--module", "dist_seg.train",
        "--config", str(REPO / "configs/deconvnet_vgg16bn.yaml"), f"data.train_shards={shards}",
        f"train.out_dir={out}", *RECIPE, *args.overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), TAG: tag}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put((time.monotonic(), ln)) for ln in proc.stdout], daemon=True
    ).start()
    step_times, log = [], []
    while True:
        try:
            t, line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                sys.exit("the run ended before the signal:\n" + "".join(log[-40:]))
            continue
        log.append(line)
        if line.startswith("step "):
            step_times.append(t)
        if line.startswith(f"step {args.at_step}/"):
            break
    t0 = time.monotonic()
    _send(args.to, proc, tag)
    seen: dict[str, float] = {}
    while True:  # poll every 5 ms: the files appear by atomic rename, the exit is the agent's
        now, ended = time.monotonic() - t0, proc.poll() is not None
        for name in ("last.pt", "preempted.json"):
            if name not in seen and (out / name).exists():
                seen[name] = now
        if ended:
            seen["exit"] = now
            break
        time.sleep(0.005)
    if "preempted.json" not in seen:
        sys.exit("no checkpoint written:\n" + "".join(log[-40:] + [ln for _, ln in list(lines.queue)]))
    seen["step_s"] = statistics.median(b - a for a, b in zip(step_times[1:], step_times[2:], strict=False))
    seen["bytes"] = (out / "last.pt").stat().st_size
    seen["stopped_at"] = load_checkpoint(out / "last.pt")["train_state"]["step"]
    return seen


def _write_alone(checkpoint: Path) -> float:
    """Seconds to write the checkpoint again, atomically and fsynced, beside it."""
    state = load_checkpoint(checkpoint)
    t0 = time.perf_counter()
    save_checkpoint(checkpoint.with_name("rewrite.pt"), state)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--to", choices=("agent", "job"), default="agent", help="the torchrun agent, or every process"
    )
    p.add_argument("--at-step", type=int, default=12, help="signal when this step's progress line appears")
    p.add_argument("--images", type=int, default=200, help="synthetic training images (50 steps an epoch)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--shutdown-timeout", type=int, default=170, help="torchrun's, so that it never cuts in")
    p.add_argument("--data", type=Path, default=None, help="a shard directory to reuse (default: make one)")
    p.add_argument("overrides", nargs="*", help="more config overrides (after --)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.data or synthetic_shards(Path(tmp), args.images)
        runs = [_one_run(shards, Path(tmp) / f"run{i}", args) for i in range(args.repeat)]
        rewrite = _write_alone(Path(tmp) / "run0" / "last.pt")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"{args.nproc} processes, {' '.join(RECIPE + args.overrides)}; SIGTERM to the {args.to}")
    for r in runs:
        print(
            f"step time {r['step_s']:.2f} s; signal at step {args.at_step}, checkpoint of step {r['stopped_at']}: "
            f"last.pt after {r['last.pt']:.2f} s, checkpoint complete (preempted.json) after "
            f"{r['preempted.json']:.2f} s, exit after {r['exit']:.2f} s; checkpoint {r['bytes']} bytes"
        )
    size = runs[0]["bytes"]
    print(f"writing the checkpoint alone: {rewrite:.3f} s ({size / rewrite / 1e6:.0f} MB/s, fsync included)")


if __name__ == "__main__":
    main()
