"""torchvision's segmentation models behind our contract: forward returns the logits tensor at the input size.

Built with the requested number of classes, no auxiliary head and no download (torchvision's builders fetch
ImageNet backbone weights by default; we pass weights_backbone=None unless `pretrained` asks for them).
Parameter names keep torchvision's `backbone.*` and `classifier.*`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, segmentation
from torchvision.models.segmentation.lraspp import LRASPPHead

from dist_seg.models.vgg import copy_mapped, format_load_report, read_state_dict, torchvision_state_dict

logger = logging.getLogger(__name__)

# name -> (builder, ImageNet backbone weights, size_divisor = output stride of the deepest features)
_MODELS: dict[str, tuple[Any, Any, int]] = {
    "deeplabv3_resnet50": (segmentation.deeplabv3_resnet50, ResNet50_Weights.IMAGENET1K_V1, 8),
    "fcn_resnet50": (segmentation.fcn_resnet50, ResNet50_Weights.IMAGENET1K_V1, 8),
    "lraspp_mobilenet_v3_large": (
        segmentation.lraspp_mobilenet_v3_large,
        MobileNet_V3_Large_Weights.IMAGENET1K_V1,
        16,
    ),
}
TORCHVISION_MODELS = tuple(_MODELS)


class TorchvisionSegmenter(nn.Module):
    """Holds a torchvision model's backbone and classifier; returns logits, not a dict."""

    min_size = 32

    def __init__(self, tv_model: nn.Module, size_divisor: int) -> None:
        super().__init__()
        self.backbone = tv_model.backbone
        self.classifier = tv_model.classifier
        # LR-ASPP's head reads the backbone's {"low", "high"} dict; DeepLabV3/FCN heads read features["out"]
        self._head_takes_dict = isinstance(self.classifier, LRASPPHead)
        self.size_divisor = size_divisor

    def forward(self, x: Tensor) -> Tensor:
        feats = self.backbone(x)
        logits = self.classifier(feats if self._head_takes_dict else feats["out"])
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_torchvision(
    name: str, num_classes: int, width_mult: float = 1.0, pretrained: str | None = None
) -> nn.Module:
    """Build torchvision model `name`; `pretrained` is `torchvision` (ImageNet backbone via the weights API)
    or a path to torchvision's ImageNet classification weights for that backbone (resnet50 or
    mobilenet_v3_large)."""
    if width_mult != 1.0:
        raise ValueError(
            f"model.width_mult={width_mult}: torchvision model {name} supports only width_mult=1"
        )
    builder, backbone_weights, size_divisor = _MODELS[name]
    model = TorchvisionSegmenter(
        builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False), size_divisor
    )
    if pretrained is not None:
        model.pretrained_report = load_pretrained_backbone(model, pretrained, backbone_weights)
    return model


def load_pretrained_backbone(model: TorchvisionSegmenter, path: str | Path, weights: Any) -> dict[str, Any]:
    """Copy a torchvision classification state dict into `model.backbone` (ResNet keys keep their names,
    MobileNetV3's `features.N` became `backbone.N`). Returns {loaded, missing, unexpected, notes}."""
    if str(path) == "torchvision":
        state, source = torchvision_state_dict(weights, Path(weights.url).name), "torchvision"
    else:
        state, source = read_state_dict(path), str(path)
    plan: dict[str, str] = {}
    for key in model.backbone.state_dict():
        src = next((k for k in (key, f"features.{key}") if k in state), None)
        if src is None and key.endswith("num_batches_tracked"):
            continue
        # an absent key stays in the plan under its own name, so copy_mapped's error names it
        plan[f"backbone.{key}"] = src or key
    report: dict[str, Any] = copy_mapped(model, state, plan, source)
    report["notes"] = [
        "only the ImageNet backbone is pretrained; the segmentation head starts from initialisation"
    ]
    logger.info(format_load_report(report, source))
    return report
