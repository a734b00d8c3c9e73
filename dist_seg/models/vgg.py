"""VGG16-BN encoder shared by DeconvNet, DeepLab v1 and FCN-8s, and loading torchvision's vgg16_bn weights.

The encoder keeps torchvision's layout (`features.N` with conv, BN, ReLU triples and max-pools at the same
indices), so a torchvision `vgg16_bn` state dict maps onto `encoder.features.N.*` one to one. The
classifier's fully connected fc6/fc7 only fit models that rebuild them as convolutions; each model says
which file keys feed which of its modules in `pretrained_fc` (file prefix -> model prefix).
`VGGSegmenter` is the base of the models on this encoder: their pretrained weights are torchvision's vgg16_bn.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_seg.models.base import SegmentationModel, TrainOutput

logger = logging.getLogger(__name__)

# torchvision's vgg16 ("D") configuration: output channels per conv, "M" = 2x2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)
TORCHVISION_VGG16_BN_FILE = "vgg16_bn-6c64b313.pth"


def scaled(channels: int, width_mult: float) -> int:
    """Channel count after width scaling (at least 1)."""
    return max(1, int(round(channels * width_mult)))


def conv_bn_relu(cin: int, cout: int, kernel: int, padding: int = 0, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class EncoderOutput(NamedTuple):
    feats: list[Tensor]
    """Output of each of the five pools (pool1 .. pool5)."""
    indices: list[Tensor]
    """Max-pool switches per pool (empty unless the encoder was built with return_indices)."""
    sizes: list[torch.Size]
    """Spatial size of each pool's input, for unpooling back to it."""


class VGG16BNEncoder(nn.Module):
    """conv1_1 .. conv5_3 (conv -> BN -> ReLU) with five max-pools, in torchvision's `features` layout.

    return_indices: the pools also return their switches (DeconvNet's unpooling needs them).
    deeplab: DeepLab v1's output stride 8 — pool4 and pool5 become 3x3 stride-1 pools and conv5 is dilated by 2.
    """

    def __init__(self, width_mult: float = 1.0, return_indices: bool = False, deeplab: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, pool_no = 3, 0
        self.stage_channels: list[int] = []
        for v in VGG16_CFG:
            if v == "M":
                pool_no += 1
                if deeplab and pool_no >= 4:
                    layers.append(nn.MaxPool2d(3, stride=1, padding=1, return_indices=return_indices))
                else:
                    layers.append(nn.MaxPool2d(2, stride=2, return_indices=return_indices))
                self.stage_channels.append(cin)
                continue
            assert isinstance(v, int)
            cout = scaled(v, width_mult)
            dilation = 2 if deeplab and pool_no == 4 else 1
            layers += list(conv_bn_relu(cin, cout, 3, padding=dilation, dilation=dilation))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.out_channels = cin

    def forward(self, x: Tensor) -> EncoderOutput:
        feats: list[Tensor] = []
        indices: list[Tensor] = []
        sizes: list[torch.Size] = []
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                sizes.append(x.shape[-2:])
                if layer.return_indices:
                    x, idx = layer(x)
                    indices.append(idx)
                else:
                    x = layer(x)
                feats.append(x)
            else:
                x = layer(x)
        return EncoderOutput(feats, indices, sizes)


# The auxiliary head reads pool4 (feats[3]): 1/16 of the input (1/8 in DeepLab v1, whose pool4 has stride 1),
# as torchvision's reads the ResNet's layer3.
AUX_POOL = 3


class AuxHead(nn.Sequential):
    """The auxiliary head: 3x3 conv, BN, ReLU, 1x1 conv to the classes (torchvision's FCNHead without its
    channel reduction, which would leave 16 channels for 11 classes at the demo's width, and its dropout)."""

    def __init__(self, cin: int, num_classes: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cin, 3, padding=1, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, num_classes, 1),
        )


class VGGSegmenter(SegmentationModel):
    """A model on the VGG16-BN encoder (`self.encoder`): model.pretrained is torchvision's vgg16_bn, loaded by
    load_pretrained_vgg into the encoder and, per `pretrained_fc`, into the model's fc6/fc7 convs.

    Built with `aux_loss=True` it also has `self.aux`, an AuxHead on pool4, and its training-mode forward
    returns TrainOutput(logits, aux logits); subclasses create the head last (`_add_aux_head`), so the other
    modules start from the same random weights with and without it, and end forward with `_outputs`.
    """

    encoder: VGG16BNEncoder
    aux: AuxHead | None  # set by _add_aux_head (a class-level default would shadow the registered module)

    def load_pretrained(self, source: str) -> dict[str, Any]:
        return load_pretrained_vgg(self, source)

    def _add_aux_head(self, num_classes: int, aux_loss: bool) -> None:
        self.aux = AuxHead(self.encoder.stage_channels[AUX_POOL], num_classes) if aux_loss else None
        if aux_loss:
            self.param_groups = (*type(self).param_groups, "aux")

    def _outputs(self, logits: Tensor, enc: EncoderOutput) -> Tensor | TrainOutput:
        """The logits, or in training mode with an auxiliary head both heads' logits at the input size."""
        if self.aux is None or not self.training:
            return logits
        aux = self.aux(enc.feats[AUX_POOL])
        aux = F.interpolate(aux, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        return TrainOutput(logits, aux)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict of tensors from `path`, loaded with weights_only=True (no unpickling of code)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model.pretrained: file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip, pickle with code objects, ... all mean "not a weights file"
        raise ValueError(f"model.pretrained: cannot read {path} as a weights-only state dict: {e}") from e
    # checkpoints sometimes wrap the weights one level deep
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"model.pretrained: {path} does not hold a state dict of tensors")
    return dict(obj)


