"""Segmentation models. Each takes raw RGB pixels (0–255, NaN padding) and returns a ``SegOutput``.

Register and create them through :mod:`pipeline.teachers` (the project's one model registry).
"""

from pipeline.models.base import (
    CAFFE_BGR_MEAN,
    IMAGENET_NORM,
    OFFICIAL_NORM,
    InputNorm,
    InputNormSpec,
    ModelSpec,
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
    "ModelSpec",
    "PSPModule",
    "PSPNet",
    "SegModelMixin",
    "SegOutput",
    "as_norm_spec",
    "grid_size",
]
