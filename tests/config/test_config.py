"""Config: defaults -> YAML -> overrides; errors name the key; README documents every key."""

from __future__ import annotations

from pathlib import Path

import pytest
from launch_utils import REPO

from dist_seg.config.loading import load_config
from dist_seg.config.reference import reference_markdown
from dist_seg.config.schema import Config, save_config


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
        ("model.aux_loss=-0.5", "config key model.aux_loss=-0.5: must be a finite weight >= 0"),
        ("model.aux_loss=nan", "config key model.aux_loss=nan"),
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


def test_removed_key_is_refused_saying_why_in_yaml_and_override(tmp_path: Path) -> None:
    y = tmp_path / "old_run.yaml"
    y.write_text("loss:\n  name: ce\n  ignore_index: 255\n")
    with pytest.raises(
        ValueError, match=r"config key loss.ignore_index in .*old_run.yaml: the ignore value is fixed"
    ):
        load_config(y)
    with pytest.raises(ValueError, match=r"config key loss.ignore_index: .*delete it"):
        load_config(None, ["loss.ignore_index=0"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_readme_documents_every_key() -> None:
    readme = (REPO / "README.md").read_text()
    for row in reference_markdown().splitlines():
        if row.startswith("| `"):
            assert row in readme, (
                f"README config reference is stale: {row} (regenerate: python -m dist_seg.config.reference)"
            )


def _choices() -> dict[str, tuple[str, ...]]:
    from dist_seg.config.schema import CHOICES

    return CHOICES


@pytest.mark.parametrize("key", sorted(_choices()))
def test_every_enumerated_value_works_as_an_override(key: str) -> None:
    section, name = key.split(".")
    for value in _choices()[key]:
        cfg = load_config(REPO / "configs/cpu_small.yaml", [f"{key}={value}"])
        assert getattr(getattr(cfg, section), name) == value


def test_every_enumerated_value_through_the_train_command_line() -> None:
    """`python -m dist_seg.train --config ... key=value` exactly as users type it (the shell passes the text
    unquoted): `train.amp=off` must arrive as the string 'off', not YAML 1.1's False."""
    import subprocess
    import sys

    import yaml

    choices = _choices()
    for i in range(max(len(v) for v in choices.values())):
        overrides = [f"{k}={v[i % len(v)]}" for k, v in choices.items()]
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "dist_seg.train",
                "--config",
                "configs/cpu_small.yaml",
                *overrides,
                "--print-config",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        resolved = yaml.safe_load(r.stdout)
        for k, v in choices.items():
            section, name = k.split(".")
            assert resolved[section][name] == v[i % len(v)], (k, resolved[section][name])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.resume=null", None),
        ("train.resume=~", None),
        ("model.pretrained=null", None),
        ("train.resume='no'", "no"),
        ("data.train_shards=shards/a/shard-{000000..000002}.tar", "shards/a/shard-{000000..000002}.tar"),
        ("loss.class_weights=auto", "auto"),
    ],
)
def test_string_keys_take_the_text_as_typed(override: str, expected: str | None) -> None:
    key, _ = override.split("=", 1)
    section, name = key.split(".")
    assert getattr(getattr(load_config(None, [override]), section), name) == expected


@pytest.mark.parametrize(
    "override", ["train.amp=False", "train.amp=yes", "train.device=on", "data.on_error=no"]
)
def test_boolean_looking_text_for_an_enumerated_key_is_refused_naming_choices(override: str) -> None:
    with pytest.raises(ValueError, match=f"config key {override.split('=')[0]}=.*expected one of"):
        load_config(None, [override])


def test_unquoted_yaml_boolean_for_a_string_key_is_refused_saying_what_to_type(tmp_path: Path) -> None:
    y = tmp_path / "amp.yaml"
    y.write_text("train:\n  amp: off\n")
    with pytest.raises(
        ValueError, match=r'config key train.amp in .*amp.yaml: YAML reads .* boolean False.*amp: "off"'
    ):
        load_config(y)
    y.write_text('train:\n  amp: "off"\n  sync_bn: off\n')  # quoted string; a real boolean key stays boolean
    cfg = load_config(y)
    assert cfg.train.amp == "off" and cfg.train.sync_bn is False


def test_focal_with_label_smoothing_is_refused_naming_both_keys() -> None:
    with pytest.raises(ValueError, match="loss.name=focal and loss.label_smoothing=0.1"):
        load_config(None, ["loss.name=focal", "loss.label_smoothing=0.1"])
    assert load_config(None, ["loss.name=focal"]).loss.name == "focal"
