"""Weight EMA (train.ema_decay): the average against a float64 hand computation, BatchNorm buffers copied, the
warm-up, its checkpoint round trip; through fit(): both weights evaluated and labelled, best.pt and
metrics.json following the EMA, a resume from a checkpoint without one; evaluate/predict --weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch_utils import REPO
from numerics import ema_lerp_error_bound
from torch import nn

from dist_seg.checkpoint import load_checkpoint
from dist_seg.config.loading import load_config
from dist_seg.infer.evaluate import main as evaluate_main
from dist_seg.runtime.distributed import World
from dist_seg.train.ema import WeightEMA
from dist_seg.train.loop import fit
from dist_seg.train.tensorboard import read_scalars


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))


def test_ema_matches_a_float64_reference_on_large_weights_with_tiny_steps() -> None:
    """float32 weights near 1000 moving by ~1e-3 a step: the lerp must not lose the steps to cancellation."""
    net = _net()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1000.0)
    ema = WeightEMA(net, decay=0.99)
    ref = {n: p.detach().double().clone() for n, p in net.named_parameters()}
    bound = {n: torch.zeros_like(r) for n, r in ref.items()}
    gen = torch.Generator().manual_seed(1)
    for n_updates in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
        net[1].running_mean.add_(0.5)  # what a training forward does to the buffers
        d = min(0.99, (1 + n_updates) / (10 + n_updates))
        assert ema.current_decay() == d  # the same Python float expression
        ema.update(net)
        for n, p in net.named_parameters():
            bound[n] = ema_lerp_error_bound(bound[n], ref[n], p.detach().double(), 1 - d)
            ref[n] += (1 - d) * (p.detach().double() - ref[n])
    got = dict(ema.module.named_parameters())
    weights = dict(net.named_parameters())
    for n, r in ref.items():
        # per element, within the rounding the float32 lerp can accumulate over the 30 updates (numerics.py:
        # each update rounds the result, u|ema| = 6e-5 at 1000, and scales the carried error by its decay).
        # The steps are ~1e-3: an update that lost them to cancellation, or averaged the wrong way, is off
        # by more. Measured: 0.30 of the bound at most (the bound reaches 2.4e-4, above the old atol 2e-4).
        err = (got[n].double() - r).abs()
        assert (err <= bound[n]).all(), (n, float((err / bound[n]).max()))
        # ... and it is an average, not the weights: somewhere it differs from them beyond that rounding
        assert ((got[n].double() - weights[n].double()).abs() > bound[n]).any(), n
    # buffers are copies of the model's, never averages
    assert torch.equal(ema.module[1].running_mean, net[1].running_mean)
    assert torch.equal(ema.module[1].num_batches_tracked, net[1].num_batches_tracked)
    assert ema.updates == 30 and not any(p.requires_grad for p in ema.module.parameters())


def test_ema_state_round_trip_continues_the_warm_up() -> None:
    net = _net()
    a = WeightEMA(net, 0.9)
    for _ in range(3):
        with torch.no_grad():
            net[0].weight.add_(1.0)
        a.update(net)
    b = WeightEMA(_net(), 0.9)
    b.load_state_dict(a.state_dict())
    assert b.updates == 3 and b.current_decay() == a.current_decay()
    for (k, va), vb in zip(a.module.state_dict().items(), b.module.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    b.reset_to(net)
    assert b.updates == 0 and torch.equal(b.module[0].weight, net[0].weight)
    with pytest.raises(ValueError, match=r"train.ema_decay=1.0: must be in \(0, 1\)"):
        WeightEMA(net, 1.0)


def _overrides(tiny_shards: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        f"data.train_shards={tiny_shards['train4']}",
        f"data.val_shards={tiny_shards['eval1']}",
        f"train.out_dir={out}",
        "model.name=fcn8s",
        "data.crop_size=32",
        "train.eval_every=2",
        "train.log_every=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def ema_run(tiny_shards, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-step run without EMA, resumed to 6 steps with train.ema_decay=0.5 (the EMA starts at the
    resumed weights)."""
    out = tmp_path_factory.mktemp("ema") / "run"
    world = World(0, 0, 1, torch.device("cpu"), None)
    cfg_path = REPO / "configs/cpu_small.yaml"
    fit(load_config(cfg_path, _overrides(tiny_shards, out, "train.max_steps=2")), world)
    plain = load_checkpoint(out / "last.pt")
    assert "ema" not in plain
    overrides = _overrides(tiny_shards, out, "train.max_steps=6", "train.ema_decay=0.5")
    metrics = fit(load_config(cfg_path, overrides), world)
    return {"out": out, "metrics": metrics, "overrides": overrides}


