"""Run under torchrun: `evaluate` then `predict` (with a CSV) in one process group, as the CLI would.

torchrun --nproc_per_node=2 tests/workers/predict_worker.py CKPT SHARDS IMAGES COCO OUT [key=value ...]
"""

import sys
from pathlib import Path

from dist_seg import distributed as D
from dist_seg.config_loading import load_config
from dist_seg.evaluate import evaluate_checkpoint
from dist_seg.predict import PredictOptions, run_predict

REPO = Path(__file__).resolve().parents[2]

ckpt, shards, images, coco, out, *overrides = sys.argv[1:]
cfg = load_config(REPO / "configs/cpu_small.yaml", overrides)
world = D.init_distributed("cpu", timeout_s=120)
try:
    assert world.world_size == 2, world
    evaluate_checkpoint(cfg, ckpt, world, Path(out) / "eval", shards)
    opts = PredictOptions(ckpt, str(Path(out) / "pred"), images=images, coco=coco, quiet=True)
    opts.submission = str(Path(out) / "sub.csv")
    result = run_predict(cfg, opts, world)
    assert result["problems"] == [], result["problems"]
finally:
    D.cleanup()
