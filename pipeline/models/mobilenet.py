"""MobileNetV2 at output stride 8 with a DeepLabV3 head (the CIRKD-style MobileNetV2 student).

Backbone: MobileNetV2's ``features`` (stem conv + 17 inverted residuals; the final 1x1 conv to 1280
is dropped), in the CSAIL / CIRKD key layout (``features.0.{0 conv, 1 bn}``,
``features.{i}.conv.{j}`` flat), so ``mobilenetv2-imagenet.pth`` backbone keys load one-to-one.
Output stride 8: the strides of the 64-ch and 160-ch stages become dilations (CSAIL's
``nostride_dilate``: the formerly strided block keeps the previous dilation, the following ones use
2, then 4).

Grid: the stem and the two strided stages are plain stride-2 convs (no ceil-mode max-pool), so the
grid is ``ceil(ceil(ceil(n/2)/2)/2)``: **64 for a 512 input** (the ResNet models give 65); the
losses resample when student and teacher grids differ.

Channels at width 1.0: stage outputs 16, 24, 32, 64, 96, 160, 320; ``aspp`` on the 320-ch output
with ``aspp_out=128`` (CIRKD), ``bottleneck`` conv3x3 128->128 (the 128-ch ``feature``), ``head``
conv1x1 128->K, and ``dsn`` an FCN head on the 96-ch stage (96->24->K).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from pipeline.models.base import OFFICIAL_NORM, InputNorm, InputNormSpec, SegModelMixin, SegOutput, as_norm_spec
from pipeline.models.deeplab import ASPP, deeplab_bottleneck, fcn_head
from pipeline.models.resnet import he_init
from pipeline.registry import register_model

__all__ = ["DeepLabV3MobileNetV2", "InvertedResidual", "MobileNetV2Backbone", "make_divisible"]

#: (expansion t, channels c, blocks n, stride s) of MobileNetV2.
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` without going more than 10% down (torchvision rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class InvertedResidual(nn.Module):
    """[expand 1x1-BN-ReLU6] -> depthwise 3x3 (stride, dilation)-BN-ReLU6 -> project 1x1-BN (+ identity)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, dilation: int = 1):
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, padding=dilation, dilation=dilation, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2Backbone(nn.Module):
    """MobileNetV2 features at output stride 8, taking raw pixels (0–255, NaN padding).

    Attributes:
        aux_index: index in ``features`` of the last block of the 96-ch stage (the aux head's input).
        aux_channels, out_channels: channels of that stage and of the last one.
    """

    backbone_prefixes = ("features.",)

    def __init__(self, *, width: float = 1.0, norm: InputNormSpec | str | dict = OFFICIAL_NORM):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        self.input_norm = InputNorm(as_norm_spec(norm))
        self.backbone_name = "mobilenetv2" if width == 1.0 else f"mobilenetv2x{width:g}"
        cin = make_divisible(32 * width)
        features: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, cin, 3, 2, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=True))
        ]
        current_stride, dilation = 2, 1
        for t, c, n, s in _SETTINGS:
            cout = make_divisible(c * width)
            for i in range(n):
                stride, block_dilation = (s if i == 0 else 1), dilation
                if stride == 2 and current_stride >= 8:
                    # output stride 8 reached: this block keeps the old dilation, later ones double it
                    stride, dilation = 1, dilation * 2
                elif stride == 2:
                    current_stride *= 2
                features.append(InvertedResidual(cin, cout, stride, t, block_dilation))
                cin = cout
            if c == 96:
                self.aux_index, self.aux_channels = len(features) - 1, cout
        self.features = nn.Sequential(*features)
        self.out_channels = cin

    def grid(self, n: int) -> int:
        """Grid side for an input side of ``n``: three stride-2 3x3 convs, i.e. 64 for 512."""
        for _ in range(3):
            n = (n + 1) // 2
        return n

    def forward_stages(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Raw pixels -> (output of the 96-ch stage, output of the last stage), both at stride 8."""
        x = self.input_norm(x)
        mid = self.features[: self.aux_index + 1](x)
        return mid, self.features[self.aux_index + 1 :](mid)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward_stages(x)


class DeepLabV3MobileNetV2(MobileNetV2Backbone, SegModelMixin):
    """DeepLabV3 head (see :mod:`pipeline.models.deeplab`) on :class:`MobileNetV2Backbone`.

    Args:
        num_classes: K.
        width: MobileNetV2 width multiplier.
        aspp_out: ASPP / feature channels (128 as in CIRKD's MobileNetV2 student).
        rates: atrous rates.
        aux: build the ``dsn`` FCN head on the 96-ch stage (returned in training mode only).
        norm: input normalisation (default: the official BGR mean subtraction, as CIRKD does).
    """

    def __init__(
        self,
        *,
        num_classes: int = 19,
        width: float = 1.0,
        aspp_out: int = 128,
        rates: Sequence[int] = (12, 24, 36),
        aux: bool = True,
        norm: InputNormSpec | str | dict = OFFICIAL_NORM,
    ):
        super().__init__(width=width, norm=norm)
        self.num_classes = int(num_classes)
        self.feature_channels = int(aspp_out)
        self.aspp = ASPP(self.out_channels, aspp_out, rates)
        self.bottleneck = deeplab_bottleneck(aspp_out)
        self.head = nn.Conv2d(aspp_out, num_classes, 1)
        self.dsn = fcn_head(self.aux_channels, num_classes) if aux else None
        self.architecture = f"DeepLabV3({self.backbone_name}, aspp_out={aspp_out}{', dsn' if aux else ''})"
        he_init(self)

    def forward(self, x: Tensor) -> SegOutput:
        mid, out = self.forward_stages(x)
        aux = self.dsn(mid) if self.dsn is not None and self.training else None
        feature = self.bottleneck(self.aspp(out))
        return SegOutput(self.head(feature), aux, feature)


# ----------------------------------------------------------------------------------------------------
# registered names


@register_model(
    "mbv2", description="DeepLabV3-MobileNetV2 (OS8 dilated, ASPP 320->128, aux on the 96-ch stage; grid 64 for 512)"
)
def mbv2(num_classes: int = 19, **kwargs: Any) -> DeepLabV3MobileNetV2:
    return DeepLabV3MobileNetV2(num_classes=num_classes, **{"aspp_out": 128, **kwargs})


@register_model(
    "mbv2_mini", description="CPU student: DeepLabV3-MobileNetV2 at width 1/2, ASPP out 32 (grid 64 for 512)"
)
def mbv2_mini(num_classes: int = 19, **kwargs: Any) -> DeepLabV3MobileNetV2:
    return DeepLabV3MobileNetV2(num_classes=num_classes, **{"width": 0.5, "aspp_out": 32, **kwargs})
