"""Teachers whose outputs are not finite, for ``--teacher tests.catalogue.bad_teachers:FACTORY``.

Each is :class:`tests.pipeline.custom_teacher.TinySeg` with NaN or infinity written into one output
(after the body, so the random-weights batch-norm calibration is unaffected). ``POISON_ABOVE``
limits the damage to crops whose mean pixel value is above it (``None``: every crop), so a test can
poison one chosen image and see the images before it stored.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pipeline.models.base import SegOutput
from tests.pipeline.custom_teacher import TinySeg

#: Poison only crops whose mean pixel value (0-255) is above this; None poisons every crop.
POISON_ABOVE: float | None = None


class PoisonedSeg(TinySeg):
    """TinySeg whose ``target`` output ("logits" or "feature") holds ``value`` on poisoned crops."""

    def __init__(self, num_classes: int, target: str, value: float):
        super().__init__(num_classes)
        self.target = target
        self.value = value

    def forward(self, x: Tensor) -> SegOutput:
        out = super().forward(x)
        hit = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        if POISON_ABOVE is not None:
            hit = x.float().mean(dim=(1, 2, 3)) > POISON_ABOVE
        logits, feature = out.logits, out.feature
        if self.target == "logits":
            logits = torch.where(hit[:, None, None, None], torch.full_like(logits, self.value), logits)
        else:
            feature = torch.where(hit[:, None, None, None], torch.full_like(feature, self.value), feature)
        return SegOutput(logits, out.aux, feature)


def nan_logits(num_classes: int = 19) -> PoisonedSeg:
    return PoisonedSeg(num_classes, "logits", math.nan)


def inf_logits(num_classes: int = 19) -> PoisonedSeg:
    return PoisonedSeg(num_classes, "logits", math.inf)


def nan_features(num_classes: int = 19) -> PoisonedSeg:
    return PoisonedSeg(num_classes, "feature", math.nan)


def inf_features(num_classes: int = 19) -> PoisonedSeg:
    return PoisonedSeg(num_classes, "feature", -math.inf)
