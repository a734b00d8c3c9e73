"""Checkpoints: what one holds, atomic writes, safe loads, and the last/best/step files of a run.

This module is the one owner of the checkpoint layout: `training_checkpoint` writes it, `check_model`
validates it, `restore_training` reads it back for resuming and `load_for_inference` for evaluation and
prediction. Keys: model, optimizer, scheduler, scaler ({} without fp16), train_state, rng (one entry per
rank), config, model_name, num_classes, class_names, ema (train.ema_decay runs only: decay, updates and
the averaged weights as a model state dict; see dist_seg.train.ema), and run_key (the key by which a resume
finds the run's MLflow and W&B runs again; see dist_seg.train.tracking).

A checkpoint is written to a hidden temp file in the target's directory, flushed, fsynced and renamed over
the target, then the directory is fsynced: a crash at any moment leaves either the old file or the new one,
never a torn one. Loading uses `torch.load(weights_only=True)` only, so a checkpoint can hold tensors,
numbers, strings, lists, tuples and dicts but never executes code.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from dist_seg.config.schema import Config, ModelConfig, to_dict
from dist_seg.data.format.urls import redacted_config
from dist_seg.models import build_model, unwrap
from dist_seg.runtime.rng_state import restore_rng_state, seed_rngs

_STEP_FILE = re.compile(r"^step-(\d{8,})\.pt$")
_TEMP_GLOB = ".*.tmp"

BeforeRename = Callable[[Path], None]


class AveragedWeights(Protocol):
    """What a checkpoint needs of a weight average (dist_seg.train.ema.WeightEMA), declared here so that
    inference, which reads checkpoints, does not import the training package."""

    decay: float

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def reset_to(self, model: nn.Module) -> None: ...


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; some platforms/filesystems cannot open a directory, which is harmless.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Any, before_rename: BeforeRename | None = None) -> None:
    """Run `write(fileobj)` into a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            recorder = _RecordingWriter(f)
            try:
                write(recorder)
            except RuntimeError as e:
                if recorder.error is None:
                    raise RuntimeError(f"cannot write checkpoint {path}: {e}") from e
                raise recorder.error from e
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename(Path(tmp))
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise OSError(e.errno, f"cannot write checkpoint {path}: {e.strerror or e}") from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    _fsync_dir(path.parent)


def save_checkpoint(path: Path, state: dict[str, Any], before_rename: BeforeRename | None = None) -> None:
    """Atomically write `state` to `path`; on failure the previous file at `path` is untouched and the
    error (OSError or RuntimeError) names `path`.

    `before_rename(temp_path)` runs once the data is durable but not yet renamed: a fault-injection point
    (a crash there must leave the previous checkpoint in place), None in normal runs.
    """
    _write_atomic(Path(path), lambda f: torch.save(state, f), before_rename)


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; anything else (missing, torn, not a dict, or a pickle
    that references code) raises a ValueError or RuntimeError naming `path`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling, zip and storage errors all mean the same thing here
        raise RuntimeError(f"{path} is not a loadable checkpoint: {_describe_load_error(e)}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a checkpoint: it holds a {type(state).__name__}, not a dict")
    return state


