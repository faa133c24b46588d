"""Segmentation models. Each takes raw RGB pixels (0–255, NaN padding) and returns a ``SegOutput``.

Each architecture module registers its own names with :mod:`pipeline.registry` when imported (one
module per architecture family: ``pspnet``, ``deeplab``, ``mobilenet``, ``mmseg``, ``cirkd``);
importing this package registers them all. Create models with :func:`pipeline.registry.create_model`.
"""

from pipeline.models import cirkd, mmseg  # noqa: F401  (register the mmseg_* and cirkd_* names)
from pipeline.models.base import (
    CAFFE_BGR_MEAN,
    IMAGENET_NORM,
    OFFICIAL_NORM,
    InputNorm,
    InputNormSpec,
    SegModelMixin,
    SegOutput,
    as_norm_spec,
    grid_size,
)
from pipeline.models.deeplab import DeepLabV3
from pipeline.models.mobilenet import DeepLabV3MobileNetV2, MobileNetV2Backbone
from pipeline.models.pspnet import BNLeaky, PSPModule, PSPNet
from pipeline.models.resnet import BasicBlock, Bottleneck, DeepStemResNet

__all__ = [
    "CAFFE_BGR_MEAN",
    "IMAGENET_NORM",
    "OFFICIAL_NORM",
    "BNLeaky",
    "BasicBlock",
    "Bottleneck",
    "DeepLabV3",
    "DeepLabV3MobileNetV2",
    "DeepStemResNet",
    "InputNorm",
    "InputNormSpec",
    "MobileNetV2Backbone",
    "PSPModule",
    "PSPNet",
    "SegModelMixin",
    "SegOutput",
    "as_norm_spec",
    "grid_size",
]
