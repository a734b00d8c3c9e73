"""The loop's decisions (state.StepSchedule) and step bookkeeping (state.TrainState) without a training run;
step.train_step's handling of non-finite steps against native GradScaler; compute_confusion's independence of
the batching; early stopping through fit()."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import shared_dataset

from dist_seg.config.schema import (
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    SchedConfig,
)
from dist_seg.data.loading.eval_loader import build_eval_loader
from dist_seg.data.prep.convert import ConvertOptions, convert
from dist_seg.infer.scoring import compute_confusion
from dist_seg.models import build_model, input_constraints
from dist_seg.train.losses import build_loss
from dist_seg.train.optim import build_optimizer, build_scheduler
from dist_seg.train.state import StepSchedule, TrainState
from dist_seg.train.step import StepContext, StepOutput, parameter_blocks, train_step


def _out(nonfinite_loss: bool = False) -> StepOutput:
    return StepOutput(torch.tensor(1.0), torch.tensor(1.0), nonfinite_loss, 1.0, nonfinite_loss)


def test_epoch_end_evaluation_and_saving_by_default() -> None:
    plan = StepSchedule(
        steps_per_epoch=3, total_steps=7, grad_accum=2, log_every=5, eval_every=None, save_every=None
    )
    state = TrainState()
    evaluated, saved, logged = [], [], []
    while state.step < plan.total_steps:
        state.record_step(_out(), max_nonfinite=3)
        logged += [state.step] if plan.should_log(state.step) else []
        epoch_done = plan.epoch_done(state)
        if epoch_done:
            state.next_epoch()
        ev = plan.should_evaluate(state.step, epoch_done)
        evaluated += [state.step] if ev else []
        saved += [state.step] if plan.should_save(state.step, epoch_done, ev) else []
    assert evaluated == saved == [3, 6, 7]  # each epoch end and the last step
    assert logged == [5, 7] and state.epoch == 2 and state.epoch_step == 1
    # the loader resumes at loader batch (epoch_step - segment_start) x grad_accum
    assert state.data_position(plan.grad_accum).start_batch == 2 and state.data_position(2).epoch == 2


def test_step_counted_evaluation_and_saving() -> None:
    plan = StepSchedule(
        steps_per_epoch=100, total_steps=10, grad_accum=1, log_every=1, eval_every=4, save_every=3
    )
    assert [s for s in range(1, 11) if plan.should_evaluate(s, False)] == [4, 8, 10]
    assert [s for s in range(1, 11) if plan.should_save(s, False, plan.should_evaluate(s, False))] == [
        3,
        4,
        6,
        8,
        9,
        10,
    ]


def test_nonfinite_streak_stops_only_when_consecutive() -> None:
    state = TrainState()
    for bad in (True, True, False, True, True):
        state.record_step(_out(bad), max_nonfinite=3)
    assert state.nonfinite_streak == 2
    with pytest.raises(RuntimeError, match="3 consecutive"):
        state.record_step(_out(True), max_nonfinite=3)


# ---------------------------------------------------------------- train_step: non-finite steps
def _tiny_ctx(amp: str) -> StepContext:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="fcn8s", width_mult=0.0625), 3)
    opt, _ = build_optimizer(model, OptimConfig(name="sgd", lr=0.1))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[amp]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if amp == "fp16" else None
    return StepContext(
        model,
        opt,
        build_scheduler(opt, SchedConfig(name="constant"), 10),
        scaler,
        build_loss(LossConfig(), 3),
        torch.device("cpu"),
        dtype,
        None,
        3,
        [p for p in model.parameters()],
    )


@pytest.mark.parametrize("amp", ["fp16", "bf16", "off"])
def test_nonfinite_loss_skips_the_step(amp: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = _tiny_ctx(amp)
    batch = [(torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64)))]
    train_step(ctx, batch, 1)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items() if v.is_floating_point()}
    scale = ctx.scaler.get_scale() if ctx.scaler else None
    monkeypatch.setenv("DIST_SEG_FAULT_NAN_AT_STEP", "2")
    out = train_step(ctx, batch, 2)
    assert out.skipped
    after = ctx.model.state_dict()
    # BN running statistics see the batch in forward; every trained weight must be unchanged
    for k, v in before.items():
        if "running" not in k:
            assert torch.equal(after[k], v), k
    if ctx.scaler is not None:
        assert ctx.scaler.get_scale() == scale * 0.5
    assert not train_step(ctx, batch, 3).skipped  # and training goes on


def test_skipped_fp16_step_moves_the_scale_like_native_gradscaler(monkeypatch: pytest.MonkeyPatch) -> None:
    """good / inf / good with growth_interval=2: native GradScaler gives 1024, 512, 512 (an inf restarts the
    growth count); train_step's cross-rank skip must do the same, not climb back to 1024 at once."""
    batch = [(torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64)))]
    ctx = _tiny_ctx("fp16")
    ctx.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    step_scales = []
    for step in (1, 2, 3):
        if step == 2:
            monkeypatch.setenv("DIST_SEG_FAULT_NAN_AT_STEP", "2")
        step_scales.append(train_step(ctx, batch, step).loss_scale)
        monkeypatch.delenv("DIST_SEG_FAULT_NAN_AT_STEP", raising=False)

    native = _tiny_ctx("off")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    native_scales = []
    for step in (1, 2, 3):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = native.loss_fn(native.model(batch[0][0]), batch[0][1])
        scaler.scale(loss).backward()
        if step == 2:
            next(native.model.parameters()).grad.fill_(float("inf"))
        scaler.step(native.optimizer)
        scaler.update()
        native.optimizer.zero_grad(set_to_none=True)
        native_scales.append(scaler.get_scale())
    assert native_scales == [1024.0, 512.0, 512.0]
    assert step_scales == native_scales


