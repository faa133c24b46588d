"""Students: one small factory over the project's single model registry (:mod:`pipeline.registry`).

Every architecture is defined once in ``pipeline/models`` and registered there, so a student trained
here can later be loaded as a teacher by name (``skdcache build --teacher psp18 --weights run/model.safetensors``).
"""

from __future__ import annotations

import logging
import os

from torch import nn

from pipeline.registry import ModelEntry, create_model, list_models

__all__ = ["create_student", "list_students"]

logger = logging.getLogger(__name__)


def list_students() -> list[ModelEntry]:
    """Registered models that may be trained as students."""
    return list_models(role="student")


def create_student(
    name: str,
    *,
    num_classes: int,
    pretrained: str | os.PathLike | None = None,
    **kwargs,
) -> nn.Module:
    """Build a student, optionally initialising its backbone from a local ImageNet checkpoint.

    Args:
        name: a registered model (see ``skdstudent students``) or ``package.module:factory``.
        pretrained: a backbone file as its project publishes it, recognised from its keys
            (:func:`pipeline.recognize.load_backbone`): open-mmlab ``resnet*_v1c`` and timm deep-stem
            files for ``mmseg`` students, CIRKD's / CSAIL's deep-stem ``resnet*-imagenet.pth`` for
            ``cirkd`` and ``skd`` students, or the backbone of any recognised segmentation checkpoint.
            Nothing is downloaded; the log says what loaded and what stayed random.

    Raises:
        ModelError, WeightsError: unknown name; a backbone checkpoint that does not fit (one line).
    """
    model = create_model(name, num_classes=num_classes, **kwargs)
    if pretrained is not None:
        from pipeline.recognize import load_backbone

        report = load_backbone(model, pretrained)
        logger.info("backbone of %s initialised from %s: %s", name, pretrained, report.summary())
    return model
