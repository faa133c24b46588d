"""PSPNet exactly as the official SKD teacher and student (skd_spec §1.1, §2.1).

Key names equal the official checkpoint after the official renaming (``head.0.`` -> ``pspmodule.``,
``head.1.`` -> ``head.``): ``pspmodule.stages.{i}.{1 conv, 2 bn}``, ``pspmodule.bottleneck.{0 conv,
1 bn, 2 dropout}``, ``head.{weight,bias}``, ``dsn.{0 conv, 1 bn, 3 conv}``; the backbone keys sit at the
top level (``conv1.weight``, ``layer4.2.bn3.running_var``, ...).

The official InPlace-ABN layers with the default activation are :class:`BNLeaky`: one BatchNorm2d
followed by LeakyReLU(0.01), so its state-dict keys are exactly those of an ABN layer. The backbone
uses plain BN + ReLU (the official ``activation='none'`` ABN plus an explicit ReLU).
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

__all__ = ["BNLeaky", "PSPModule", "PSPNet"]


class BNLeaky(nn.BatchNorm2d):
    """BatchNorm2d followed by LeakyReLU(0.01): InPlace-ABN's default, with plain BN parameters.

    Official InPlace-ABN weights must first be converted with ``weight := |weight| + 1e-5``
    (:func:`pipeline.weights.convert_official_state_dict` does it).
    """

    slope = 0.01

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(super().forward(x), self.slope)


class PSPModule(nn.Module):
    """Pyramid pooling: bins (1, 2, 3, 6), each AvgPool -> conv1x1 -> BN+LeakyReLU, upsampled
    (bilinear, align_corners=True), concatenated as [priors..., x], then conv3x3 -> BN+LeakyReLU ->
    Dropout2d(0.1)."""

    def __init__(self, features: int, out_features: int = 512, sizes: Sequence[int] = (1, 2, 3, 6), dropout=0.1):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(size),
                nn.Conv2d(features, out_features, 1, bias=False),
                BNLeaky(out_features),
            )
            for size in sizes
        )
        self.bottleneck = nn.Sequential(
            nn.Conv2d(features + len(sizes) * out_features, out_features, 3, padding=1, bias=False),
            BNLeaky(out_features),
            nn.Dropout2d(dropout),
        )

    def forward(self, feats: Tensor) -> Tensor:
        h, w = feats.shape[-2:]
        priors = [
            F.interpolate(stage(feats), size=(h, w), mode="bilinear", align_corners=True) for stage in self.stages
        ]
        return self.bottleneck(torch.cat([*priors, feats], dim=1))


class PSPNet(DeepStemResNet, SegModelMixin):
    """Deep-stem dilated ResNet + PSP head + optional ``dsn`` auxiliary head on layer3.

    Args:
        block, layers, width, norm: the backbone (see :class:`DeepStemResNet`).
        num_classes: K.
        psp_out: PSP branch and bottleneck channels, i.e. the distillation feature's channels
            (official: 512 for ResNet-101, 128 for ResNet-18).
        dsn_channels: hidden channels of the aux head (default ``psp_out``, as officially).
        aux: build the ``dsn`` head (its output is returned in training mode only).
        bins: PSP pooling bins.
        dropout: Dropout2d rate in the PSP bottleneck and the dsn head.

    Output (``SegOutput``): logits (B, K, h, w), aux (train mode only), feature (B, psp_out, h, w) =
    the PSP bottleneck output after Dropout2d (``x_feat_after_psp``); ``h = grid_size(H)``.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        *,
        num_classes: int = 19,
        width: float = 1.0,
        psp_out: int = 512,
        dsn_channels: int | None = None,
        aux: bool = True,
        bins: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm: InputNormSpec | str | dict = OFFICIAL_NORM,
    ):
        super().__init__(block, layers, width=width, norm=norm)
        c3, c4 = self.stage_channels[2], self.stage_channels[3]
        self.num_classes = int(num_classes)
        self.feature_channels = int(psp_out)
        self.pspmodule = PSPModule(c4, psp_out, bins, dropout)
        self.head = nn.Conv2d(psp_out, num_classes, 1, bias=True)
        self.dsn: nn.Sequential | None = None
        if aux:
            dsn_channels = dsn_channels or psp_out
            self.dsn = nn.Sequential(
                nn.Conv2d(c3, dsn_channels, 3, padding=1, bias=True),
                BNLeaky(dsn_channels),
                nn.Dropout2d(dropout),
                nn.Conv2d(dsn_channels, num_classes, 1, bias=True),
            )
        self.architecture = f"PSPNet({self.backbone_name}, psp_out={psp_out}{', dsn' if aux else ''})"
        self.init_weights()

    def forward(self, x: Tensor) -> SegOutput:
        _, _, x3, x4 = self.forward_stages(x)
        aux = self.dsn(x3) if self.dsn is not None and self.training else None
        feature = self.pspmodule(x4)
        return SegOutput(self.head(feature), aux, feature)


