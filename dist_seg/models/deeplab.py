"""DeepLab v1 LargeFOV (Chen et al., "Semantic Image Segmentation with Deep Convolutional Nets and Fully
Connected CRFs", ICLR 2015) on the VGG16-BN encoder, without the CRF post-processing.

pool4 and pool5 are 3x3 stride-1 pools and conv5 is dilated by 2, so the output stride is 8; fc6 is a 3x3
conv with dilation 12 and 1024 channels (the "large field of view"), fc7 a 1x1 conv with 1024 channels, both
with BN, ReLU and dropout; a 1x1 classifier; bilinear upsampling x8 back to the input size. The paper's
extra 3x3 average pool after pool5 is left out.

fc6 cannot take VGG's pretrained fc6 (4096x25088, a 7x7 kernel on 512 channels): the paper subsampled it to
1024 channels and a 3x3 kernel, which torchvision's weights do not carry. Only the encoder is pretrained.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from dist_seg.models.base import TrainOutput
from dist_seg.models.registry import register
from dist_seg.models.vgg import VGG16BNEncoder, VGGSegmenter, conv_bn_relu, scaled


@register("deeplab_v1")
class DeepLabV1LargeFOV(VGGSegmenter):
    # output stride 8; fc6's padding keeps any size valid, the multiple of 8 keeps the upsampling aligned
    size_divisor = 8
    min_size = 8
    param_groups = ("encoder", "fc6", "fc7", "classifier")
    pretrained_fc: dict[str, str] = {}
    pretrained_notes = (
        "DeepLab v1 LargeFOV's fc6 is a 3x3 conv with dilation 12 and 1024 channels: it cannot take VGG's "
        "fc6 (4096x25088), so fc6, fc7 and the classifier start from initialisation",
    )

    def __init__(
        self, num_classes: int, width_mult: float = 1.0, dropout: float = 0.5, aux_loss: bool = False
    ) -> None:
        super().__init__()
        self.encoder = VGG16BNEncoder(width_mult, deeplab=True)
        fc = scaled(1024, width_mult)
        self.fc6 = nn.Sequential(*conv_bn_relu(self.encoder.out_channels, fc, 3, 12, 12), nn.Dropout(dropout))
        self.fc7 = nn.Sequential(*conv_bn_relu(fc, fc, 1), nn.Dropout(dropout))
        self.classifier = nn.Conv2d(fc, num_classes, 1)
        self._add_aux_head(num_classes, aux_loss)

    def forward(self, x: Tensor) -> Tensor | TrainOutput:
        enc = self.encoder(x)
        logits = self.classifier(self.fc7(self.fc6(enc.feats[-1])))
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self._outputs(logits, enc)