def test_block_gradient_norms_are_each_blocks_norm_before_clipping() -> None:
    """train/grad_norm/<block>: per top-level block of the model, the norm of its gradients as the backward
    left them (before clipping), against float64 norms of the same float32 gradients; their root-sum-square
    is the global norm. Tolerance: float32 sums of n squares in any order are within n*u relative (Higham's
    gamma_n, u = 2^-24), the square root halves that; n is the block's element count. A norm taken after
    clipping (here to 1e-3, every block's norm is above 1e-2), of the wrong parameters or squared misses by
    far more. A frozen block has no entry."""
    ctx = _tiny_ctx("off")
    ctx.clip_grad = 1e-3
    model = ctx.model
    for p in model.fc7.parameters():
        p.requires_grad_(False)
    ctx.params = [p for p in model.parameters() if p.requires_grad]
    ctx.blocks = parameter_blocks(model)  # inside DDP: tests/e2e/test_train.py's tags
    seen: dict[int, torch.Tensor] = {}  # the gradients as the backward leaves them, before any clipping
    for p in ctx.params:
        p.register_post_accumulate_grad_hook(lambda p: seen.__setitem__(id(p), p.grad.detach().clone()))
    batch = [(torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64)))]

    out = train_step(ctx, batch, 1)

    names = [name for name, _ in ctx.blocks]
    assert names == ["encoder", "fc6", "classifier", "decoder"]  # model order, fc7 frozen
    got = out.block_grad_norms.tolist()
    u = 2.0**-24
    sizes = []
    for (name, params), g in zip(ctx.blocks, got, strict=True):
        assert {id(p) for p in params} == {
            id(p) for n, p in model.named_parameters() if n.startswith(name + ".")
        }
        grads = [seen[id(p)].double() for p in params]
        want = float(sum((x * x).sum() for x in grads).sqrt())
        n = sum(x.numel() for x in grads)
        sizes.append(n)
        assert want > 1e-2, (name, want)  # so clipping to 1e-3 scaled this block down
        assert abs(g - want) <= (n * u / 2 + u) * want, (name, g, want)
    total = float(out.grad_norm)
    assert abs(math.sqrt(sum(g * g for g in got)) - total) <= (sum(sizes) * u + 2 * u) * total


# ---------------------------------------------------------------- compute_confusion
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


def test_early_stop_counts_evaluations_without_a_new_best() -> None:
    state = TrainState()
    results = [state.record_eval(m) for m in (0.2, 0.3, 0.3, 0.25)]  # a tie is not an improvement
    assert results == [True, True, False, False]
    assert state.best_miou == 0.3 and state.evals_since_best == 2
    assert state.patience_spent(2) and not state.patience_spent(3) and not state.patience_spent(None)
    assert state.record_eval(0.31) and state.evals_since_best == 0


