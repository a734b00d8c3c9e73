"""Run under torchrun: `evaluate` then `predict` (with a CSV) in one process group, as the CLI would.

torchrun --nproc_per_node=2 tests/workers/predict_worker.py CKPT[,CKPT...] SHARDS IMAGES COCO OUT [key=value ...]

Several comma-separated checkpoints are an ensemble; the environment variable INFERENCE may hold a json
object of the shared inference options (e.g. {"tta": "flip", "mode": "slide", "window": 96}).
"""

import json
import os
import sys
from pathlib import Path

from dist_seg.config.loading import load_config
from dist_seg.infer.evaluate import evaluate_checkpoint
from dist_seg.infer.options import inference_defaults
from dist_seg.infer.predict import PredictOptions, run_predict
from dist_seg.runtime import distributed as D

REPO = Path(__file__).resolve().parents[2]

ckpts, shards, images, coco, out, *overrides = sys.argv[1:]
checkpoints = ckpts.split(",")
options = json.loads(os.environ.get("INFERENCE", "{}"))
cfg = load_config(REPO / "configs/cpu_small.yaml", overrides)
world = D.init_distributed("cpu", timeout_s=120)
try:
    assert world.world_size == 2, world
    args = inference_defaults(checkpoint=checkpoints, **options)
    evaluate_checkpoint(cfg, checkpoints, world, Path(out) / "eval", shards, args)
    opts = PredictOptions(
        checkpoints, str(Path(out) / "pred"), images=images, coco=coco, quiet=True, **options
    )
    opts.submission = str(Path(out) / "sub.csv")
    result = run_predict(cfg, opts, world)
    assert result["problems"] == [], result["problems"]
finally:
    D.cleanup()
