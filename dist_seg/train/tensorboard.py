"""TensorBoard: the `tensorboard` tracker of train.loggers (TensorBoardTracker, over TBLogger, a SummaryWriter
wrapper) and readers for tests and checks.

After a resume, pass `purge_step` = the first step the resumed run will log: the writer records a restart
marker and TensorBoard (and `read_scalars`) drop everything the crashed run logged at that step or later,
so no step appears twice.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from dist_seg.train.tracker_api import ConfigReport, TrackedRun, TrackerSetup

TAGS: dict[str, str] = {
    "train/loss": "training loss (mean over the logging window, all ranks)",
    "train/lr/<group>": "learning rate of each optimizer group, by group name",
    "train/grad_norm": "global gradient norm before clipping",
    "train/grad_norm/<block>": "gradient norm of each top-level block of the model before clipping",
    "train/loss_scale": "AMP GradScaler scale (1.0 when no scaler is used)",
    "train/images_per_s": "training throughput, images per second summed over all ranks",
    "train/data_wait_frac": "fraction of step time spent waiting for the next batch",
    "train/gpu_mem_peak_gb": "peak GPU memory allocated on rank 0, GiB (GPU runs only)",
    "train/skipped_samples": "corrupt samples skipped so far (data.on_error=skip), all ranks",
    "train/remote_retries": "transient network faults retried so far (shards at URLs), all ranks",
    "val/miou": "validation mean IoU over classes present in truth or prediction",
    "val/pixel_acc": "validation pixel accuracy",
    "val/mean_acc": "validation mean class accuracy",
    "val/image_miou": "validation mIoU averaged over images",
    "val/iou/<class name>": "validation IoU of each class, by class name",
    "val/samples": "image: input | ground truth | prediction for a fixed set of validation images",
    "val/confusion": "image: row-normalised validation confusion matrix",
    "config": "text: the resolved config (YAML)",
}
"""The stable tags the training loop writes; `<...>` parts are filled in per optimizer group / model block /
class. With a weight EMA (train.ema_decay) its evaluation's scalars go under val_ema/ beside val/."""


def expand_tags(
    group_names: Iterable[str],
    class_names: Iterable[str],
    exclude: Iterable[str] = (),
    block_names: Iterable[str] = (),
) -> set[str]:
    """Concrete tag names of TAGS for the given optimizer groups, classes and model blocks (encoder, decoder,
    ...: step.parameter_blocks), minus `exclude`."""
    out: set[str] = set()
    for tag in TAGS:
        if tag == "train/lr/<group>":
            out.update(f"train/lr/{g}" for g in group_names)
        elif tag == "train/grad_norm/<block>":
            out.update(f"train/grad_norm/{b}" for b in block_names)
        elif tag == "val/iou/<class name>":
            out.update(f"val/iou/{c}" for c in class_names)
        else:
            out.add(tag)
    return out - set(exclude)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (int, float, str)):
            out[key] = v
        else:  # lists, None, paths: shown as text
            out[key] = str(v)
    return out


_TEXT_SUFFIX = "/text_summary"
_EVENT_FILE = re.compile(r"^events\.out\.tfevents\.(\d+)\.")


def _wait_for_later_second(log_dir: Path) -> None:
    """TensorBoard replays a directory's event files in name order, and names start with the creation second
    (then host, pid, counter, which do not sort by time). A restart marker only hides the crashed run's events
    if its file sorts after theirs, so never create a file in the same second as an existing one. The wait is
    capped: a file stamped in the future (another node's clock) must not stall the run."""
    if not log_dir.is_dir():
        return
    stamps = [int(m.group(1)) for p in log_dir.iterdir() if (m := _EVENT_FILE.match(p.name))]
    deadline = time.monotonic() + 2.0
    while stamps and int(time.time()) <= max(stamps) and time.monotonic() < deadline:
        time.sleep(0.05)


