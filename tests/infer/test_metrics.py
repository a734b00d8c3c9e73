"""Confusion-matrix metrics against a worked example computed by hand (see the comments)."""

import json
import math

import numpy as np
import pytest
import torch

from dist_seg.infer.metrics import ConfusionMatrix, compute_metrics, to_jsonable

IGN = 255

# Image A (3 classes). Valid pixels (target, pred): (0,0) (0,1) (1,1) (1,1) (2,0); the ignored pixel predicts 2.
TARGET_A = [[0, 0, 1], [1, 2, IGN]]
PRED_A = [[0, 1, 1], [1, 0, 2]]
# Image B. Valid pixels: (2,2) (2,2) (2,0) (0,0); the two ignored pixels predict class 1, which must not count.
TARGET_B = [[2, 2, 2], [0, IGN, IGN]]
PRED_B = [[2, 2, 0], [0, 1, 1]]
# Image C has no labelled pixel: it adds nothing, and is not counted by the image-averaged mIoU.
TARGET_C = [[IGN, IGN, IGN], [IGN, IGN, IGN]]
PRED_C = [[1, 1, 1], [1, 1, 1]]

# Summed matrix (rows = truth):   row 0: [2, 1, 0]   row 1: [0, 2, 0]   row 2: [2, 0, 2]
EXPECTED_MATRIX = [[2, 1, 0], [0, 2, 0], [2, 0, 2]]
# pixel acc = (2 + 2 + 2) / 9
PIXEL_ACC = 6 / 9
# class acc = 2/3, 2/2, 2/4 -> mean 13/18
ACC = [2 / 3, 1.0, 0.5]
MEAN_ACC = 13 / 18
# IoU = tp / (row + col - tp): column sums are 4, 3, 2 -> 2/(3+4-2), 2/(2+3-2), 2/(4+2-2)
IOU = [0.4, 2 / 3, 0.5]
MIOU = 47 / 90
# Image A: IoUs 1/3, 2/3, 0 (class 2 in truth, never predicted) -> 1/3.
# Image B: class 0: 1/(1+2-1) = 1/2, class 2: 2/(3+2-2) = 2/3, class 1 absent -> (1/2 + 2/3) / 2 = 7/12.
IMAGE_MIOU = (1 / 3 + 7 / 12) / 2


def _batch(*images):
    return torch.tensor([list(i) for i in images], dtype=torch.int64)


def _filled(num_classes=3):
    cm = ConfusionMatrix(num_classes, ignore_index=IGN)
    cm.update(_batch(PRED_A, PRED_B), _batch(TARGET_A, TARGET_B))
    cm.update(_batch(PRED_C), _batch(TARGET_C))
    return cm


def test_worked_example():
    m = _filled().compute()
    assert m["matrix"] == EXPECTED_MATRIX
    assert m["num_pixels"] == 9
    assert m["pixel_acc"] == pytest.approx(PIXEL_ACC)
    assert m["acc"] == pytest.approx(ACC)
    assert m["mean_acc"] == pytest.approx(MEAN_ACC)
    assert m["iou"] == pytest.approx(IOU)
    assert m["miou"] == pytest.approx(MIOU)
    assert m["image_miou"] == pytest.approx(IMAGE_MIOU)


def test_batching_does_not_matter():
    cm = ConfusionMatrix(3)
    for pred, target in ((PRED_C, TARGET_C), (PRED_B, TARGET_B), (PRED_A, TARGET_A)):
        cm.update(torch.tensor(pred), torch.tensor(target))  # [H, W] form, one image at a time
    m = cm.compute()
    assert m["matrix"] == EXPECTED_MATRIX
    assert m["image_miou"] == pytest.approx(IMAGE_MIOU)


def test_absent_class_is_nan_and_excluded():
    m = _filled(num_classes=4).compute(class_names=["bg", "a", "b", "never"])
    assert math.isnan(m["iou"][3]) and math.isnan(m["acc"][3])
    assert m["miou"] == pytest.approx(MIOU)
    assert m["mean_acc"] == pytest.approx(MEAN_ACC)
    assert math.isnan(m["iou_by_class"]["never"])
    assert m["iou_by_class"]["a"] == pytest.approx(2 / 3)


def test_predicted_but_absent_class_counts_as_zero():
    # class 3 predicted once (a truth-0 pixel): IoU 0 joins the mean; class 0 loses that pixel.
    cm = _filled(num_classes=4)
    cm.update(torch.tensor([[3]]), torch.tensor([[0]]))
    m = cm.compute()
    assert m["iou"][3] == 0.0
    # class 0: tp 2, row 4, column 4 -> 2/6
    assert m["iou"][0] == pytest.approx(2 / 6)
    assert m["miou"] == pytest.approx((2 / 6 + 2 / 3 + 0.5 + 0.0) / 4)
    assert math.isnan(m["acc"][3])


def test_reduce_sums_two_ranks_exactly():
    single = _filled()
    rank0, rank1 = ConfusionMatrix(3), ConfusionMatrix(3)
    rank0.update(_batch(PRED_A), _batch(TARGET_A))
    rank1.update(_batch(PRED_B, PRED_C), _batch(TARGET_B, TARGET_C))
    calls = []
    peer = iter([rank1.matrix, rank1.image_stats])

    def all_reduce(t):  # SUM over the two "ranks", in place, as distributed.all_reduce does
        calls.append(t.dtype)
        t.add_(next(peer))

    rank0.reduce_(all_reduce)
    assert calls == [torch.int64, torch.float64]
    assert torch.equal(rank0.matrix, single.matrix)
    assert rank0.compute()["image_miou"] == pytest.approx(IMAGE_MIOU)


def test_out_of_range_target_names_value():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="target value 7"):
        cm.update(torch.tensor([[0, 1]]), torch.tensor([[7, IGN]]))
    with pytest.raises(ValueError, match="prediction value 5"):
        cm.update(torch.tensor([[5, 1]]), torch.tensor([[0, 1]]))
    assert cm.matrix.sum() == 0


def test_compute_metrics_on_numpy_and_empty():
    m = compute_metrics(np.array(EXPECTED_MATRIX))
    assert m["miou"] == pytest.approx(MIOU)
    assert math.isnan(m["image_miou"])
    empty = compute_metrics(np.zeros((2, 2), dtype=np.int64))
    assert math.isnan(empty["pixel_acc"]) and math.isnan(empty["miou"])
    text = json.dumps(to_jsonable(empty), allow_nan=False)
    assert '"miou": null' in text
    with pytest.raises(ValueError, match="square"):
        compute_metrics(np.zeros((2, 3)))