def torchvision_state_dict(weights: Any, fallback_file: str) -> dict[str, Tensor]:
    """Ask torchvision's weights API for `weights` (downloads into the torch hub cache when not cached)."""
    try:
        return dict(weights.get_state_dict(progress=False, check_hash=True))
    except OSError as e:  # URLError, socket errors and timeouts are all OSErrors
        raise ValueError(
            f"model.pretrained=torchvision needs network access to download {weights.url} ({e}). "
            f"Download {fallback_file} on a machine with network and set model.pretrained=/path/to/{fallback_file}"
        ) from e


def copy_mapped(
    model: nn.Module, state: Mapping[str, Tensor], plan: Mapping[str, str], source: str
) -> dict[str, list[str]]:
    """Copy `state[plan[model_key]]` into each model tensor, reshaping fc weights into conv kernels.

    A file key absent from `state` is a wrong architecture; a size that does not fit is a shape mismatch;
    both raise ValueError naming the key. Returns the report {loaded, missing, unexpected}.
    """
    targets = model.state_dict()
    for dst, src in plan.items():
        if src not in state:
            raise ValueError(
                f"model.pretrained: {source} has no key {src!r} (needed for {dst}); wrong architecture?"
            )
        want, have = targets[dst].shape, state[src].shape
        # an fc weight [out, in] feeds a conv [out, c, k, k] when in == c*k*k (torchvision flattens C,H,W)
        fc_to_conv = len(have) == 2 and len(want) == 4 and have[0] == want[0] and have.numel() == want.numel()
        fits = have == want or fc_to_conv
        if not fits:
            raise ValueError(
                f"model.pretrained: shape mismatch for {src!r} in {source}: file {tuple(have)}, "
                f"model {dst} {tuple(want)} (model.width_mult must be 1 for pretrained weights)"
            )
    with torch.no_grad():
        for dst, src in plan.items():
            targets[dst].copy_(state[src].reshape(targets[dst].shape))
    used = set(plan.values())
    return {
        "loaded": sorted(plan),
        "missing": sorted(k for k in targets if k not in plan and not k.endswith("num_batches_tracked")),
        "unexpected": sorted(k for k in state if k not in used),
    }


def load_pretrained_vgg(model: VGGSegmenter, path: str | Path) -> dict[str, Any]:
    """Load a torchvision-format vgg16_bn state dict (a file, or `torchvision` to download it) into `model`.

    Maps `features.N.*` -> `encoder.features.N.*` and, where the model declares it in `pretrained_fc`,
    `classifier.0.*` (fc6, 4096x25088) and `classifier.3.*` (fc7) into its 7x7 and 1x1 convs.
    Returns {loaded, missing, unexpected, notes}: model keys loaded, model keys left at their
    initialisation, file keys not used, and what could not be mapped and why.
    """
    if not isinstance(model, VGGSegmenter) or not isinstance(model.encoder, VGG16BNEncoder):
        raise ValueError(f"model.pretrained: {type(model).__name__} has no VGG16-BN encoder to load into")
    if str(path) == "torchvision":
        from torchvision.models import VGG16_BN_Weights

        state, source = (
            torchvision_state_dict(VGG16_BN_Weights.IMAGENET1K_V1, TORCHVISION_VGG16_BN_FILE),
            "torchvision",
        )
    else:
        state, source = read_state_dict(path), str(path)
    plan: dict[str, str] = {}
    for key in model.encoder.state_dict():
        # files saved before torch 0.4.1 (torchvision's own) have no BN step counters; keep ours then
        if key.endswith("num_batches_tracked") and key not in state:
            continue
        plan[f"encoder.{key}"] = key
    for src_prefix, dst_prefix in model.pretrained_fc.items():
        for p in ("weight", "bias"):
            plan[f"{dst_prefix}.{p}"] = f"{src_prefix}.{p}"
    report: dict[str, Any] = copy_mapped(model, state, plan, source)
    report["notes"] = list(model.pretrained_notes)
    logger.info(format_load_report(report, source))
    return report


def format_load_report(report: Mapping[str, Any], source: str) -> str:
    lines = [
        f"pretrained {source}: loaded {len(report['loaded'])} tensors, "
        f"{len(report['missing'])} model tensors keep their initialisation, "
        f"{len(report['unexpected'])} file tensors unused"
    ]
    if report["missing"]:
        lines.append("  not loaded: " + _prefixes(report["missing"]))
    if report["unexpected"]:
        lines.append("  unused from file: " + _prefixes(report["unexpected"]))
    lines += [f"  note: {n}" for n in report.get("notes", ())]
    return "\n".join(lines)


def _prefixes(keys: list[str]) -> str:
    """Compress a key list to its module prefixes (`decoder.stages.0.*`), so the log line stays short."""
    seen: dict[str, None] = {}
    for k in keys:
        seen[k.rsplit(".", 1)[0] + ".*"] = None
    return ", ".join(seen)
