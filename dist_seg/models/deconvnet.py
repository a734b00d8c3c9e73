"""DeconvNet (Noh, Hong and Han, "Learning Deconvolution Network for Semantic Segmentation", ICCV 2015).

VGG16-BN encoder whose five max-pools keep their switches; fc6 (7x7 conv, no padding) and fc7 (1x1) to 4096
channels; a decoder that mirrors the encoder: a 7x7 transposed conv back to 512 channels, then five stages of
unpooling with the switches, each followed by 3x3 transposed convs; a 1x1 classifier. Every conv and deconv is
followed by BatchNorm and ReLU (without BN the net does not train, as the paper notes and users found).

Input size: H and W must be multiples of 32 (five 2x2 pools whose switches must invert exactly) and at least
224, because fc6 is an unpadded 7x7 conv on the 1/32 map (224/32 = 7 gives fc6 a 1x1 output). At 224,
fc6/fc7 see one value per channel per image, so training their BatchNorms needs a batch of at least 2.
At width 1 and 21 classes the model has 251.8 M parameters; at 512x512 its forward pass is about 192 GMAC.
"""

from __future__ import annotations

from torch import Tensor, nn

from dist_seg.models.base import TrainOutput
from dist_seg.models.registry import register
from dist_seg.models.vgg import EncoderOutput, VGG16BNEncoder, VGGSegmenter, conv_bn_relu, scaled


def deconv_bn_relu(cin: int, cout: int, kernel: int, padding: int = 0) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, kernel, padding=padding),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


# Output channels of the 3x3 deconvs after each unpooling, deepest stage first (mirror of conv5_3 .. conv1_1).
DECODER_STAGES: tuple[tuple[int, ...], ...] = (
    (512, 512, 512),
    (512, 512, 256),
    (256, 256, 128),
    (128, 64),
    (64, 64),
)


class DeconvDecoder(nn.Module):
    def __init__(self, fc_channels: int, width_mult: float = 1.0) -> None:
        super().__init__()
        cin = scaled(512, width_mult)
        self.fc6_deconv = deconv_bn_relu(fc_channels, cin, 7)
        self.unpool = nn.MaxUnpool2d(2, stride=2)
        stages = []
        for widths in DECODER_STAGES:
            layers: list[nn.Module] = []
            for w in widths:
                cout = scaled(w, width_mult)
                layers += list(deconv_bn_relu(cin, cout, 3, padding=1))
                cin = cout
            stages.append(nn.Sequential(*layers))
        # stages[0] follows unpool5, stages[4] follows unpool1
        self.stages = nn.ModuleList(stages)
        self.out_channels = cin

    def forward(self, x: Tensor, enc: EncoderOutput) -> Tensor:
        x = self.fc6_deconv(x)
        for i, stage in enumerate(self.stages):
            pool = len(self.stages) - 1 - i
            x = self.unpool(x, enc.indices[pool], output_size=enc.sizes[pool])
            x = stage(x)
        return x


@register("deconvnet")
class DeconvNet(VGGSegmenter):
    size_divisor = 32
    min_size = 224
    param_groups = ("encoder", "fc6", "fc7", "decoder", "classifier")
    # torchvision vgg16_bn classifier.0 (fc6, 4096x25088) and classifier.3 (fc7) reshape into these convs
    pretrained_fc = {"classifier.0": "fc6.0", "classifier.3": "fc7.0"}
    pretrained_notes = (
        "fc6/fc7 conv weights and biases come from the VGG classifier; their BatchNorms, the decoder and "
        "the classifier start from initialisation (torchvision's vgg16_bn has no BN on fc layers)",
    )

    def __init__(self, num_classes: int, width_mult: float = 1.0, aux_loss: bool = False) -> None:
        super().__init__()
        self.encoder = VGG16BNEncoder(width_mult, return_indices=True)
        fc = scaled(4096, width_mult)
        self.fc6 = conv_bn_relu(self.encoder.out_channels, fc, 7)
        self.fc7 = conv_bn_relu(fc, fc, 1)
        self.decoder = DeconvDecoder(fc, width_mult)
        self.classifier = nn.Conv2d(self.decoder.out_channels, num_classes, 1)
        self._add_aux_head(num_classes, aux_loss)

    def forward(self, x: Tensor) -> Tensor | TrainOutput:
        self.check_input(x, "fc6 is an unpadded 7x7 conv on the 1/32 feature map")
        enc = self.encoder(x)
        x = self.fc7(self.fc6(enc.feats[-1]))
        return self._outputs(self.classifier(self.decoder(x, enc)), enc)