def test_fit_evaluates_both_weights_and_follows_the_ema(ema_run: dict, capsys) -> None:
    out = ema_run["out"]
    history = [json.loads(line) for line in (out / "metrics_history.jsonl").read_text().splitlines()]
    assert [(h["step"], h["weights"]) for h in history if h["step"] > 2] == [
        (4, "model"), (4, "ema"), (6, "model"), (6, "ema")
    ]  # fmt: skip
    assert ema_run["metrics"]["weights"] == "ema"
    assert ema_run["metrics"]["miou"] == history[-1]["miou"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["weights"] == "ema" and saved["step"] == 6
    scalars = read_scalars(out / "tb")
    assert [s for s, _ in scalars["val_ema/miou"]] == [4, 6] and 6 in dict(scalars["val/miou"])
    ck = load_checkpoint(out / "last.pt")
    assert ck["ema"]["updates"] == 4 and ck["ema"]["decay"] == 0.5  # started at the step-2 weights
    ema_mious = {h["step"]: h["miou"] for h in history if h["weights"] == "ema"}
    best_step = load_checkpoint(out / "best.pt")["train_state"]["step"]
    assert ema_mious[best_step] == max(ema_mious.values())


def test_a_resume_without_an_ema_says_it_starts_one(tiny_shards, tmp_path: Path, capsys) -> None:
    world = World(0, 0, 1, torch.device("cpu"), None)
    cfg_path = REPO / "configs/cpu_small.yaml"
    out = tmp_path / "run"
    fit(
        load_config(cfg_path, _overrides(tiny_shards, out, "train.max_steps=1", "data.val_shards=null")),
        world,
    )
    capsys.readouterr()
    more = _overrides(tiny_shards, out, "train.max_steps=2", "data.val_shards=null", "train.ema_decay=0.9")
    fit(load_config(cfg_path, more), world)
    assert "holds no weight EMA: train.ema_decay=0.9 starts one from its weights" in capsys.readouterr().out


def test_evaluate_uses_the_ema_by_default_and_the_model_on_request(ema_run: dict, tmp_path: Path) -> None:
    """The CLI as users type it; its numbers equal the trainer's evaluation of the same weights."""
    out = ema_run["out"]
    history = [json.loads(line) for line in (out / "metrics_history.jsonl").read_text().splitlines()]
    trained = {h["weights"]: h["miou"] for h in history if h["step"] == 6}
    base = ["--config", str(REPO / "configs/cpu_small.yaml"), "--checkpoint", str(out / "last.pt")]
    for weights, expect in (("auto", "ema"), ("ema", "ema"), ("model", "model")):
        dest = tmp_path / weights
        assert evaluate_main([*base, "--weights", weights, "--out", str(dest), *ema_run["overrides"]]) == 0
        got = json.loads((dest / "metrics.json").read_text())
        assert got["weights"] == expect and got["miou"] == trained[expect], (weights, got["miou"], trained)


def test_weights_ema_on_a_checkpoint_without_one_names_the_file(tiny_shards, tmp_path: Path, capsys) -> None:
    world = World(0, 0, 1, torch.device("cpu"), None)
    out = tmp_path / "run"
    overrides = _overrides(tiny_shards, out, "train.max_steps=1")
    fit(load_config(REPO / "configs/cpu_small.yaml", overrides), world)
    args = ["--config", str(REPO / "configs/cpu_small.yaml"), "--checkpoint", str(out / "last.pt")]
    assert evaluate_main([*args, "--weights", "ema", *overrides]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {out / 'last.pt'} holds no weight EMA" in err
