"""mmsegmentation's PSPNet and DeepLabV3 (``EncoderDecoder`` on ResNetV1c ``-d8``), key for key.

Everything here follows mmsegmentation 1.x (``mmseg/models/backbones/resnet.py``,
``mmseg/models/utils/res_layer.py``, ``decode_heads/{psp,aspp,fcn}_head.py``,
``decode_heads/decode_head.py``) with mmcv's ``ConvModule`` and the configs
``configs/_base_/models/{pspnet,deeplabv3}_r50-d8.py`` and their ``r18-d8`` / ``r101-d8`` variants:

* ``backbone``: ResNetV1c: deep stem ``stem.{0,3,6}`` conv3x3 (3->32 stride 2, 32->32, 32->64, no
  bias), ``stem.{1,4,7}`` BN, then a 3x3/2 max-pool (padding 1, **floor** mode); stages with strides
  1/2/1/1 and dilations 1/1/2/4, ``contract_dilation=True`` (the first block of a dilated stage
  uses half the dilation). Bottleneck: stride and dilation on the 3x3 conv ('pytorch' style).
  BasicBlock: stride and dilation on ``conv1`` only, ``conv2`` is never dilated. Downsample
  ``downsample.{0 conv1x1, 1 BN}``. Keys ``layerN.i.{conv,bn}{1,2,3}``.
* ``decode_head``: ``conv_seg`` (1x1 with bias, created first, so it is the head's first key) after
  ``Dropout2d(0.1)``. PSPHead: ``psp_modules.{i}.1`` (AdaptiveAvgPool(1/2/3/6) then a 1x1
  ``ConvModule``), upsampled bilinearly with ``align_corners=False`` and concatenated as
  ``[x, p1, p2, p3, p6]``, ``bottleneck`` 3x3 ``ConvModule``. ASPPHead: ``image_pool.1`` (global
  pooling then 1x1), ``aspp_modules.{0..3}`` (1x1, then 3x3 at dilations 12/24/36), concatenated
  as ``[pool, a1, a12, a24, a36]``, ``bottleneck`` 3x3.
* ``auxiliary_head``: FCNHead on stage 3 (``in_index=2``), ``num_convs=1``, ``concat_input=False``:
  ``convs.0`` 3x3 ``ConvModule``, ``conv_seg``.
* ``ConvModule`` = ``conv`` (no bias) + ``bn`` + ReLU, i.e. keys ``….conv.weight``, ``….bn.*``.

Input: RGB, ``(x - mean) / std`` with mean (123.675, 116.28, 103.53), std (58.395, 57.12, 57.375),
divided as mmseg's ``SegDataPreProcessor`` does (not multiplied by 1/std). Output grid: ``ceil(n/8)``
(64x128 for 512x1024, the "8k" convention); upsampling to pixels uses ``align_corners=False``.
The distillation ``feature`` is what ``conv_seg`` sees: the decode head's bottleneck output after
its ``Dropout2d`` (mmseg's ``_forward_feature`` in eval mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.base import IMAGENET_NORM, InputNorm, InputNormSpec, SegModelMixin, SegOutput, as_norm_spec
from pipeline.models.resnet import Bottleneck, he_init, scale_channels
from pipeline.registry import register_model

__all__ = [
    "MMSEG_NORM",
    "ASPPHead",
    "ConvModule",
    "DilatedBasicBlock",
    "DivInputNorm",
    "FCNHead",
    "MMSegEncoderDecoder",
    "PSPHead",
    "ResNetV1c",
    "depth_name",
    "grid_size_8k",
]

#: mmsegmentation's Cityscapes/ADE normalisation (``SegDataPreProcessor``, after ``bgr_to_rgb``).
MMSEG_NORM = IMAGENET_NORM


#: (block expansion, blocks per stage) -> ResNet depth.
_DEPTHS = {
    (1, (2, 2, 2, 2)): 18,
    (1, (3, 4, 6, 3)): 34,
    (4, (3, 4, 6, 3)): 50,
    (4, (3, 4, 23, 3)): 101,
    (4, (3, 8, 36, 3)): 152,
}


def grid_size_8k(n: int) -> int:
    """Output side for an input side ``n`` of a floor-mode output-stride-8 network: ``ceil(n / 8)``.

    Three stride-2 steps (3x3 conv padding 1, 3x3 max-pool padding 1 in floor mode, the strided
    stage), each giving ``floor((n - 1) / 2) + 1 = ceil(n / 2)``: 512 -> 64, 1024 -> 128, 65 -> 9.
    """
    for _ in range(3):
        n = (n + 1) // 2
    return n


class DivInputNorm(InputNorm):
    """:class:`InputNorm` that divides by ``std`` like mmseg's data preprocessor.

    ``InputNorm`` multiplies by ``1/std``; the two differ in the last bit of about half the inputs,
    so dividing keeps the first layer's input bit-identical to mmsegmentation's.
    """

    def __init__(self, spec: InputNormSpec):
        super().__init__(spec)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.spec.order == "BGR":
            x = x.flip(1)
        return torch.nan_to_num((x - self.mean) / self.std, nan=0.0)


class ConvModule(nn.Module):
    """mmcv's ``ConvModule`` with BN and ReLU: ``conv`` (no bias) -> ``bn`` -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, *, padding: int = 0, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.bn(self.conv(x)))


