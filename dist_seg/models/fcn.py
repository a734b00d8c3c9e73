"""FCN-8s (Long, Shelhamer and Darrell, "Fully Convolutional Networks for Semantic Segmentation", CVPR 2015)
on the VGG16-BN encoder.

fc6 is VGG's fc6 as a 7x7 conv (here with padding 3 instead of the paper's padding-100-and-crop, so the
score maps line up with the pools without cropping), fc7 a 1x1 conv, both with BN, ReLU and dropout.
Scores from fc7, pool4 and pool3 are fused: x2 transposed conv, add pool4's scores, x2 transposed conv, add
pool3's scores, x8 transposed conv to the input size. The transposed convs start as bilinear upsampling.
Pretrained: torchvision vgg16_bn's classifier.0 / classifier.3 reshape into fc6 / fc7, as for DeconvNet.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dist_seg.models.base import TrainOutput
from dist_seg.models.registry import register
from dist_seg.models.vgg import VGG16BNEncoder, VGGSegmenter, conv_bn_relu, scaled


def bilinear_upsampler(channels: int, factor: int) -> nn.ConvTranspose2d:
    """A per-channel transposed conv that starts as exact bilinear upsampling by `factor`."""
    kernel = 2 * factor
    up = nn.ConvTranspose2d(channels, channels, kernel, stride=factor, padding=factor // 2, bias=False)
    center = factor - 0.5
    coords = torch.arange(kernel, dtype=torch.float32)
    k1 = 1 - (coords - center).abs() / factor
    with torch.no_grad():
        up.weight.zero_()
        for c in range(channels):
            up.weight[c, c] = k1[:, None] * k1[None, :]
    return up


class FCNDecoder(nn.Module):
    def __init__(self, num_classes: int, pool3_channels: int, pool4_channels: int) -> None:
        super().__init__()
        self.score_pool4 = nn.Conv2d(pool4_channels, num_classes, 1)
        self.score_pool3 = nn.Conv2d(pool3_channels, num_classes, 1)
        self.upscore2 = bilinear_upsampler(num_classes, 2)
        self.upscore_pool4 = bilinear_upsampler(num_classes, 2)
        self.upscore8 = bilinear_upsampler(num_classes, 8)

    def forward(self, score_fr: Tensor, pool3: Tensor, pool4: Tensor) -> Tensor:
        x = self.upscore2(score_fr) + self.score_pool4(pool4)
        x = self.upscore_pool4(x) + self.score_pool3(pool3)
        return self.upscore8(x)


@register("fcn8s")
class FCN8s(VGGSegmenter):
    size_divisor = 32
    min_size = 32
    param_groups = ("encoder", "fc6", "fc7", "decoder", "classifier")
    pretrained_fc = {"classifier.0": "fc6.0", "classifier.3": "fc7.0"}
    pretrained_notes = (
        "fc6/fc7 conv weights and biases come from the VGG classifier; their BatchNorms, the score layers "
        "and the upsampling layers start from initialisation",
    )

    def __init__(
        self, num_classes: int, width_mult: float = 1.0, dropout: float = 0.5, aux_loss: bool = False
    ) -> None:
        super().__init__()
        self.encoder = VGG16BNEncoder(width_mult)
        fc = scaled(4096, width_mult)
        self.fc6 = nn.Sequential(
            *conv_bn_relu(self.encoder.out_channels, fc, 7, padding=3), nn.Dropout(dropout)
        )
        self.fc7 = nn.Sequential(*conv_bn_relu(fc, fc, 1), nn.Dropout(dropout))
        # classifier = the paper's score_fr; the fusion and upsampling layers form the decoder
        self.classifier = nn.Conv2d(fc, num_classes, 1)
        stage = self.encoder.stage_channels
        self.decoder = FCNDecoder(num_classes, pool3_channels=stage[2], pool4_channels=stage[3])
        self._add_aux_head(num_classes, aux_loss)

    def forward(self, x: Tensor) -> Tensor | TrainOutput:
        self.check_input(x, "the pool3, pool4 and fc7 scores are added at 1/8, 1/16 and 1/32")
        enc = self.encoder(x)
        feats = enc.feats
        score_fr = self.classifier(self.fc7(self.fc6(feats[4])))
        return self._outputs(self.decoder(score_fr, pool3=feats[2], pool4=feats[3]), enc)
