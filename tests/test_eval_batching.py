"""Evaluation metrics do not depend on which images share a batch (so not on batch size or world size)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import shared_dataset

from dist_seg.config import DataConfig, ModelConfig
from dist_seg.data.convert import ConvertOptions, convert
from dist_seg.data.stream import build_eval_loader
from dist_seg.engine import compute_confusion
from dist_seg.models import build_model, input_constraints


def test_mixed_size_images_score_the_same_at_any_eval_batch_size(tmp_path: Path) -> None:
    ann, images = shared_dataset("icevision_coco6")  # six COCO photos of different sizes
    convert(ConvertOptions(str(ann), str(images), str(tmp_path / "s"), progress=False))
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="fcn8s", width_mult=0.0625), 81).eval()
    divisor, min_size = input_constraints(model)
    matrices = []
    # oneDNN picks kernels by batch size and differs in the last bits; the reference kernels do not
    with torch.backends.mkldnn.flags(enabled=False):
        for batch_size in (1, 4, 6):
            cfg = DataConfig(
                val_shards=str(tmp_path / "s"), eval_batch_size=batch_size, num_workers=0, pin_memory=False
            )
            loader = build_eval_loader(cfg, 0, 1, divisor, min_size)
            cm, _ = compute_confusion(model, loader, 81, torch.device("cpu"), None)
            matrices.append(cm.matrix.clone())
    coco = json.loads(ann.read_text())
    assert int(matrices[0].sum()) == sum(
        im["height"] * im["width"] for im in coco["images"]
    )  # every pixel once
    for m in matrices[1:]:
        assert torch.equal(m, matrices[0])