class DilatedBasicBlock(nn.Module):
    """BasicBlock with separate dilations for its two 3x3 convs (padding = dilation).

    mmseg's BasicBlock dilates ``conv1`` only (``conv2_dilation=1``); CIRKD's ``BasicBlockV1b`` gives
    ``conv2`` the stage's dilation (its ``previous_dilation``).
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride=1, dilation=1, downsample=None, conv2_dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=conv2_dilation, dilation=conv2_dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    """conv3x3 (no bias) + BN + ReLU, as three Sequential entries."""
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def downsample_for(block, inplanes: int, planes: int, stride: int) -> nn.Sequential | None:
    """``downsample.{0 conv1x1(stride), 1 BN}`` when the block changes shape, else None."""
    if stride == 1 and inplanes == planes * block.expansion:
        return None
    return nn.Sequential(
        nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False), nn.BatchNorm2d(planes * block.expansion)
    )


class ResNetV1c(nn.Module):
    """mmseg's ``ResNetV1c`` (deep stem, no avg-down) with the ``-d8`` strides and dilations.

    Args:
        block: :class:`DilatedBasicBlock` (depths 18/34) or :class:`pipeline.models.resnet.Bottleneck` (50/101/152).
        layers: blocks per stage.
        width: channel multiplier (small CPU variants; 1.0 is mmseg's model).
        strides, dilations: per stage (``-d8``: (1, 2, 1, 1) and (1, 1, 2, 4)).
        contract_dilation: the first block of a stage with dilation d > 1 uses d // 2.
    """

    def __init__(
        self,
        block,
        layers: Sequence[int],
        *,
        width: float = 1.0,
        strides: Sequence[int] = (1, 2, 1, 1),
        dilations: Sequence[int] = (1, 1, 2, 4),
        contract_dilation: bool = True,
    ):
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be 4 positive block counts, got {tuple(layers)}")
        stem = scale_channels(64, width)
        self.stem = nn.Sequential(*conv_bn(3, stem // 2, 2), *conv_bn(stem // 2, stem // 2), *conv_bn(stem // 2, stem))
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes, channels = stem, []
        for i, (n, stride, dilation) in enumerate(zip(layers, strides, dilations, strict=True)):
            planes = scale_channels(64 * 2**i, width)
            first = dilation // 2 if dilation > 1 and contract_dilation else dilation
            blocks = [block(inplanes, planes, stride, first, downsample_for(block, inplanes, planes, stride))]
            inplanes = planes * block.expansion
            blocks += [block(inplanes, planes, 1, dilation) for _ in range(1, n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            channels.append(inplanes)
        self.stage_channels = tuple(channels)
        self.name = depth_name("resnetv1c", block, layers, width)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = self.maxpool(self.stem(x))
        x1 = self.layer1(x)
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        return x1, x2, x3, self.layer4(x3)


def depth_name(prefix: str, block, layers: Sequence[int], width: float = 1.0) -> str:
    """``resnetv1c101``, ``resnetv1c18x0.25``, or ``resnetv1c[1,1,1,1]x0.125`` for other layouts."""
    depth = _DEPTHS.get((block.expansion, tuple(layers)))
    name = f"{prefix}{depth}" if depth else f"{prefix}[{','.join(map(str, layers))}]"
    return name if width == 1.0 else f"{name}x{width:g}"


class _DecodeHead(nn.Module):
    """mmseg's ``BaseDecodeHead`` part that holds weights: ``conv_seg`` after ``Dropout2d``."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward_feature(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Stage output -> (feature = dropout(bottleneck output), logits = conv_seg(feature))."""
        feature = self.dropout(self.forward_feature(x))
        return feature, self.conv_seg(feature)


class PSPHead(_DecodeHead):
    """mmseg's ``PSPHead``: ``psp_modules.{i}.1`` 1x1 ConvModules on pooled maps, ``bottleneck`` 3x3."""

    def __init__(self, cin: int, channels: int, num_classes: int, *, bins=(1, 2, 3, 6), dropout=0.1):
        super().__init__(channels, num_classes, dropout)
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), ConvModule(cin, channels)) for b in bins
        )
        self.bottleneck = ConvModule(cin + len(bins) * channels, channels, 3, padding=1)

    def forward_feature(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(m(x), size=size, mode="bilinear", align_corners=False) for m in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class ASPPHead(_DecodeHead):
    """mmseg's ``ASPPHead``: ``image_pool.1``, ``aspp_modules.{i}`` (1x1 for dilation 1), ``bottleneck`` 3x3."""

    def __init__(self, cin: int, channels: int, num_classes: int, *, dilations=(1, 12, 24, 36), dropout=0.1):
        super().__init__(channels, num_classes, dropout)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(cin, channels))
        self.aspp_modules = nn.ModuleList(
            ConvModule(cin, channels, 1) if d == 1 else ConvModule(cin, channels, 3, padding=d, dilation=d)
            for d in dilations
        )
        self.bottleneck = ConvModule((len(dilations) + 1) * channels, channels, 3, padding=1)

    def forward_feature(self, x: Tensor) -> Tensor:
        pool = F.interpolate(self.image_pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.bottleneck(torch.cat([pool, *(m(x) for m in self.aspp_modules)], dim=1))


class FCNHead(_DecodeHead):
    """mmseg's ``FCNHead`` as the auxiliary head: ``convs.{i}`` 3x3 ConvModules, no ``conv_cat``."""

    def __init__(self, cin: int, channels: int, num_classes: int, *, num_convs: int = 1, dropout=0.1):
        super().__init__(channels, num_classes, dropout)
        self.convs = nn.Sequential(
            *(ConvModule(cin if i == 0 else channels, channels, 3, padding=1) for i in range(num_convs))
        )

    def forward_feature(self, x: Tensor) -> Tensor:
        return self.convs(x)


_HEADS = {"psp": ("PSPNet", PSPHead), "aspp": ("DeepLabV3", ASPPHead)}


class MMSegEncoderDecoder(nn.Module, SegModelMixin):
    """mmseg's ``EncoderDecoder``: ``backbone`` + ``decode_head`` (+ ``auxiliary_head``).

    Args:
        block, layers, width: the :class:`ResNetV1c` backbone.
        head: "psp" (PSPNet) or "aspp" (DeepLabV3).
        num_classes: K.
        channels: decode-head channels (512 for R50/R101, 128 for mmseg's R18 configs): the
            distillation feature's channels.
        aux_channels: FCN auxiliary-head channels (256 for R50/R101, 64 for R18).
        aux: build ``auxiliary_head`` (its output is returned in training mode only).
        dropout: the heads' Dropout2d before ``conv_seg``.
        norm: input normalisation (default mmseg's RGB mean/std).

    Output (``SegOutput``): logits (B, K, h, w) = mmseg's ``decode_head.forward`` (before any
    resize), aux (train mode only), feature (B, channels, h, w); ``h = ceil(H / 8)``.
    """

    family = "mmseg"
    grid_convention = "8k"
    align_corners = False
    ignore_index = 255
    backbone_prefixes = ("backbone.",)

    def __init__(
        self,
        block,
        layers: Sequence[int],
        *,
        head: str = "psp",
        num_classes: int = 19,
        width: float = 1.0,
        channels: int = 512,
        aux_channels: int = 256,
        aux: bool = True,
        dropout: float = 0.1,
        norm: InputNormSpec | str | dict = MMSEG_NORM,
    ):
        super().__init__()
        if head not in _HEADS:
            raise ValueError(f"head must be one of {sorted(_HEADS)}, got {head!r}")
        kind, head_cls = _HEADS[head]
        self.input_norm = DivInputNorm(as_norm_spec(norm))
        self.backbone = ResNetV1c(block, layers, width=width)
        c3, c4 = self.backbone.stage_channels[2:]
        self.num_classes = int(num_classes)
        self.feature_channels = int(channels)
        self.decode_head = head_cls(c4, channels, num_classes, dropout=dropout)
        self.auxiliary_head = FCNHead(c3, aux_channels, num_classes, dropout=dropout) if aux else None
        self.architecture = f"mmseg {kind}({self.backbone.name}-d8, channels={channels}{', aux FCN' if aux else ''})"
        init_mmseg_weights(self)

    def grid(self, n: int) -> int:
        """Output side for an input side of ``n`` pixels: ``ceil(n / 8)``."""
        return grid_size_8k(n)

    def forward(self, x: Tensor) -> SegOutput:
        _, _, x3, x4 = self.backbone(self.input_norm(x))
        feature, logits = self.decode_head(x4)
        aux = self.auxiliary_head(x3)[1] if self.auxiliary_head is not None and self.training else None
        return SegOutput(logits, aux, feature)


def init_mmseg_weights(model: nn.Module) -> None:
    """He init for convs, BN 1/0, and N(0, 0.01) for every ``conv_seg`` (mmseg's decode-head init)."""
    he_init(model)
    for name, m in model.named_modules():
        if name.endswith("conv_seg"):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------------
# registered names (mmsegmentation's configs/{pspnet,deeplabv3}/*_r{18,50,101}-d8_*cityscapes*)

_R101, _R50, _R18 = (Bottleneck, (3, 4, 23, 3)), (Bottleneck, (3, 4, 6, 3)), (DilatedBasicBlock, (2, 2, 2, 2))
_WIDE = {"channels": 512, "aux_channels": 256}
_R18_HEADS = {"channels": 128, "aux_channels": 64}
_MINI = {"width": 0.25, "channels": 32, "aux_channels": 16}


def _mmseg(arch, head: str, num_classes: int, defaults: dict, kwargs: dict[str, Any]) -> MMSegEncoderDecoder:
    block, layers = arch
    return MMSegEncoderDecoder(block, layers, head=head, num_classes=num_classes, **{**defaults, **kwargs})


@register_model(
    "mmseg_psp_r101",
    description="mmseg PSPNet R101-d8 (ResNetV1c, PSP 2048->512, aux FCN 1024->256; RGB mean/std, 8k grid)",
    roles=("teacher",),
)
def mmseg_psp_r101(num_classes: int = 19, **kwargs: Any) -> MMSegEncoderDecoder:
    return _mmseg(_R101, "psp", num_classes, _WIDE, kwargs)


@register_model(
    "mmseg_psp_r50", description="mmseg PSPNet R50-d8 (ResNetV1c, PSP 2048->512, aux FCN)", roles=("teacher",)
)
def mmseg_psp_r50(num_classes: int = 19, **kwargs: Any) -> MMSegEncoderDecoder:
    return _mmseg(_R50, "psp", num_classes, _WIDE, kwargs)


@register_model(
    "mmseg_deeplabv3_r101",
    description="mmseg DeepLabV3 R101-d8 (ResNetV1c, ASPP 1/12/24/36 2048->512, aux FCN 1024->256)",
    roles=("teacher",),
)
def mmseg_deeplabv3_r101(num_classes: int = 19, **kwargs: Any) -> MMSegEncoderDecoder:
    return _mmseg(_R101, "aspp", num_classes, _WIDE, kwargs)


@register_model(
    "mmseg_deeplabv3_r50", description="mmseg DeepLabV3 R50-d8 (ResNetV1c, ASPP 2048->512, aux FCN)", roles=("teacher",)
)
def mmseg_deeplabv3_r50(num_classes: int = 19, **kwargs: Any) -> MMSegEncoderDecoder:
    return _mmseg(_R50, "aspp", num_classes, _WIDE, kwargs)


@register_model("mmseg_psp_r18", description="mmseg PSPNet R18-d8 (ResNetV1c, PSP 512->128, aux FCN 256->64)")
def mmseg_psp_r18(num_classes: int = 19, **kwargs: Any) -> MMSegEncoderDecoder:
    return _mmseg(_R18, "psp", num_classes, _R18_HEADS, kwargs)


@register_model("mmseg_deeplabv3_r18", description="mmseg DeepLabV3 R18-d8 (ResNetV1c, ASPP 512->128, aux FCN 256->64)")
def mmseg_deeplabv3_r18(num_classes: int = 19, **kwargs: Any) -> MMSegEncoderDecoder:
    return _mmseg(_R18, "aspp", num_classes, _R18_HEADS, kwargs)


@register_model("mmseg_psp_r18_mini", description="CPU model: mmseg PSPNet R18-d8 layout at width 1/4, head 32")
def mmseg_psp_r18_mini(num_classes: int = 19, **kwargs: Any) -> MMSegEncoderDecoder:
    return _mmseg(_R18, "psp", num_classes, _MINI, kwargs)


@register_model(
    "mmseg_deeplabv3_r18_mini", description="CPU model: mmseg DeepLabV3 R18-d8 layout at width 1/4, head 32"
)
def mmseg_deeplabv3_r18_mini(num_classes: int = 19, **kwargs: Any) -> MMSegEncoderDecoder:
    return _mmseg(_R18, "aspp", num_classes, _MINI, kwargs)
