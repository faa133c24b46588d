"""DeepLabV3 on the deep-stem ResNet (the teachers' backbone, so its grid is also 65 for 512).

Head, as in CIRKD's DeepLabV3 students (skd_spec §6), with channel counts for ResNet-18
(layer3 256 ch, layer4 512 ch, ``aspp_out=512``):

* ``aspp``: five branches on layer4, each ``aspp_out`` ch: ``b0`` conv1x1-BN-ReLU, ``b1..b3``
  conv3x3 at atrous rates 12/24/36 -BN-ReLU, ``b4`` image pooling (AvgPool(1)-conv1x1-BN-ReLU,
  upsampled); concatenated (5·512 = 2560 ch) and reduced by ``project``: conv1x1 2560->512-BN-ReLU-Dropout(0.5).
* ``bottleneck``: conv3x3 512->512-BN-ReLU-Dropout(0.1); its output is the distillation ``feature``
  (CIRKD's ``x_feat_after_aspp``, 512 ch).
* ``head``: conv1x1 512->K (bias).
* ``dsn`` (aux, on layer3, an FCN head): conv3x3 256->64-BN-ReLU-Dropout(0.1)-conv1x1 64->K. Its
  loss weight (0.4) is the trainer's business.

The ASPP / FCN pieces are shared with :mod:`pipeline.models.mobilenet`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.base import OFFICIAL_NORM, InputNormSpec, SegModelMixin, SegOutput
from pipeline.models.resnet import BasicBlock, Bottleneck, DeepStemResNet
from pipeline.registry import register_model

__all__ = ["ASPP", "DeepLabV3", "conv_bn_relu", "deeplab_bottleneck", "fcn_head"]


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> list[nn.Module]:
    pad = dilation * (kernel // 2)
    return [
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three atrous 3x3, image pooling; concat; 1x1 projection."""

    def __init__(self, cin: int, cout: int, rates: Sequence[int] = (12, 24, 36), dropout: float = 0.5):
        super().__init__()
        if len(rates) != 3:
            raise ValueError(f"ASPP takes three atrous rates, got {tuple(rates)}")
        self.b0 = nn.Sequential(*conv_bn_relu(cin, cout, 1))
        self.b1 = nn.Sequential(*conv_bn_relu(cin, cout, 3, rates[0]))
        self.b2 = nn.Sequential(*conv_bn_relu(cin, cout, 3, rates[1]))
        self.b3 = nn.Sequential(*conv_bn_relu(cin, cout, 3, rates[2]))
        self.b4 = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(cin, cout, 1))
        self.project = nn.Sequential(*conv_bn_relu(5 * cout, cout, 1), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        pooled = F.interpolate(self.b4(x), size=(h, w), mode="bilinear", align_corners=True)
        return self.project(torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x), pooled], dim=1))


def deeplab_bottleneck(channels: int, dropout: float = 0.1) -> nn.Sequential:
    """conv3x3-BN-ReLU-Dropout: the layer whose output is the distillation feature."""
    return nn.Sequential(*conv_bn_relu(channels, channels, 3), nn.Dropout(dropout))


def fcn_head(cin: int, num_classes: int, dropout: float = 0.1) -> nn.Sequential:
    """Auxiliary FCN head: conv3x3 cin->cin/4-BN-ReLU-Dropout-conv1x1 -> K."""
    mid = max(4, cin // 4)
    return nn.Sequential(*conv_bn_relu(cin, mid, 3), nn.Dropout(dropout), nn.Conv2d(mid, num_classes, 1))


class DeepLabV3(DeepStemResNet, SegModelMixin):
    """DeepLabV3 (output stride 8) on a deep-stem dilated ResNet.

    Args:
        block, layers, width, norm: the backbone (see :class:`DeepStemResNet`).
        num_classes: K.
        aspp_out: ASPP branch / projection / feature channels (512 for ResNet-18, as in CIRKD).
        rates: atrous rates at output stride 8.
        aux: build the ``dsn`` FCN head on layer3 (returned in training mode only).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        *,
        num_classes: int = 19,
        width: float = 1.0,
        aspp_out: int = 512,
        rates: Sequence[int] = (12, 24, 36),
        aux: bool = True,
        norm: InputNormSpec | str | dict = OFFICIAL_NORM,
    ):
        super().__init__(block, layers, width=width, norm=norm)
        c3, c4 = self.stage_channels[2], self.stage_channels[3]
        self.num_classes = int(num_classes)
        self.feature_channels = int(aspp_out)
        self.aspp = ASPP(c4, aspp_out, rates)
        self.bottleneck = deeplab_bottleneck(aspp_out)
        self.head = nn.Conv2d(aspp_out, num_classes, 1)
        self.dsn = fcn_head(c3, num_classes) if aux else None
        self.architecture = f"DeepLabV3({self.backbone_name}, aspp_out={aspp_out}{', dsn' if aux else ''})"
        self.init_weights()

    def forward(self, x: Tensor) -> SegOutput:
        _, _, x3, x4 = self.forward_stages(x)
        aux = self.dsn(x3) if self.dsn is not None and self.training else None
        feature = self.bottleneck(self.aspp(x4))
        return SegOutput(self.head(feature), aux, feature)


# ----------------------------------------------------------------------------------------------------
# registered names


@register_model("deeplabv3_r18", description="DeepLabV3-ResNet18 (deep stem, OS8, ASPP 512->512, aux FCN on layer3)")
def deeplabv3_r18(num_classes: int = 19, **kwargs: Any) -> DeepLabV3:
    return DeepLabV3(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, **{"aspp_out": 512, **kwargs})


@register_model("deeplabv3_r18_mini", description="CPU student: DeepLabV3, ResNet-18 layout at width 1/4, ASPP out 32")
def deeplabv3_r18_mini(num_classes: int = 19, **kwargs: Any) -> DeepLabV3:
    return DeepLabV3(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, **{"width": 0.25, "aspp_out": 32, **kwargs})