def test_training_stops_early_with_a_checkpoint_and_a_resume_does_not_train_on(
    tiny_shards, tmp_path: Path
) -> None:
    """Through fit(): evaluations every step at a zero learning rate plateau, so after the best evaluation
    two more end the run well before max_steps, with last.pt at that step; running the command again resumes
    from it and trains no further."""
    from launch_utils import REPO

    from dist_seg.checkpoint import load_checkpoint
    from dist_seg.config.loading import load_config
    from dist_seg.runtime.distributed import World
    from dist_seg.train.loop import fit

    out = tmp_path / "run"
    overrides = [
        f"data.train_shards={tiny_shards['train4']}",
        f"data.val_shards={tiny_shards['eval1']}",
        f"train.out_dir={out}",
        "model.name=fcn8s",
        "data.crop_size=32",
        "optim.lr=0",
        "train.max_steps=40",
        "train.eval_every=1",
        "train.log_every=1",
        "train.early_stop_patience=2",
    ]
    world = World(0, 0, 1, torch.device("cpu"), None)
    fit(load_config(REPO / "configs/cpu_small.yaml", overrides), world)
    history = [json.loads(line) for line in (out / "metrics_history.jsonl").read_text().splitlines()]
    mious = [h["miou"] for h in history]
    best_at = max(range(len(mious)), key=lambda i: (mious[i], -i))  # the first evaluation reaching the best
    assert len(mious) == best_at + 3 < 40, mious  # the best, then exactly two that did not beat it
    stopped = history[-1]["step"]
    assert load_checkpoint(out / "last.pt")["train_state"]["step"] == stopped
    fit(load_config(REPO / "configs/cpu_small.yaml", overrides), world)
    assert load_checkpoint(out / "last.pt")["train_state"]["step"] == stopped


def test_early_stop_without_validation_shards_is_a_config_error() -> None:
    from dist_seg.config.schema import Config, TrainConfig
    from dist_seg.config.validation import validate

    with pytest.raises(ValueError, match=r"train.early_stop_patience=3 needs data.val_shards"):
        validate(Config(train=TrainConfig(early_stop_patience=3)))


def test_a_stop_signal_during_an_evaluation_checkpoints_its_step_and_reports_nothing_of_it(
    tiny_shards, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through fit(): SIGUSR1 arrives while step 2's evaluation runs. The evaluation is abandoned (step 1's
    is the only one reported), every rank checkpoints step 2, and Preempted names the signal."""
    import os
    import signal

    from launch_utils import REPO

    from dist_seg.checkpoint import load_checkpoint
    from dist_seg.config.loading import load_config
    from dist_seg.runtime.distributed import World
    from dist_seg.runtime.preemption import Preempted, StopRequest
    from dist_seg.train import validation
    from dist_seg.train.loop import fit

    evaluations = []

    def signal_during_the_second(*args, **kwargs):
        evaluations.append(1)
        if len(evaluations) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return compute_confusion(*args, **kwargs)

    monkeypatch.setattr(validation, "compute_confusion", signal_during_the_second)
    out = tmp_path / "run"
    overrides = [
        f"data.train_shards={tiny_shards['train4']}",
        f"data.val_shards={tiny_shards['eval1']}",
        f"train.out_dir={out}",
        "model.name=fcn8s",
        "data.crop_size=32",
        "train.max_steps=5",
        "train.eval_every=1",
        "data.num_workers=1",  # loader workers, as every real run has: they must outlive the signal
    ]
    stop = StopRequest([signal.SIGUSR1])
    try:
        with pytest.raises(Preempted) as e:
            fit(
                load_config(REPO / "configs/cpu_small.yaml", overrides),
                World(0, 0, 1, torch.device("cpu"), None),
                stop,
            )
    finally:
        stop.close()
    assert (e.value.step, e.value.signal_name) == (2, "SIGUSR1")
    assert load_checkpoint(out / "last.pt")["train_state"]["step"] == 2
    history = [json.loads(line)["step"] for line in (out / "metrics_history.jsonl").read_text().splitlines()]
    assert history == [1]
