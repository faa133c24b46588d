"""CIRKD's DeepLabV3 (``winycg/CIRKD``), key for key, with CIRKD's input normalisation.

Following ``models/deeplabv3.py``, ``models/segbase.py``, ``models/base_models/resnetv1b.py``,
``models/deeplabv3_mobile.py`` and ``models/base_models/mobilenetv2.py``:

* ``pretrained`` (ResNet, CIRKD's ``resnet*_v1s``): deep stem ``conv1`` 3x3/2 3->64, ``conv2``
  64->64, ``conv3`` 64->128 (each + ``bn1..3`` + ReLU), a 3x3/2 max-pool (padding 1, floor mode);
  ``layer1..4`` with strides 1/2/1/1 and dilations 1/1/2/4 where the first block of layer3 uses
  dilation 1 and that of layer4 dilation 2. ``BasicBlockV1b``: ``conv1`` at the block's dilation,
  ``conv2`` at the stage's (its ``previous_dilation``); ``BottleneckV1b``: the 3x3 ``conv2`` carries
  stride and dilation. The 128-ch stem means even ResNet-18 has ``layer1.0.downsample``.
* ``pretrained.net.features`` (MobileNetV2): the torchvision-style 18 blocks without the final 1x1
  conv, output stride 8 by CIRKD's ``_nostride_dilate``: ``features[7]`` loses its stride,
  ``features[8..13]`` use dilation 2, ``features[14]`` loses its stride with dilation 2,
  ``features[15..17]`` dilation 4.
* ``head``: ``aspp.b0.{0,1}`` (1x1), ``aspp.b{1,2,3}.block.{0,1}`` (3x3 at 12/24/36), ``aspp.b4.gap.{1,2}``
  (global pooling, 1x1, upsampled with ``align_corners=True``), concatenated ``[b0, b1, b2, b3, b4]``,
  ``aspp.project.{0,1}`` (1x1, ReLU, ``Dropout(0.5)``); ``block.{0,1}`` 3x3 conv-BN, ReLU,
  ``Dropout(0.1)`` -- its output is CIRKD's ``x_feat_after_aspp``, the distillation feature -- and
  ``block.4`` the 1x1 classifier (bias). 512 channels for ResNets (18 and 101), 128 for MobileNetV2.
* ``auxlayer`` (ResNets; CIRKD trains them with ``aux=True``): ``block.{0,1,4}``: 3x3 c3->c3/4 conv-BN,
  ReLU, ``Dropout(0.1)``, 1x1 classifier on layer3. MobileNetV2 models have none.

Input: OpenCV BGR, mean (104.00698793, 116.66876762, 122.67891434) subtracted, no std, in float64
as CIRKD's NumPy datasets do, then float32. Output grid ``ceil(n/8)`` (64x128 for 512x1024, "8k");
CIRKD upsamples its logits with ``align_corners=True``; its label ignore value is -1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.base import OFFICIAL_NORM, InputNorm, InputNormSpec, SegModelMixin, SegOutput, as_norm_spec
from pipeline.models.mmseg import DilatedBasicBlock, depth_name, downsample_for, grid_size_8k
from pipeline.models.mobilenet import InvertedResidual, make_divisible
from pipeline.models.resnet import Bottleneck, he_init, scale_channels
from pipeline.registry import register_model

__all__ = ["CIRKD_NORM", "CIRKDDeepLabV3", "CIRKDMobileNetV2", "CIRKDResNet", "Float64InputNorm"]

#: CIRKD's datasets: ``cv2.imread`` (BGR) minus the Caffe mean, no std (the official SKD numbers).
CIRKD_NORM = OFFICIAL_NORM


class Float64InputNorm(InputNorm):
    """:class:`InputNorm` subtracting in float64, then rounding to float32, as CIRKD's datasets do.

    ``np.float32(image) - np.array([...])`` promotes to float64 with the mean as written (not rounded
    to float32); the float32 subtraction of ``InputNorm`` differs from it by one ulp on about a third
    of the pixels.
    """

    def __init__(self, spec: InputNormSpec):
        super().__init__(spec)
        self.register_buffer("mean64", torch.tensor(spec.mean, dtype=torch.float64).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std64", torch.tensor(spec.std, dtype=torch.float64).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.spec.order == "BGR":
            x = x.flip(1)
        dtype = torch.promote_types(x.dtype, self.mean.dtype)
        if x.device.type == "mps":  # no float64 there: the float32 arithmetic of InputNorm
            out = (x - self.mean) * self.inv_std
        else:
            out = ((x.double() - self.mean64) / self.std64).to(dtype)
        return torch.nan_to_num(out, nan=0.0)


class CIRKDResNet(nn.Module):
    """CIRKD's ``ResNetV1b(deep_stem=True, dilated=True)`` (``resnet18_v1s`` / ``resnet101_v1s``).

    Args:
        block: :class:`DilatedBasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage.
        width: channel multiplier (small CPU variants; 1.0 is CIRKD's model).
    """

    def __init__(self, block, layers: Sequence[int], *, width: float = 1.0):
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be 4 positive block counts, got {tuple(layers)}")
        s64, s128 = scale_channels(64, width), scale_channels(128, width)
        for i, (cin, cout, stride) in enumerate(((3, s64, 2), (s64, s64, 1), (s64, s128, 1)), start=1):
            self.add_module(f"conv{i}", nn.Conv2d(cin, cout, 3, stride, 1, bias=False))
            self.add_module(f"bn{i}", nn.BatchNorm2d(cout))
            self.add_module(f"relu{i}", nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.inplanes, channels = s128, []
        for i, (n, stride, dilation) in enumerate(zip(layers, (1, 2, 1, 1), (1, 1, 2, 4), strict=True)):
            self.add_module(
                f"layer{i + 1}", self._make_layer(block, scale_channels(64 * 2**i, width), n, stride, dilation)
            )
            channels.append(self.inplanes)
        self.stage_channels = tuple(channels)
        self.name = depth_name("resnet", block, layers, width) + "_v1s"

    def _make_layer(self, block, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
        # ResNetV1b._make_layer: the first block runs at dilation 1 (stage dilation 1 or 2) or 2 (4),
        # with previous_dilation = the stage's; BasicBlockV1b's conv2 uses previous_dilation.
        first = 1 if dilation in (1, 2) else 2
        extra = {"conv2_dilation": dilation} if block is DilatedBasicBlock else {}
        downsample = downsample_for(block, self.inplanes, planes, stride)
        mods = [block(self.inplanes, planes, stride, first, downsample, **extra)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes, 1, dilation, None, **extra) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.maxpool(self.relu3(self.bn3(self.conv3(x))))
        x1 = self.layer1(x)
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        return x1, x2, x3, self.layer4(x3)


#: MobileNetV2 (t, c, n, s) and CIRKD's dilation of each block at output stride 8.
_MBV2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
_MBV2_DILATION = {7: 1, **dict.fromkeys(range(8, 14), 2), 14: 2, **dict.fromkeys(range(15, 18), 4)}


class _MobileNetV2Net(nn.Module):
    """CIRKD's ``MobileNetV2`` (``features`` only, the last 1x1 conv commented out), dilated to OS 8."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        cin = make_divisible(32 * width)
        features: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, cin, 3, 2, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=True))
        ]
        for t, c, n, s in _MBV2:
            cout = make_divisible(c * width)
            for i in range(n):
                idx = len(features)
                # _nostride_dilate turns the strides of features[7] and [14] into dilations
                stride = 1 if idx in (7, 14) else (s if i == 0 else 1)
                features.append(InvertedResidual(cin, cout, stride, t, _MBV2_DILATION.get(idx, 1)))
                cin = cout
        self.features = nn.Sequential(*features)
        self.out_channels = cin


class CIRKDMobileNetV2(nn.Module):
    """``MobileNetV2Dilated``: the net sits under ``net`` (keys ``net.features.*``)."""

    def __init__(self, *, width: float = 1.0):
        super().__init__()
        self.net = _MobileNetV2Net(width)
        self.out_channels = self.net.out_channels
        self.name = "mobilenetv2" if width == 1.0 else f"mobilenetv2x{width:g}"

    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(x)


def _cbr(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> list[nn.Module]:
    pad = dilation * (kernel // 2)
    return [nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class _ASPPConv(nn.Module):
    def __init__(self, cin: int, cout: int, rate: int):
        super().__init__()
        self.block = nn.Sequential(*_cbr(cin, cout, 3, rate))

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class _AsppPooling(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_cbr(cin, cout))

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.gap(x), x.shape[-2:], mode="bilinear", align_corners=True)


class _ASPP(nn.Module):
    def __init__(self, cin: int, cout: int, rates: Sequence[int] = (12, 24, 36)):
        super().__init__()
        self.b0 = nn.Sequential(*_cbr(cin, cout))
        self.b1, self.b2, self.b3 = (_ASPPConv(cin, cout, r) for r in rates)
        self.b4 = _AsppPooling(cin, cout)
        self.project = nn.Sequential(*_cbr(5 * cout, cout), nn.Dropout(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1))


class _DeepLabHead(nn.Module):
    def __init__(self, cin: int, cout: int, num_classes: int):
        super().__init__()
        self.aspp = _ASPP(cin, cout)
        self.block = nn.Sequential(*_cbr(cout, cout, 3), nn.Dropout(0.1), nn.Conv2d(cout, num_classes, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feature = self.block[0:4](self.aspp(x))
        return feature, self.block[4](feature)


class _FCNHead(nn.Module):
    def __init__(self, cin: int, num_classes: int):
        super().__init__()
        mid = cin // 4
        self.block = nn.Sequential(*_cbr(cin, mid, 3), nn.Dropout(0.1), nn.Conv2d(mid, num_classes, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


_BACKBONES = {"resnet18": (DilatedBasicBlock, (2, 2, 2, 2)), "resnet101": (Bottleneck, (3, 4, 23, 3))}


class CIRKDDeepLabV3(nn.Module, SegModelMixin):
    """CIRKD's DeepLabV3 (``get_deeplabv3`` / ``get_deeplabv3_mobile``).

    Args:
        backbone: "resnet101", "resnet18" or "mobilenetv2"; or a ``(block, layers)`` pair for small
            ResNet test layouts.
        num_classes: K.
        width: backbone channel multiplier (1.0 is CIRKD's model).
        head_channels: ASPP / feature channels (CIRKD: 512 on ResNets, 128 on MobileNetV2).
        aux: build ``auxlayer`` (ResNets only; CIRKD trains and publishes them with it).
        norm: input normalisation (default CIRKD's BGR mean subtraction).

    Output (``SegOutput``): logits (B, K, h, w) = CIRKD's ``outputs[0]``, aux = ``outputs[1]`` (train
    mode only), feature = ``x_feat_after_aspp``; ``h = ceil(H / 8)``.
    """

    family = "cirkd"
    grid_convention = "8k"
    align_corners = True
    ignore_index = -1
    backbone_prefixes = ("pretrained.",)

    def __init__(
        self,
        backbone: str | tuple = "resnet101",
        *,
        num_classes: int = 19,
        width: float = 1.0,
        head_channels: int | None = None,
        aux: bool | None = None,
        norm: InputNormSpec | str | dict = CIRKD_NORM,
    ):
        super().__init__()
        self.input_norm = Float64InputNorm(as_norm_spec(norm))
        mobile = backbone == "mobilenetv2"
        if mobile:
            if aux:
                raise ValueError("CIRKD's MobileNetV2 DeepLabV3 has no auxiliary head; leave aux unset")
            self.pretrained: nn.Module = CIRKDMobileNetV2(width=width)
            c3, c4 = None, self.pretrained.out_channels
        else:
            block, layers = _BACKBONES[backbone] if isinstance(backbone, str) else backbone
            self.pretrained = CIRKDResNet(block, layers, width=width)
            c3, c4 = self.pretrained.stage_channels[2:]
        head_channels = head_channels or (128 if mobile else 512)
        self.num_classes = int(num_classes)
        self.feature_channels = int(head_channels)
        self.head = _DeepLabHead(c4, head_channels, num_classes)
        self.auxlayer = _FCNHead(c3, num_classes) if c3 is not None and aux is not False else None
        has_aux = self.auxlayer is not None
        self.architecture = f"CIRKD DeepLabV3({self.pretrained.name}, head={head_channels}{', aux' if has_aux else ''})"
        he_init(self)

    def grid(self, n: int) -> int:
        """Output side for an input side of ``n`` pixels: ``ceil(n / 8)``."""
        return grid_size_8k(n)

    def forward(self, x: Tensor) -> SegOutput:
        x = self.input_norm(x)
        if isinstance(self.pretrained, CIRKDMobileNetV2):
            x3, x4 = None, self.pretrained(x)
        else:
            _, _, x3, x4 = self.pretrained(x)
        feature, logits = self.head(x4)
        aux = self.auxlayer(x3) if self.auxlayer is not None and self.training else None
        return SegOutput(logits, aux, feature)


# ----------------------------------------------------------------------------------------------------
# registered names (CIRKD's models/deeplabv3.py, models/deeplabv3_mobile.py)


@register_model(
    "cirkd_deeplabv3_r101",
    description="CIRKD DeepLabV3-ResNet101 teacher (deep stem 64/64/128, ASPP 2048->512, aux; BGR mean, 8k grid)",
    roles=("teacher",),
)
def cirkd_deeplabv3_r101(num_classes: int = 19, **kwargs: Any) -> CIRKDDeepLabV3:
    return CIRKDDeepLabV3("resnet101", num_classes=num_classes, **kwargs)


@register_model("cirkd_deeplabv3_r18", description="CIRKD DeepLabV3-ResNet18 (deep stem, ASPP 512->512, aux 256->64)")
def cirkd_deeplabv3_r18(num_classes: int = 19, **kwargs: Any) -> CIRKDDeepLabV3:
    return CIRKDDeepLabV3("resnet18", num_classes=num_classes, **kwargs)


@register_model("cirkd_deeplabv3_mbv2", description="CIRKD DeepLabV3-MobileNetV2 (OS8 dilated, ASPP 320->128, no aux)")
def cirkd_deeplabv3_mbv2(num_classes: int = 19, **kwargs: Any) -> CIRKDDeepLabV3:
    return CIRKDDeepLabV3("mobilenetv2", num_classes=num_classes, **kwargs)


@register_model("cirkd_deeplabv3_r18_mini", description="CPU model: CIRKD DeepLabV3-ResNet18 at width 1/4, head 32")
def cirkd_deeplabv3_r18_mini(num_classes: int = 19, **kwargs: Any) -> CIRKDDeepLabV3:
    return CIRKDDeepLabV3("resnet18", num_classes=num_classes, **{"width": 0.25, "head_channels": 32, **kwargs})


@register_model("cirkd_deeplabv3_mbv2_mini", description="CPU model: CIRKD DeepLabV3-MobileNetV2 at width 1/2, head 32")
def cirkd_deeplabv3_mbv2_mini(num_classes: int = 19, **kwargs: Any) -> CIRKDDeepLabV3:
    return CIRKDDeepLabV3("mobilenetv2", num_classes=num_classes, **{"width": 0.5, "head_channels": 32, **kwargs})
