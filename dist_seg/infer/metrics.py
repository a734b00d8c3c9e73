"""Segmentation metrics from a confusion matrix that can be all-reduced exactly.

Each rank accumulates an int64 [C, C] matrix (rows = ground truth, columns = prediction) and the running sum
and count of per-image mIoU; `reduce_` sums both across ranks once, and `compute` derives every metric from
the reduced state. Never average per-rank mIoU: integer counts sum exactly, ratios do not.

Conventions (also in the README):
- Pixels whose target is `ignore_index` count nowhere, whatever the prediction there.
- IoU of a class absent from both truth and prediction is NaN and excluded from mIoU (a class that is
  predicted but absent from the truth has IoU 0 and counts). Class accuracy of a class with no ground-truth
  pixel is NaN and excluded from mean accuracy.
- Image-averaged mIoU: for every image, the mean IoU over the classes present in its truth or its
  prediction (labelled pixels only), then the mean over images; images without a labelled pixel are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dist_seg.data import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates the confusion matrix and the image-averaged mIoU state for `num_classes` classes."""

    def __init__(
        self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str | None = None
    ):
        if num_classes < 1:
            raise ValueError(f"ConfusionMatrix: num_classes={num_classes} must be >= 1")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        # [sum of per-image mIoU, number of images]: float64 so that sums over ~1e6 images stay exact enough.
        self.image_stats = torch.zeros(2, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: `pred` and `target` are integer tensors [N, H, W] (or [H, W] for one image)."""
        if pred.shape != target.shape:
            raise ValueError(
                f"ConfusionMatrix.update: pred {tuple(pred.shape)} vs target {tuple(target.shape)}"
            )
        if target.dim() == 2:
            pred, target = pred.unsqueeze(0), target.unsqueeze(0)
        if target.dim() != 3:
            raise ValueError(f"ConfusionMatrix.update: expected [N,H,W] labels, got {tuple(target.shape)}")
        c = self.num_classes
        pred = pred.to(self.matrix.device, torch.int64)
        target = target.to(self.matrix.device, torch.int64)
        valid = target != self.ignore_index
        self._check_range(pred, target, valid)

        n = target.shape[0]
        image = torch.arange(n, device=target.device).view(n, 1, 1).expand_as(target)
        # Ignored pixels go to one extra bin that is dropped, which avoids a data-dependent gather.
        flat = torch.where(valid, image * (c * c) + target * c + pred, n * c * c)
        per_image = torch.bincount(flat.flatten(), minlength=n * c * c + 1)[:-1].view(n, c, c)
        self.matrix += per_image.sum(0)

        inter = per_image.diagonal(dim1=1, dim2=2).to(torch.float64)
        union = per_image.sum(2).to(torch.float64) + per_image.sum(1).to(torch.float64) - inter
        present = union > 0
        iou = torch.where(present, inter / union.clamp_min(1), torch.zeros_like(inter))
        n_present = present.sum(1)
        counted = n_present > 0
        image_miou = iou.sum(1) / n_present.clamp_min(1)
        self.image_stats[0] += torch.where(counted, image_miou, torch.zeros_like(image_miou)).sum()
        self.image_stats[1] += counted.sum()

    def _check_range(self, pred: Tensor, target: Tensor, valid: Tensor) -> None:
        # One host sync per batch; cheap next to a forward pass, and a wrong label must not be binned silently.
        c = self.num_classes
        bad_target = valid & ((target < 0) | (target >= c))
        bad_pred = valid & ((pred < 0) | (pred >= c))
        if not bool((bad_target | bad_pred).any()):
            return
        what, labels, bad = (
            ("target", target, bad_target) if bad_target.any() else ("prediction", pred, bad_pred)
        )
        raise ValueError(
            f"ConfusionMatrix: {what} value {int(labels[bad][0])} is outside 0..{c - 1} "
            f"and is not the ignore index {self.ignore_index}"
        )

    def reduce_(self, all_reduce: Callable[[Tensor], None]) -> None:
        """Sum the state across processes in place.

        Calls `all_reduce` exactly twice, each time with a tensor it must SUM-reduce in place: first the int64
        [C, C] matrix, then the float64 tensor [image-mIoU sum, image count]. Every rank must call this.
        """
        all_reduce(self.matrix)
        all_reduce(self.image_stats)

    def compute(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """All metrics of the current state; see `compute_metrics`."""
        s, count = self.image_stats.tolist()
        return compute_metrics(self.matrix, image_miou_sum=s, image_count=count, class_names=class_names)


def compute_metrics(
    matrix: np.ndarray | Tensor,
    image_miou_sum: float = 0.0,
    image_count: float = 0.0,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Metrics of a confusion matrix (rows = ground truth, columns = prediction).

    Returns pixel_acc, mean_acc, miou, iou (list, NaN for classes absent from truth and prediction), acc
    (list, NaN for classes without ground truth), image_miou (NaN when no image was counted), num_pixels,
    matrix (nested lists of ints), and `iou_by_class` (name -> IoU) when class_names are given. Metrics
    without any defined term are NaN.
    """
    if isinstance(matrix, Tensor):
        matrix = matrix.detach().cpu().numpy()
    m = np.asarray(matrix, dtype=np.int64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"compute_metrics: confusion matrix must be square, got shape {m.shape}")
    if class_names is not None and len(class_names) != m.shape[0]:
        raise ValueError(f"compute_metrics: {len(class_names)} class names for a {m.shape[0]}-class matrix")
    mf = m.astype(np.float64)
    tp = np.diag(mf)
    gt = mf.sum(1)
    union = gt + mf.sum(0) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    total = mf.sum()
    out: dict[str, Any] = {
        "pixel_acc": float(tp.sum() / total) if total > 0 else math.nan,
        "mean_acc": _nanmean(acc),
        "miou": _nanmean(iou),
        "image_miou": float(image_miou_sum / image_count) if image_count > 0 else math.nan,
        "iou": [float(v) for v in iou],
        "acc": [float(v) for v in acc],
        "num_pixels": int(m.sum()),
        "matrix": m.tolist(),
    }
    if class_names is not None:
        out["iou_by_class"] = {name: float(v) for name, v in zip(class_names, iou, strict=True)}
    return out


def _nanmean(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else math.nan


def to_jsonable(metrics: Any) -> Any:
    """Copy of `metrics` with NaN/inf floats replaced by None, so `json.dumps` writes strict JSON."""
    if isinstance(metrics, dict):
        return {k: to_jsonable(v) for k, v in metrics.items()}
    if isinstance(metrics, (list, tuple)):
        return [to_jsonable(v) for v in metrics]
    if isinstance(metrics, float) and not math.isfinite(metrics):
        return None
    return metrics
