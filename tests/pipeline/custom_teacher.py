"""A model defined outside the registry, for the ``package.module:factory`` path test.

It honours the model contract (``input_norm`` first, raw pixels in, ``SegOutput`` out) but carries
none of the optional attributes (``feature_channels``, ``architecture``), so the registry has to
probe it.
"""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.models.base import IMAGENET_NORM, InputNorm, SegOutput


class TinySeg(nn.Module):
    def __init__(self, num_classes: int, channels: int = 8):
        super().__init__()
        self.input_norm = InputNorm(IMAGENET_NORM)
        self.body = nn.Sequential(nn.Conv2d(3, channels, 3, stride=8, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> SegOutput:
        feature = self.body(self.input_norm(x))
        return SegOutput(self.cls(feature), None, feature)


def make(num_classes: int = 19, **kwargs) -> TinySeg:
    return TinySeg(num_classes, **kwargs)
