"""model.aux_loss: the auxiliary head on pool4 of the VGG16-BN models (training only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_seg.config.schema import ModelConfig, OptimConfig, OptimGroup
from dist_seg.models import VGG_MODELS, TrainOutput, build_model
from dist_seg.train.optim import build_optimizer

WIDTH = 0.0625


@pytest.mark.parametrize("name", sorted(VGG_MODELS))
def test_training_forward_returns_both_heads_and_evaluation_only_the_main_one(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, width_mult=WIDTH, aux_loss=0.5), 5)
    x = torch.randn(2, 3, 224, 224)
    out = model.train()(x)
    assert isinstance(out, TrainOutput)
    assert out.logits.shape == out.aux.shape == (2, 5, 224, 224)
    # the aux logits are the head on pool4, bilinearly upsampled: recomputed from the encoder by hand
    enc = model.encoder(x)
    # DeepLab's pool4 has stride 1
    assert enc.feats[3].shape[-1] == 224 // (8 if name == "deeplab_v1" else 16)
    want = F.interpolate(model.aux(enc.feats[3]), size=(224, 224), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.aux, want, rtol=0, atol=0)
    model.eval()
    with torch.no_grad():
        plain = model(x)
    assert isinstance(plain, torch.Tensor) and plain.shape == (2, 5, 224, 224)


@pytest.mark.parametrize("name", sorted(VGG_MODELS))
def test_the_head_is_built_last_so_the_rest_starts_from_the_same_weights(name: str) -> None:
    """aux_loss on and off start the model's own modules from the same random weights: an ablation of the
    head compares like with like."""
    torch.manual_seed(1)
    with_head = build_model(ModelConfig(name=name, width_mult=WIDTH, aux_loss=0.5), 5).state_dict()
    torch.manual_seed(1)
    without = build_model(ModelConfig(name=name, width_mult=WIDTH), 5).state_dict()
    assert {k for k in with_head if not k.startswith("aux.")} == set(without)
    assert all(torch.equal(with_head[k], v) for k, v in without.items())
    assert any(k.startswith("aux.") for k in with_head)


def test_the_head_is_a_declared_parameter_group_and_trains_at_the_base_lr() -> None:
    model = build_model(ModelConfig(name="deconvnet", width_mult=WIDTH, aux_loss=0.5), 5)
    assert model.param_groups == ("encoder", "fc6", "fc7", "decoder", "classifier", "aux")
    assert build_model(ModelConfig(name="deconvnet", width_mult=WIDTH), 5).param_groups[-1] == "classifier"
    cfg = OptimConfig(name="sgd", lr=0.01, groups=[OptimGroup(params="encoder.*", lr_mult=0.1)])
    optimizer, summary = build_optimizer(model, cfg)
    aux = {id(p) for n, p in model.named_parameters() if n.startswith("aux.")}
    for group in optimizer.param_groups:
        if any(id(p) in aux for p in group["params"]):
            assert group["lr"] == pytest.approx(0.01), group["name"]
    assert any("aux" in s.modules for s in summary)


def test_models_without_the_head_refuse_aux_loss_naming_the_key() -> None:
    with pytest.raises(
        ValueError, match=r"model.aux_loss=0.5: only the VGG16-BN models .*model.name=fcn_resnet50"
    ):
        build_model(ModelConfig(name="fcn_resnet50", aux_loss=0.5), 5)
