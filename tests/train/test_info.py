"""`dist-seg info`: the json agrees with the model built directly; num_classes from the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dist_seg.cli import main as cli_main
from dist_seg.config.loading import load_config
from dist_seg.models import build_model
from dist_seg.train.info import main
from dist_seg.train.optim import build_optimizer

CONFIG = """\
data:
  crop_size: 200
model:
  name: deconvnet
  width_mult: 0.0625
  num_classes: 11
optim:
  lr: 0.02
  groups:
    - {params: "encoder.*", lr_mult: 0.1}
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(CONFIG)
    return path


def test_json_agrees_with_the_model(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(config_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = load_config(config_file)
    model = build_model(cfg.model, 11).eval()
    assert info["model"] == "deconvnet" and info["num_classes"] == 11
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert info["input_size"] == [1, 3, 224, 224]  # crop 200 rounded up to DeconvNet's minimum
    with torch.no_grad(), FlopCounterMode(display=False) as counter:  # a real CPU forward, not the meta one
        model(torch.zeros(1, 3, 224, 224))
    assert info["flops"] == counter.get_total_flops()
    assert info["macs"] * 2 == info["flops"]
    _, groups = build_optimizer(model, cfg.optim)
    assert [(g["pattern"], g["params"], g["lr"], g["weight_decay"]) for g in info["groups"]] == [
        (g.pattern, g.params, g.lr, g.weight_decay) for g in groups
    ]
    assert info["groups"][0]["pattern"] == "encoder.*" and info["groups"][0]["lr"] == pytest.approx(0.002)


def test_text_output_through_the_cli_with_overrides(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["info", "--config", str(config_file), "model.name=fcn8s", "data.crop_size=64"]) == 0
    out = capsys.readouterr().out
    assert "model: fcn8s (width_mult 0.0625, 11 classes)" in out
    assert "1x3x64x64" in out and "GMAC" in out
    assert "encoder.*" in out and "default" in out


def test_num_classes_from_the_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    classes = [{"index": i, "name": f"c{i}", "coco_id": i} for i in range(7)]
    manifest = {"format": "dist_seg.shards", "format_version": 1, "num_classes": 7, "classes": classes}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    argv = [f"data.train_shards={shards}", "model.name=deeplab_v1", "model.width_mult=0.125", "--json"]
    assert main(argv + ["data.crop_size=64"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_classes"] == 7
    assert info["params"] == sum(
        p.numel() for p in build_model(load_config(None, argv[1:3]).model, 7).parameters()
    )


def test_no_num_classes_anywhere_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([f"data.train_shards={tmp_path / 'missing'}", "--json"]) == 2
    assert "set model.num_classes" in capsys.readouterr().err


def test_bad_group_pattern_is_reported(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(config_file), 'optim.groups=[{params: "encodr.*"}]']) == 2
    assert "'encodr.*' matches no parameter" in capsys.readouterr().err