def _describe_load_error(e: Exception) -> str:
    text = str(e)
    # torch's weights_only refusal is a long advice text; the useful part is the unpickler's reason.
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please use|\n\n|$)", text, flags=re.S)
    if m:
        return f"weights_only loading refused it ({m.group(1).strip()}); nothing in the file was executed"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class _RecordingWriter:
    """File wrapper that remembers the OSError of a failed write: torch's zip writer turns it into an
    uninformative RuntimeError ("unexpected pos"), and the errno (ENOSPC, EFBIG, EIO) is what users need."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self._f.flush()


class CheckpointManager:
    """The checkpoint files of one run directory.

    `last.pt` is rewritten at every save; `step-XXXXXXXX.pt` copies are kept for the newest `keep_last`
    steps (none when keep_last is 0); `best.pt` is a copy made when `is_best`. Copies are byte copies of
    `last.pt` (no second serialisation), each written atomically. Only the writing rank (rank 0) calls
    `save`; every rank may call `resume_path`.
    """

    def __init__(
        self, out_dir: Path, keep_last: int, before_rename: Callable[[int], None] | None = None
    ) -> None:
        if keep_last < 0:
            raise ValueError(f"config key train.keep_last={keep_last}: must be >= 0")
        self.out_dir = Path(out_dir)
        self.keep_last = keep_last
        self._cleaned = False
        # fault-injection point for last.pt, called with the step being saved; see save_checkpoint
        self.before_rename = before_rename

    @property
    def last(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.out_dir / "best.pt"

    def step_path(self, step: int) -> Path:
        return self.out_dir / f"step-{step:08d}.pt"

    def save(self, state: dict[str, Any], step: int, is_best: bool) -> Path:
        """Write `last.pt` (and the step copy, and `best.pt` when `is_best`); returns the path of last.pt."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(
                e.errno, f"cannot create checkpoint directory {self.out_dir}: {e.strerror or e}"
            ) from e
        if not self._cleaned:
            self.clean_temp_files()
            self._cleaned = True
        hook = self.before_rename
        save_checkpoint(self.last, state, (lambda _tmp: hook(step)) if hook is not None else None)
        if self.keep_last > 0:
            self._copy(self.last, self.step_path(step))
            self.prune()
        if is_best:
            self._copy(self.last, self.best)
        return self.last

    def _copy(self, src: Path, dst: Path) -> None:
        with open(src, "rb") as fsrc:
            _write_atomic(dst, lambda f: shutil.copyfileobj(fsrc, f, length=16 << 20))

    def step_files(self) -> list[tuple[int, Path]]:
        """(step, path) of the step-stamped checkpoints, oldest first."""
        found = []
        if self.out_dir.is_dir():
            for p in self.out_dir.iterdir():
                m = _STEP_FILE.match(p.name)
                if m and p.is_file():
                    found.append((int(m.group(1)), p))
        return sorted(found)

    def prune(self) -> None:
        """Delete step-stamped checkpoints beyond the newest `keep_last` (by step number)."""
        files = self.step_files()
        for _, p in files[: max(len(files) - self.keep_last, 0)]:
            p.unlink(missing_ok=True)

    def clean_temp_files(self) -> list[Path]:
        """Remove temp files left by an interrupted write; returns what was removed."""
        removed = []
        if self.out_dir.is_dir():
            for p in self.out_dir.glob(_TEMP_GLOB):
                if p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(p)
        return removed

    def resume_path(self, resume: str | None) -> Path | None:
        """`train.resume`: "auto" -> out_dir/last.pt when it exists (temp files of a crashed write are never
        considered), else None; a path -> that file, which must exist; None -> None."""
        if resume is None:
            return None
        if resume == "auto":
            return self.last if self.last.is_file() else None
        path = Path(resume)
        if not path.is_file():
            raise ValueError(f"config key train.resume={resume!r}: checkpoint file not found: {path}")
        return path


# ---------------------------------------------------------------------------------------------- the layout
def training_checkpoint(
    cfg: Config,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    train_state: dict[str, Any],
    rng: list[dict[str, Any]],
    num_classes: int,
    class_names: list[str],
    ema: AveragedWeights | None = None,
    run_key: str | None = None,
) -> dict[str, Any]:
    """Everything a run needs to resume (and evaluation/prediction to rebuild the model). `rng` holds every
    rank's RNG state, in rank order, so that each rank restores its own; `run_key` is the run trackers'
    key (rank 0's, which writes)."""
    extra: dict[str, Any] = {"ema": ema.state_dict()} if ema is not None else {}
    if run_key is not None:
        extra["run_key"] = run_key
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "train_state": train_state,
        "rng": rng,
        "config": to_dict(redacted_config(cfg)),  # URLs without credentials: a resume takes them afresh
        "model_name": cfg.model.name,
        "num_classes": num_classes,
        "class_names": class_names,
        **extra,
    }


def run_key(ck: dict[str, Any]) -> str | None:
    """The run trackers' key `training_checkpoint` stored (None in checkpoints written before there was one)."""
    key = ck.get("run_key")
    return str(key) if key else None


def check_model(ck: dict[str, Any], path: Path, model_name: str, num_classes: int) -> None:
    """ValueError naming both sides when the checkpoint holds another model or another class count."""
    if ck.get("model_name") != model_name or ck.get("num_classes") != num_classes:
        raise ValueError(
            f"checkpoint {path} holds model {ck.get('model_name')!r} with {ck.get('num_classes')} classes, "
            f"but the config asks for model {model_name!r} with {num_classes} classes"
        )