# ----------------------------------------------------------------------------------------------------
# registered names


def _psp(block, layers, num_classes: int, defaults: dict, kwargs: dict) -> PSPNet:
    return PSPNet(block, layers, num_classes=num_classes, **{**defaults, **kwargs})


@register_model(
    "psp101",
    description="PSPNet-ResNet101, the official SKD teacher (Bottleneck [3,4,23,3], PSP 2048->512, dsn; 70.44 M)",
    roles=("teacher",),
)
def psp101(num_classes: int = 19, **kwargs: Any) -> PSPNet:
    return _psp(Bottleneck, (3, 4, 23, 3), num_classes, {"psp_out": 512}, kwargs)


@register_model("psp50", description="PSPNet-ResNet50 (Bottleneck [3,4,6,3], PSP 2048->512, dsn)")
def psp50(num_classes: int = 19, **kwargs: Any) -> PSPNet:
    return _psp(Bottleneck, (3, 4, 6, 3), num_classes, {"psp_out": 512}, kwargs)


@register_model("psp34", description="PSPNet-ResNet34 (BasicBlock [3,4,6,3], PSP 512->128, dsn)")
def psp34(num_classes: int = 19, **kwargs: Any) -> PSPNet:
    return _psp(BasicBlock, (3, 4, 6, 3), num_classes, {"psp_out": 128}, kwargs)


@register_model(
    "psp18", description="PSPNet-ResNet18, the official SKD student (BasicBlock [2,2,2,2], PSP 512->128, dsn; 13.07 M)"
)
def psp18(num_classes: int = 19, **kwargs: Any) -> PSPNet:
    return _psp(BasicBlock, (2, 2, 2, 2), num_classes, {"psp_out": 128}, kwargs)


@register_model("psp34_mini", description="CPU demo teacher: PSPNet, ResNet-34 layout at width 1/4, PSP out 64")
def psp34_mini(num_classes: int = 19, **kwargs: Any) -> PSPNet:
    return _psp(BasicBlock, (3, 4, 6, 3), num_classes, {"width": 0.25, "psp_out": 64}, kwargs)


@register_model("psp18_mini", description="CPU demo student: PSPNet, ResNet-18 layout at width 1/4, PSP out 32")
def psp18_mini(num_classes: int = 19, **kwargs: Any) -> PSPNet:
    return _psp(BasicBlock, (2, 2, 2, 2), num_classes, {"width": 0.25, "psp_out": 32}, kwargs)


@register_model("psp_tiny", description="test model: PSPNet, BasicBlock [1,1,1,1] at width 1/8, PSP out 16")
def psp_tiny(num_classes: int = 19, **kwargs: Any) -> PSPNet:
    return _psp(BasicBlock, (1, 1, 1, 1), num_classes, {"width": 0.125, "psp_out": 16}, kwargs)
