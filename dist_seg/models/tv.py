"""torchvision's segmentation models behind our contract (dist_seg.models.base): forward returns the logits
tensor at the input size. One registered subclass of TorchvisionSegmenter per model.

Built with the requested number of classes, no auxiliary head and no download (torchvision's builders fetch
ImageNet backbone weights by default; we pass weights_backbone=None unless `pretrained` asks for them).
Parameter names keep torchvision's `backbone.*` and `classifier.*`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, segmentation
from torchvision.models.segmentation.lraspp import LRASPPHead

from dist_seg.models.base import SegmentationModel
from dist_seg.models.registry import register
from dist_seg.models.vgg import copy_mapped, format_load_report, read_state_dict, torchvision_state_dict

logger = logging.getLogger(__name__)


class TorchvisionSegmenter(SegmentationModel):
    """Holds a torchvision model's backbone and classifier; returns logits, not a dict. Each registered
    subclass names its torchvision builder, the ImageNet weights of its backbone and its size_divisor (the
    output stride of the deepest features)."""

    min_size = 32
    param_groups = ("backbone", "classifier")
    pretrained_fc: dict[
        str, str
    ] = {}  # the backbone maps by name; ImageNet's classification head fits nowhere
    pretrained_notes = (
        "only the ImageNet backbone is pretrained; the segmentation head starts from initialisation",
    )
    builder: ClassVar[Callable[..., nn.Module]]
    backbone_weights: ClassVar[Any]

    def __init__(self, num_classes: int, width_mult: float = 1.0) -> None:
        super().__init__()
        if width_mult != 1.0:
            raise ValueError(
                f"model.width_mult={width_mult}: torchvision model {self.model_name} supports only width_mult=1"
            )
        tv_model = type(self).builder(
            weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False
        )
        self.backbone = tv_model.backbone
        self.classifier = tv_model.classifier
        # LR-ASPP's head reads the backbone's {"low", "high"} dict; DeepLabV3/FCN heads read features["out"]
        self._head_takes_dict = isinstance(self.classifier, LRASPPHead)

    def forward(self, x: Tensor) -> Tensor:
        feats = self.backbone(x)
        logits = self.classifier(feats if self._head_takes_dict else feats["out"])
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def load_pretrained(self, source: str) -> dict[str, Any]:
        """`torchvision` (ImageNet backbone via the weights API) or a path to torchvision's ImageNet
        classification weights of this backbone (resnet50 or mobilenet_v3_large)."""
        return load_pretrained_backbone(self, source, self.backbone_weights)


@register("deeplabv3_resnet50")
class DeepLabV3ResNet50(TorchvisionSegmenter):
    size_divisor = 8
    builder = staticmethod(segmentation.deeplabv3_resnet50)
    backbone_weights = ResNet50_Weights.IMAGENET1K_V1


@register("fcn_resnet50")
class FCNResNet50(TorchvisionSegmenter):
    size_divisor = 8
    builder = staticmethod(segmentation.fcn_resnet50)
    backbone_weights = ResNet50_Weights.IMAGENET1K_V1


@register("lraspp_mobilenet_v3_large")
class LRASPPMobileNetV3Large(TorchvisionSegmenter):
    size_divisor = 16
    builder = staticmethod(segmentation.lraspp_mobilenet_v3_large)
    backbone_weights = MobileNet_V3_Large_Weights.IMAGENET1K_V1


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
    report["notes"] = list(model.pretrained_notes)
    logger.info(format_load_report(report, source))
    return report
