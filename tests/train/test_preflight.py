"""Pre-flight: each name and path of a training config is refused before any process group starts, as one
`KEY=VALUE: what is wrong` line per node and exit code 2 (the multi-process run: tests/e2e/test_user_errors.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dist_seg.config.loading import load_config
from dist_seg.train import command
from dist_seg.train.preflight import PreflightError, find_problems

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/cpu_small.yaml")


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """A local shard directory the resolver accepts: a manifest listing one (empty) shard, 3 classes."""
    d = tmp_path / "shards"
    d.mkdir()
    (d / "shard-000000.tar").write_bytes(b"")
    classes = [{"index": i, "name": f"c{i}", "coco_id": i} for i in range(3)]
    stats = [
        {"index": i, "pixels": 10 * (i + 1), "images": 1, "image_pixels": 100, "instances": 1}
        for i in range(3)
    ]
    manifest = {
        "format": "dist_seg.shards",
        "format_version": 2,
        "num_classes": 3,
        "classes": classes,
        "has_labels": True,
        "class_stats": stats,
        "shards": [{"name": "shard-000000.tar", "samples": 1, "bytes": 0}],
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def problems(*overrides: str) -> list[str]:
    return [str(p) for p in find_problems(load_config(CONFIG, list(overrides)))]


def test_a_config_whose_paths_exist_passes(shards: Path, tmp_path: Path) -> None:
    weights, ckpt = tmp_path / "w.json", tmp_path / "last.pt"
    weights.write_text("[1, 2, 0.5]")
    ckpt.write_bytes(b"")
    pretrained = tmp_path / "vgg.pth"
    pretrained.write_bytes(b"")
    assert problems(
        f"data.train_shards={shards}", f"data.val_shards={shards}", f"model.pretrained={pretrained}",
        f"loss.class_weights={weights}", f"train.resume={ckpt}", "model.num_classes=3",
    ) == []  # fmt: skip
    assert (
        problems(f"data.train_shards={shards}", "loss.class_weights=auto", "model.pretrained=torchvision")
        == []
    )


def test_model_name_names_the_registered_models(shards: Path) -> None:
    assert problems(f"data.train_shards={shards}", "model.name=nosuch") == [
        "model.name=nosuch: not a registered model; expected one of deconvnet, deeplab_v1, fcn8s, "
        "deeplabv3_resnet50, fcn_resnet50, lraspp_mobilenet_v3_large"
    ]


def test_train_shards(tmp_path: Path) -> None:
    assert problems("data.train_shards=/nonexistent/shards") == [
        "data.train_shards=/nonexistent/shards: shard directory /nonexistent/shards does not exist"
    ]
    assert problems() == [
        "data.train_shards=null: required for training: a shard directory made by `dist-seg convert`"
    ]
    assert problems(f"data.train_shards={tmp_path}") == [
        f"data.train_shards={tmp_path}: no manifest.json in {tmp_path} (convert the dataset with `dist-seg convert` first)"
    ]


def test_val_shards(shards: Path) -> None:
    missing = shards.parent / "val"
    assert problems(f"data.train_shards={shards}", f"data.val_shards={missing}") == [
        f"data.val_shards={missing}: shard directory {missing} does not exist"
    ]


def test_shards_at_urls_are_left_to_the_resolver_in_fit(shards: Path) -> None:
    """No network here: every rank would read every manifest and stat every shard twice."""
    assert (
        problems("data.train_shards=https://example.invalid/shards", "data.val_shards=s3://b/v-{0,1}.tar")
        == []
    )
    assert problems(f"data.train_shards={shards},https://example.invalid/more") == []


def test_a_listed_shard_that_is_missing(shards: Path) -> None:
    (shards / "shard-000000.tar").unlink()
    [line] = problems(f"data.train_shards={shards}")
    assert (
        line.startswith(f"data.train_shards={shards}: shard ")
        and "listed in its manifest but does not exist" in line
    )


def test_num_classes_against_the_shards(shards: Path) -> None:
    assert problems(f"data.train_shards={shards}", "model.num_classes=5") == [
        f"model.num_classes=5: the shards {shards} have 3 classes"
    ]


def test_pretrained_file(shards: Path) -> None:
    assert problems(f"data.train_shards={shards}", "model.pretrained=/nonexistent/vgg16_bn.pth") == [
        "model.pretrained=/nonexistent/vgg16_bn.pth: file not found (give a weights file, `torchvision` to "
        "download, or null)"
    ]


def test_class_weights(shards: Path, tmp_path: Path) -> None:
    base = f"data.train_shards={shards}"
    assert problems(base, "loss.class_weights=/nonexistent/w.json") == [
        "loss.class_weights=/nonexistent/w.json: file not found (give a json file, `auto`, or null)"
    ]
    short = tmp_path / "short.json"
    short.write_text("[1.0, 2.0]")
    assert problems(base, f"loss.class_weights={short}") == [
        f"loss.class_weights={short}: {short} has 2 weights, expected 3"
    ]
    summary = tmp_path / "summary.json"
    summary.write_text('{"classes": 3}')
    assert problems(base, f"loss.class_weights={summary}") == [
        f"loss.class_weights={summary}: {summary} is an object without 'suggested_class_weights'"
    ]
    manifest = json.loads((shards / "manifest.json").read_text())
    del manifest["class_stats"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    [line] = problems(base, "loss.class_weights=auto")
    assert line.startswith("loss.class_weights=auto: needs the 'class_stats' of the training manifest")


def test_resume_path(shards: Path) -> None:
    assert problems(f"data.train_shards={shards}", "train.resume=/nonexistent/last.pt") == [
        "train.resume=/nonexistent/last.pt: checkpoint file not found (give a checkpoint file, `auto` for "
        "train.out_dir/last.pt, or null)"
    ]
    assert problems(f"data.train_shards={shards}", "train.resume=null") == []


def test_augment_pipeline(shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data.augment: the module, the factory and its result checked here; albumentations missing names the
    extra (dist_seg.data.loading.augment has the detail)."""
    (tmp_path / "user_aug.py").write_text(
        "def broken():\n    raise RuntimeError('no')\n\ndef albu():\n    import albumentations\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recipes = "dist_seg.data.loading.augment_recipes"
    assert problems(f"data.train_shards={shards}", f"data.augment={recipes}:torchvision_rotate") == []
    assert problems(f"data.train_shards={shards}", "data.augment=no_such_module:build") == [
        "data.augment=no_such_module:build: no module named no_such_module (is its directory on PYTHONPATH?)"
    ]
    assert problems(f"data.train_shards={shards}", f"data.augment={recipes}:nosuch") == [
        f"data.augment={recipes}:nosuch: module {recipes} has no attribute nosuch"
    ]
    assert problems(f"data.train_shards={shards}", "data.augment=user_aug:broken") == [
        "data.augment=user_aug:broken: broken() raised RuntimeError: no"
    ]
    monkeypatch.setitem(sys.modules, "albumentations", None)  # as if not installed
    for factory in ("user_aug:albu", f"{recipes}:albumentations_common"):
        assert problems(f"data.train_shards={shards}", f"data.augment={factory}") == [
            f"data.augment={factory}: needs albumentations (albumentations is not installed), an optional "
            "extra: pip install -e .[albumentations]"
        ]


def test_values_are_shown_as_typed_with_urls_redacted() -> None:
    assert str(PreflightError("k", None, "x")) == "k=null: x"
    assert str(PreflightError("k", "https://u:secret@h/p?sig=abc", "x")) == "k=https://h/p?sig=REDACTED: x"


def test_every_problem_is_reported_in_key_order(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_rendezvous(*args: object) -> None:
        raise AssertionError("init_distributed called after a user error")

    monkeypatch.setattr(command.D, "init_distributed", no_rendezvous)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = [
        "--config",
        CONFIG,
        "model.name=nosuch",
        "data.train_shards=/nonexistent/s",
        "train.resume=/nonexistent/c",
    ]
    assert command.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert [line.split("=")[0] for line in lines] == [
        "dist_seg.train: error: model.name",
        "dist_seg.train: error: data.train_shards",
        "dist_seg.train: error: train.resume",
    ]


def test_only_local_rank_0_prints(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun starts every local rank with the same arguments: one line per node, not per rank."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert command.main(["--config", CONFIG, "model.name=nosuch"]) == 2
    assert command.main(["--config", CONFIG, "no.such.key=1"]) == 2  # config errors too
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert command.main(["--config", CONFIG, "no.such.key=1"]) == 2
    assert capsys.readouterr().err.count("dist_seg.train: error:") == 1
