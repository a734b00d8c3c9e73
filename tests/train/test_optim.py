"""Parameter groups (coverage, errors, no-decay copies, frozen parameters, the users' bug) and LR schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dist_seg.config.schema import ModelConfig, OptimConfig, OptimGroup, SchedConfig
from dist_seg.models import build_model
from dist_seg.train.optim import build_optimizer, build_scheduler, format_groups, lr_factor


def small_deconvnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name="deconvnet", width_mult=0.03125), num_classes=3)


def groups_by_name(opt: torch.optim.Optimizer) -> dict[str, dict]:
    return {g["name"]: g for g in opt.param_groups}


def test_users_bug_decoder_left_out_of_groups_still_trains_at_base_lr() -> None:
    """The users listed only the encoder; their decoder silently never trained. Now it lands in `default`."""
    model = small_deconvnet()
    cfg = OptimConfig(name="sgd", lr=0.01, groups=[OptimGroup(params="encoder.*", lr_mult=0.1)])
    opt, infos = build_optimizer(model, cfg)
    groups = groups_by_name(opt)
    decoder_ids = {id(p) for p in model.decoder.parameters()}
    default_ids = {id(p) for g in ("default", "default/no_decay") for p in groups[g]["params"]}
    assert decoder_ids <= default_ids
    assert groups["default"]["lr"] == pytest.approx(0.01) and groups["encoder.*"]["lr"] == pytest.approx(
        0.001
    )
    assert "decoder" in next(i for i in infos if i.pattern == "default").modules

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(2, 3, 224, 224), torch.randint(0, 3, (2, 224, 224))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    conv_weights = [n for n, p in model.named_parameters() if p.ndim == 4]
    assert set(conv_weights) <= changed  # every conv/deconv of encoder, fc, decoder and classifier moved
    assert any(n.startswith("decoder.") for n in conv_weights)


def test_every_trainable_parameter_in_exactly_one_group() -> None:
    model = small_deconvnet()
    cfg = OptimConfig(
        groups=[
            OptimGroup(params="encoder.*", lr_mult=0.1),
            OptimGroup(params="decoder.*", weight_decay=1e-3),
        ]
    )
    opt, infos = build_optimizer(model, cfg)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    assert sum(i.params for i in infos) == sum(p.numel() for p in model.parameters())
    assert [i.pattern for i in infos] == [g["name"] for g in opt.param_groups]
    by_name = groups_by_name(opt)
    assert (
        by_name["decoder.*"]["weight_decay"] == 1e-3 and by_name["decoder.*/no_decay"]["weight_decay"] == 0.0
    )
    assert by_name["encoder.*"]["lr_mult"] == 0.1 and by_name["default"]["lr_mult"] == 1.0


def test_no_decay_copies_hold_norm_weights_and_biases() -> None:
    model = small_deconvnet()
    opt, _ = build_optimizer(model, OptimConfig(weight_decay=5e-4, groups=[OptimGroup(params="encoder.*")]))
    names = {id(p): n for n, p in model.named_parameters()}
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    for group in opt.param_groups:
        for p in group["params"]:
            wd_free = names[id(p)].endswith(".bias") or id(p) in norm_weights
            assert group["name"].endswith("/no_decay") == wd_free, names[id(p)]
            assert (group["weight_decay"] == 0.0) == wd_free
    opt2, _ = build_optimizer(model, OptimConfig(no_decay_norm_and_bias=False))
    assert [g["name"] for g in opt2.param_groups] == ["default"]


def test_pattern_matching_nothing_is_an_error_naming_it() -> None:
    model = small_deconvnet()
    with pytest.raises(ValueError, match=r"optim.groups\[1\].params='encodr.\*' matches no parameter"):
        build_optimizer(
            model, OptimConfig(groups=[OptimGroup(params="decoder.*"), OptimGroup(params="encodr.*")])
        )


def test_pattern_shadowed_by_an_earlier_one_is_an_error() -> None:
    model = small_deconvnet()
    with pytest.raises(ValueError, match=r"optim.groups\[1\].params='encoder.features.0.\*'.*earlier group"):
        build_optimizer(
            model,
            OptimConfig(groups=[OptimGroup(params="encoder.*"), OptimGroup(params="encoder.features.0.*")]),
        )


def test_frozen_parameters_are_reported_not_grouped() -> None:
    model = small_deconvnet()
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    opt, infos = build_optimizer(model, OptimConfig(groups=[OptimGroup(params="encoder.*", lr_mult=0.1)]))
    frozen = [i for i in infos if i.frozen]
    assert len(frozen) == 1 and frozen[0].params == sum(p.numel() for p in model.encoder.parameters())
    assert frozen[0].modules == ["encoder"]
    grouped = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not grouped & {id(p) for p in model.encoder.parameters()}
    assert "frozen" in format_groups(infos)


def test_ddp_prefix_is_ignored_when_matching() -> None:
    class Wrapper(nn.Module):  # DDP exposes the model as `.module`, so names start with "module."
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    opt, infos = build_optimizer(
        Wrapper(small_deconvnet()), OptimConfig(groups=[OptimGroup(params="encoder.*")])
    )
    assert infos[0].pattern == "encoder.*" and infos[0].modules == ["encoder"]


@pytest.mark.parametrize("name", ["sgd", "adamw", "adam"])
def test_optimizer_kinds(name: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    opt, _ = build_optimizer(model, OptimConfig(name=name, lr=0.1))
    expected = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[name]
    assert type(opt) is expected


def test_format_groups_lists_patterns_lrs_and_modules() -> None:
    model = small_deconvnet()
    _, infos = build_optimizer(
        model, OptimConfig(lr=0.02, groups=[OptimGroup(params="encoder.*", lr_mult=0.1)])
    )
    table = format_groups(infos)
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["group", "tensors", "params", "lr", "weight_decay"]
    default_row = next(line for line in lines if line.startswith("default "))
    assert "0.02" in default_row and "decoder" in default_row
    assert next(line for line in lines if line.startswith("encoder.* ")).split()[3] == "0.002"
    assert f"{sum(p.numel() for p in model.parameters()):,}" in lines[-1]


# ---- schedules ----


def _opt(lr: float = 0.1, mult: float = 0.5) -> torch.optim.Optimizer:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    groups = [{"params": [a], "lr": lr, "name": "default", "lr_mult": 1.0}]
    groups.append({"params": [b], "lr": lr * mult, "name": "enc", "lr_mult": mult})
    return torch.optim.SGD(groups, lr=lr)


def _run(
    opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, steps: int
) -> list[list[float]]:
    lrs = []
    for _ in range(steps):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (SchedConfig(name="poly", power=0.9), lambda s, t: (1 - s / t) ** 0.9),
        (SchedConfig(name="poly", power=1.0, min_lr_ratio=0.1), lambda s, t: 0.1 + 0.9 * (1 - s / t)),
        (SchedConfig(name="cosine"), lambda s, t: 0.5 * (1 + math.cos(math.pi * s / t))),
        (SchedConfig(name="step", step_size=3, gamma=0.5), lambda s, t: 0.5 ** (s // 3)),
        (SchedConfig(name="constant"), lambda s, t: 1.0),
    ],
)
def test_schedule_shapes_apply_to_every_group(cfg: SchedConfig, expected) -> None:
    opt = _opt(lr=0.1, mult=0.5)
    lrs = _run(opt, build_scheduler(opt, cfg, total_steps=10), 10)
    for s, (lr_default, lr_enc) in enumerate(lrs):
        assert lr_default == pytest.approx(0.1 * expected(s, 10))
        assert lr_enc == pytest.approx(0.1 * 0.5 * expected(s, 10))


def test_warmup_is_linear_then_hands_over_continuously() -> None:
    cfg = SchedConfig(name="poly", power=1.0, warmup_steps=4, warmup_factor=0.1)
    opt = _opt(lr=1.0, mult=1.0)
    lrs = [g[0] for g in _run(opt, build_scheduler(opt, cfg, total_steps=20), 8)]
    for s in range(8):
        warm = 0.1 + 0.9 * s / 4 if s < 4 else 1.0
        assert lrs[s] == pytest.approx(warm * (1 - s / 20))
    assert lr_factor(25, cfg, 20) == 0.0  # past the end the poly schedule stays at its floor


def test_scheduler_state_round_trips_for_resume() -> None:
    cfg = SchedConfig(name="cosine", warmup_steps=3)
    opt = _opt()
    sched = build_scheduler(opt, cfg, total_steps=12)
    _run(opt, sched, 5)
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()

    opt2 = _opt()
    sched2 = build_scheduler(opt2, cfg, total_steps=12)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert sched2.last_epoch == 5
    assert _run(opt2, sched2, 7) == _run(opt, sched, 7)


def test_scheduler_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="sched.name='linear'"):
        build_scheduler(_opt(), SchedConfig(name="linear"), total_steps=10)
    with pytest.raises(ValueError, match="total optimizer steps"):
        build_scheduler(_opt(), SchedConfig(), total_steps=0)
    with pytest.raises(ValueError, match="sched.warmup_factor"):
        build_scheduler(_opt(), SchedConfig(warmup_steps=2, warmup_factor=0.0), total_steps=10)


def test_group_coverage_check_is_a_real_error_even_under_python_O() -> None:
    """`python -O` strips asserts: the coverage check must survive it and name the parameter left out."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from dist_seg.train.optim import _check_coverage\n"
        "m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))\n"
        "named = list(m.named_parameters())\n"
        "try:\n"
        "    _check_coverage(named, [{'params': [m[0].weight, m[0].bias, m[1].bias]}])\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    r = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "missing ['1.weight']" in r.stdout, r.stdout
