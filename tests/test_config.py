"""Config: defaults -> YAML -> overrides; errors name the key; README documents every key."""

from __future__ import annotations

from pathlib import Path

import pytest
from launch_utils import REPO

from dist_seg.config import Config, load_config, reference_markdown, save_config


def test_layers_and_overrides(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  epochs: 3\noptim:\n  groups:\n    - {params: 'encoder.*', lr_mult: 0.1}\n")
    cfg = load_config(y, ["train.epochs=5", "data.batch_size=2"])
    assert cfg.train.epochs == 5 and cfg.data.batch_size == 2 and cfg.optim.groups[0].lr_mult == 0.1
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "config key train.epoch"),
        ("model.nme=x", "config key model.nme"),
        ("data.batch_size=two", "config key data.batch_size"),
        ("train.amp=fp8", "config key train.amp='fp8'"),
        ("data.crop_size=0", "config key data.crop_size=0"),
        ("optim.groups=[{param: 'x'}]", "config key optim.groups"),
        ("epochs", "must look like key=value"),
    ],
)
def test_errors_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [override])


def test_unknown_key_in_yaml_names_key_and_file(tmp_path: Path) -> None:
    y = tmp_path / "bad.yaml"
    y.write_text("train:\n  max_step: 3\n")
    with pytest.raises(ValueError, match=r"config key train.max_step in .*bad.yaml"):
        load_config(y)
    with pytest.raises(ValueError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_readme_documents_every_key() -> None:
    readme = (REPO / "README.md").read_text()
    for row in reference_markdown().splitlines():
        if row.startswith("| `"):
            assert row in readme, (
                f"README config reference is stale: {row} (regenerate: python -m dist_seg.config)"
            )
