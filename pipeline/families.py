"""The mmsegmentation and CIRKD model families, registered in :mod:`pipeline.teachers`' registry.

Each family has its own input normalisation, output grid, resize convention and label ignore value;
:data:`FAMILIES` lists them and :func:`family_of` tells which one a model follows. Names:

* ``mmseg_{psp,deeplabv3}_{r101,r50}`` (teachers) and ``mmseg_{psp,deeplabv3}_r18`` (students):
  mmsegmentation's ``{pspnet,deeplabv3}_r*-d8`` Cityscapes configs, state-dict keys as its
  checkpoints store them (``backbone.*``, ``decode_head.*``, ``auxiliary_head.*``);
* ``cirkd_deeplabv3_r101`` (teacher), ``cirkd_deeplabv3_{r18,mbv2}`` (students): CIRKD's models,
  keys as CIRKD saves them (``pretrained.*``, ``head.*``, ``auxlayer.*``);
* ``*_mini``: the same layouts at reduced width, for CPU demos and tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from pipeline.models.base import OFFICIAL_NORM, InputNormSpec
from pipeline.models.cirkd import CIRKD_NORM, CIRKDDeepLabV3
from pipeline.models.mmseg import MMSEG_NORM, DilatedBasicBlock, MMSegEncoderDecoder
from pipeline.models.resnet import Bottleneck
from pipeline.teachers import register_model

__all__ = ["FAMILIES", "FamilyConvention", "family_of"]


@dataclass(frozen=True)
class FamilyConvention:
    """How a family's models see pixels and place their outputs.

    Attributes:
        grid: "8k+1" (ceil-mode stem pool: 65 for 512) or "8k" (floor mode: ``ceil(n/8)``, 64 for 512).
        align_corners: the family's bilinear convention when resizing logits to pixels.
        ignore_index: the label value its datasets ignore.
    """

    family: str
    grid: str
    align_corners: bool
    ignore_index: int
    normalization: InputNormSpec

    def to_dict(self) -> dict:
        d = asdict(self)
        d["normalization"] = self.normalization.to_dict()
        return d


FAMILIES = {
    "skd": FamilyConvention("skd", "8k+1", True, 255, OFFICIAL_NORM),
    "mmseg": FamilyConvention("mmseg", "8k", False, 255, MMSEG_NORM),
    "cirkd": FamilyConvention("cirkd", "8k", True, -1, CIRKD_NORM),
}


def family_of(model: nn.Module) -> FamilyConvention:
    """The model's family conventions (models without a ``family`` attribute are the ``skd`` family)."""
    name = getattr(model, "family", "skd")
    base = FAMILIES.get(name, FAMILIES["skd"])
    return FamilyConvention(
        family=name,
        grid=getattr(model, "grid_convention", base.grid),
        align_corners=bool(getattr(model, "align_corners", base.align_corners)),
        ignore_index=int(getattr(model, "ignore_index", base.ignore_index)),
        normalization=model.input_norm.spec if hasattr(model, "input_norm") else base.normalization,
    )


# ----------------------------------------------------------------------------------------------------
# mmsegmentation (configs/{pspnet,deeplabv3}/*_r{18,50,101}-d8_*cityscapes*)

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


# ----------------------------------------------------------------------------------------------------
# CIRKD (models/deeplabv3.py, models/deeplabv3_mobile.py)


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
