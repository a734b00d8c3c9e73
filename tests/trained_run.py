"""A short training run on 12 trashcan val images and its checkpoint, shared by the evaluation tests
(tests/infer/test_evaluate.py) and their 2-rank end-to-end runs (tests/e2e/test_inference_ranks.py). Each of
them makes module fixtures of `one_thread` (autouse) and `train_run`."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest
import torch
from conftest import REPO, shared_dataset

from dist_seg.config.loading import load_config
from dist_seg.data.prep.coco import load_coco
from dist_seg.data.prep.convert import ConvertOptions, convert
from dist_seg.runtime import distributed as D

N_IMAGES = 12
CONFIG = str(REPO / "configs/cpu_small.yaml")
# deeplab_v1 is the fastest VGG model on CPU; eval_resize keeps the eval passes small
MODEL = ["model.name=deeplab_v1", "data.eval_resize=128"]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The thread count changes how oneDNN splits a convolution, so the last bits of logits and the argmax at
    ties (measured: 8 of 1.5 M pixels differ between 1 and 2 threads). The torchrun workers run with
    OMP_NUM_THREADS=1 (launch_utils), so the in-process references do too."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def train_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-step training run (the trainer evaluates at its last step) on 12 trashcan val images."""
    from dist_seg.train.loop import fit

    ann, images = shared_dataset("trashcan_subset_val")
    tmp = tmp_path_factory.mktemp("evaluate")
    coco = load_coco(ann)
    coco["images"] = coco["images"][:N_IMAGES]
    keep = {im["id"] for im in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    (tmp / "val.json").write_text(json.dumps(coco))
    for name, labels in (("shards", True), ("test_shards", False)):
        opts = ConvertOptions(
            str(tmp / "val.json"), str(images), str(tmp / name), min_shards=3, progress=False
        )
        opts.no_labels = not labels
        convert(opts)
    shards = str(tmp / "shards")
    overrides = [
        *MODEL,
        f"data.train_shards={shards}",
        f"data.val_shards={shards}",
        f"train.out_dir={tmp / 'run'}",
    ]
    overrides += ["train.max_steps=2", "optim.lr=0.01"]
    cfg = load_config(CONFIG, overrides)
    fit(cfg, D.init_distributed("cpu"))
    return {"tmp": tmp, "images": images, "overrides": overrides, "ck": tmp / "run" / "last.pt"}


def untrained_fcn8s(run: dict):
    """A randomly initialised FCN-8s (width 0.125) checkpoint with the run's classes and config: a second,
    different ensemble member, whose label maps are far from uniform."""
    from dist_seg.checkpoint import load_checkpoint, save_checkpoint
    from dist_seg.config.schema import to_dict
    from dist_seg.models import build_model

    path = run["tmp"] / "fcn8s.pt"
    if not path.exists():
        trained = load_checkpoint(run["ck"])
        cfg = load_config(CONFIG, [*run["overrides"], "model.name=fcn8s", "model.width_mult=0.125"])
        torch.manual_seed(1)
        model = build_model(cfg.model, trained["num_classes"])
        state = {**trained, "model": model.state_dict(), "model_name": "fcn8s", "config": to_dict(cfg)}
        save_checkpoint(path, state)
    return path
