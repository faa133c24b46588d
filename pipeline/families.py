"""The model families' conventions: how each family's models see pixels and place their outputs.

Each family has its own input normalisation, output grid, resize convention and label ignore value;
:data:`FAMILIES` lists them and :func:`family_of` tells which one a model follows. A family's
architectures and their registered names live in one module of :mod:`pipeline.models`:

* ``skd`` (:mod:`~pipeline.models.pspnet`, :mod:`~pipeline.models.deeplab`,
  :mod:`~pipeline.models.mobilenet`): ``psp*``, ``deeplabv3_r18*``, ``mbv2*``;
* ``mmseg`` (:mod:`~pipeline.models.mmseg`): ``mmseg_{psp,deeplabv3}_{r101,r50}`` (teachers) and
  ``mmseg_{psp,deeplabv3}_r18`` (students), mmsegmentation's ``{pspnet,deeplabv3}_r*-d8`` Cityscapes
  configs, state-dict keys as its checkpoints store them (``backbone.*``, ``decode_head.*``,
  ``auxiliary_head.*``);
* ``cirkd`` (:mod:`~pipeline.models.cirkd`): ``cirkd_deeplabv3_r101`` (teacher),
  ``cirkd_deeplabv3_{r18,mbv2}`` (students), keys as CIRKD saves them (``pretrained.*``, ``head.*``,
  ``auxlayer.*``);
* ``*_mini``: the same layouts at reduced width, for CPU demos and tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from pipeline.models.base import OFFICIAL_NORM, InputNormSpec
from pipeline.models.cirkd import CIRKD_NORM
from pipeline.models.mmseg import MMSEG_NORM

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