def restore_training(
    ck: dict[str, Any],
    path: Path,
    cfg: Config,
    num_classes: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    rank: int,
    ema: AveragedWeights | None = None,
) -> tuple[dict[str, Any], str | None]:
    """Load a checkpoint read from `path` into the training objects and this rank's RNG; returns the saved
    train_state and a note for the log (or None). A rank the checkpoint had no RNG state for (the run resumes
    on more ranks) seeds its RNGs from (train.seed, rank, step), so it is reproducible too."""
    check_model(ck, path, cfg.model.name, num_classes)
    unwrap(model).load_state_dict(ck["model"])
    note = None
    if ema is not None and "ema" in ck:
        ema.load_state_dict(ck["ema"])
    elif ema is not None:
        ema.reset_to(model)
        note = f"{path} holds no weight EMA: train.ema_decay={ema.decay} starts one from its weights"
    elif "ema" in ck:
        note = f"{path} holds a weight EMA, which this run drops (train.ema_decay is null)"
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    if scaler is not None and ck["scaler"]:
        scaler.load_state_dict(ck["scaler"])
    if rank < len(ck["rng"]):
        restore_rng_state(ck["rng"][rank])
    else:
        seed_rngs(cfg.train.seed, rank, int(ck["train_state"].get("step", 0)))
    return ck["train_state"], note


@dataclasses.dataclass
class LoadedCheckpoint:
    path: Path
    model_name: str
    num_classes: int
    class_names: list[str]
    step: int | None
    weights: str = "model"  # "model" (the trained weights) or "ema" (their moving average)
    model_cfg: ModelConfig | None = None  # the model built
    saved_config: dict[str, Any] = dataclasses.field(default_factory=dict)  # the training run's config


WEIGHTS = ("auto", "ema", "model")


def load_for_inference(
    cfg: Config,
    checkpoint: str | Path,
    device: torch.device,
    num_classes: int | None = None,
    weights: str = "auto",
    own_model: bool = False,
) -> tuple[nn.Module, LoadedCheckpoint]:
    """The model of `cfg` with the checkpoint's weights, on `device`, in eval mode.

    `weights`: "ema" (the train.ema_decay average; an error when the checkpoint has none), "model" (the
    trained weights) or "auto" (the EMA when the checkpoint has one). `own_model` builds the model the
    checkpoint's own config names (name, width) instead of cfg.model's: an ensemble of different models.
    ValueError naming both sides when the checkpoint holds another model or another number of classes than
    the config (`num_classes`, or cfg.model.num_classes, when given) asks for, or weights of another width.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"--weights {weights!r}: expected one of {', '.join(WEIGHTS)}")
    path = Path(checkpoint)
    ck = load_checkpoint(path, map_location="cpu")
    if "model" not in ck:
        raise ValueError(f"checkpoint {path} has no 'model' weights (keys: {sorted(ck)})")
    if weights == "ema" and "ema" not in ck:
        raise ValueError(
            f"--weights ema: checkpoint {path} holds no weight EMA (trained without train.ema_decay)"
        )
    use = "ema" if weights == "ema" or (weights == "auto" and "ema" in ck) else "model"
    model_cfg = cfg.model
    if own_model:
        saved = ck.get("config", {}).get("model", {})
        model_cfg = dataclasses.replace(
            cfg.model, **{k: saved[k] for k in ("name", "width_mult") if k in saved}
        )
    want = num_classes or (None if own_model else cfg.model.num_classes) or ck.get("num_classes")
    check_model(ck, path, model_cfg.name, want)
    # weights come from the checkpoint: never load (or download) the ImageNet encoder first
    model_cfg = dataclasses.replace(model_cfg, pretrained=None)
    model = build_model(model_cfg, int(want))
    try:
        model.load_state_dict(ck["ema"]["weights"] if use == "ema" else ck["model"])
    except RuntimeError as e:
        ck_width = ck.get("config", {}).get("model", {}).get("width_mult")
        raise ValueError(
            f"checkpoint {path} (model.width_mult={ck_width}) does not fit model {model_cfg.name!r} with "
            f"model.width_mult={model_cfg.width_mult}: {str(e).strip().splitlines()[0]}"
        ) from e
    names = list(ck.get("class_names") or [f"class_{i}" for i in range(int(want))])
    step = ck.get("train_state", {}).get("step")
    saved_cfg = ck.get("config", {})
    meta = LoadedCheckpoint(path, str(ck["model_name"]), int(want), names, step, use, model_cfg, saved_cfg)
    return model.to(device).eval(), meta
