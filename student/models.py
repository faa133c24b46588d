"""Students: one small factory over the project's single model registry (``pipeline.teachers``).

Every architecture is defined once in ``pipeline/models`` and registered there, so a student trained
here can later be loaded as a teacher by name (``skdcache build --teacher psp18 --weights run/model.safetensors``).
"""

from __future__ import annotations

import logging
import os

from torch import nn

from pipeline.teachers import ModelEntry, create_model, list_models, load_backbone_weights

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
    pretrained_format: str = "skd",
    **kwargs,
) -> nn.Module:
    """Build a student, optionally initialising its backbone from a local ImageNet checkpoint.

    Args:
        name: a registered model (see ``skdstudent students``) or ``package.module:factory``.
        pretrained: backbone weights (CSAIL deep-stem ResNet layout, e.g. ``resnet18-imagenet.pth``,
            or one of this project's checkpoints). Nothing is downloaded.

    Raises:
        ModelError, WeightsError: unknown name; a backbone checkpoint that does not fit (one line).
    """
    model = create_model(name, num_classes=num_classes, **kwargs)
    if pretrained is not None:
        report = load_backbone_weights(model, pretrained, weights_format=pretrained_format)
        logger.info("backbone of %s initialised from %s: %s", name, pretrained, report.summary())
    return model