class TBLogger:
    """SummaryWriter wrapper; with `enabled=False` (ranks other than 0) every method does nothing and no
    directory or file is created."""

    def __init__(self, log_dir: Path, enabled: bool, purge_step: int | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.enabled = enabled
        self._writer: Any = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            _wait_for_later_second(self.log_dir)
            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def scalars(self, values: Mapping[str, float | Tensor], step: int) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), global_step=step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An [H, W, 3] uint8 picture (reporting renders the sample triplets and the confusion matrix)."""
        if self._writer is None:
            return
        self._writer.add_image(tag, image, global_step=step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int = 0, preformatted: bool = False) -> None:
        """TensorBoard renders text as markdown; `preformatted` indents it into a code block (for YAML)."""
        if self._writer is None:
            return
        if preformatted:
            text = "\n".join("    " + line for line in text.splitlines())
        self._writer.add_text(tag, text, global_step=step)

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float], step: int = 0) -> None:
        """Record hyper-parameters (nested dicts flattened with dots) and final metrics in the HParams tab.

        Written into this run's own event file (not a sub-run as `SummaryWriter.add_hparams` does); the
        metric values become scalars tagged `hparam/<name>` (a name already starting with `hparam/` is kept).
        """
        if self._writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        metric_tags = {k if k.startswith("hparam/") else f"hparam/{k}": float(v) for k, v in metrics.items()}
        exp, ssi, sei = hparams_summary(_flatten(hparams), metric_tags)
        fw = self._writer._get_file_writer()
        for summary in (exp, ssi, sei):
            fw.add_summary(summary, step)
        for tag, value in metric_tags.items():
            if math.isfinite(value):
                self._writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TBLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TensorBoardTracker:
    """train.loggers `tensorboard`: event files in out_dir/tb. A resume purges what the interrupted attempt
    logged past the checkpoint (TBLogger's purge_step), so TensorBoard shows the resumed attempt's values
    there; it has no run id to keep."""

    def __init__(self, setup: TrackerSetup) -> None:
        self.setup = setup
        self.tb: TBLogger | None = None

    def open(self) -> TrackedRun:
        resumed = self.setup.resumed_step
        log_dir = self.setup.out_dir / "tb"
        self.tb = TBLogger(log_dir, True, purge_step=resumed + 1 if resumed is not None else None)
        return TrackedRun(None, 0, f"event files in {log_dir}")

    def config(self, report: ConfigReport, step: int) -> None:
        self._tb.text("config", report.yaml, step, preformatted=True)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self._tb.scalars(values, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self._tb.image(tag, image, step)

    def final(self, settings: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        self._tb.hparams(settings, metrics, step)

    def flush(self) -> None:
        self._tb.flush()

    def close(self, outcome: str) -> None:
        self._tb.close()

    @property
    def _tb(self) -> TBLogger:
        assert self.tb is not None, "TensorBoardTracker used before open()"
        return self.tb


def _accumulator(log_dir: Path, purge: bool) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not Path(log_dir).is_dir():
        raise ValueError(f"TensorBoard log directory not found: {log_dir}")
    # size_guidance 0 = keep every event (the default reservoir samples long series).
    acc = EventAccumulator(
        str(log_dir),
        size_guidance={"scalars": 0, "images": 0, "tensors": 0, "histograms": 0},
        purge_orphaned_data=purge,
    )
    acc.Reload()
    return acc


def read_scalars(log_dir: Path, purge: bool = True) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the event files directly in `log_dir`, as TensorBoard shows them: tag -> [(step, value)] in
    file order. `purge=False` also returns what a restart marker (purge_step) hides, i.e. the raw events."""
    acc = _accumulator(Path(log_dir), purge)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_tags(log_dir: Path) -> set[str]:
    """Every scalar, image, text and histogram tag in `log_dir`. Text tags are given as passed to
    `TBLogger.text` (torch stores them with a `/text_summary` suffix)."""
    tags = _accumulator(Path(log_dir), True).Tags()
    found = {t for kind in ("scalars", "images", "tensors", "histograms") for t in tags.get(kind, [])}
    return found | {t.removesuffix(_TEXT_SUFFIX) for t in found if t.endswith(_TEXT_SUFFIX)}


def read_images(log_dir: Path, tag: str) -> list[tuple[int, np.ndarray]]:
    """Decoded images of `tag` as (step, [H, W, 3 or 4] uint8)."""
    import io

    from PIL import Image

    acc = _accumulator(Path(log_dir), True)
    return [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)))) for e in acc.Images(tag)]
