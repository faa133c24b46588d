"""Shared pieces of every segmentation model: the output type, input normalisation, grid sizes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "CAFFE_BGR_MEAN",
    "InputNormSpec",
    "InputNorm",
    "SegOutput",
    "grid_size",
    "OFFICIAL_NORM",
    "IMAGENET_NORM",
    "SegModelMixin",
    "as_norm_spec",
]

#: Mean pixel (B, G, R) of the official SKD / pytorch-segmentation-toolbox pipelines.
CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)


class SegOutput(NamedTuple):
    """What every model returns.

    Attributes:
        logits: (B, K, h, w) class scores on the stride-8 grid, not upsampled.
        aux: (B, K, h, w) auxiliary (dsn) head, or None when the model has none or is in eval mode.
        feature: (B, C, h, w) the distillation feature (for PSPNet the PSP bottleneck output,
            after its Dropout2d, as in the official code's ``x_feat_after_psp``).
    """

    logits: Tensor
    aux: Tensor | None
    feature: Tensor


@dataclass(frozen=True)
class InputNormSpec:
    """How a model wants its pixels: channel order, then ``(x - mean) / std`` per channel.

    ``mean`` and ``std`` are given in the model's channel order, in 0–255 units.
    """

    order: str  # "RGB" or "BGR"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> InputNormSpec:
        return cls(order=str(d["order"]), mean=tuple(map(float, d["mean"])), std=tuple(map(float, d["std"])))


#: The official SKD normalisation: OpenCV BGR, 0–255, mean subtraction, no std division.
OFFICIAL_NORM = InputNormSpec(order="BGR", mean=CAFFE_BGR_MEAN, std=(1.0, 1.0, 1.0))
#: torchvision-style ImageNet normalisation, in 0–255 units.
IMAGENET_NORM = InputNormSpec(order="RGB", mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))


class InputNorm(nn.Module):
    """Raw RGB pixels (0–255, NaN where padded) -> the model's normalised input.

    Padding is NaN in raw space and becomes exactly 0 after normalisation, which is what the
    official pipeline does (it pads with 0 *after* subtracting the mean). Doing it here lets a
    teacher and a student that normalise differently share one padded crop.
    """

    def __init__(self, spec: InputNormSpec):
        super().__init__()
        if spec.order not in ("RGB", "BGR"):
            raise ValueError(f"channel order must be 'RGB' or 'BGR', got {spec.order!r}")
        self.spec = spec
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.spec.order == "BGR":
            x = x.flip(1)
        x = (x - self.mean) * self.inv_std
        return torch.nan_to_num(x, nan=0.0)


def _conv_out(n: int, kernel: int, stride: int, pad: int, ceil: bool = False) -> int:
    v = (n + 2 * pad - kernel) / stride
    return (math.ceil(v) if ceil else math.floor(v)) + 1


def grid_size(n: int) -> int:
    """Output size of the deep-stem, ceil-mode, output-stride-8 ResNets for an input of ``n`` pixels.

    3x3/2 conv, then 3x3/2 max-pool with ``ceil_mode=True``, then the stride-2 layer2: 512 -> 65,
    1024 -> 129, 2048 -> 257 (an 8k+1 grid).
    """
    n = _conv_out(n, 3, 2, 1)
    n = _conv_out(n, 3, 2, 1, ceil=True)
    # ceil-mode pooling drops a last window that would start in the padding
    return _conv_out(n, 3, 2, 1)


def as_norm_spec(norm: InputNormSpec | str | dict) -> InputNormSpec:
    """An :class:`InputNormSpec` from a spec, a dict (``to_dict`` form) or a name ("official", "imagenet")."""
    if isinstance(norm, InputNormSpec):
        return norm
    if isinstance(norm, dict):
        return InputNormSpec.from_dict(norm)
    named = {"official": OFFICIAL_NORM, "imagenet": IMAGENET_NORM}
    if isinstance(norm, str) and norm.lower() in named:
        return named[norm.lower()]
    raise ValueError(f"unknown input normalisation {norm!r}; give 'official', 'imagenet' or an InputNormSpec")


class SegModelMixin:
    """Attributes every project segmentation model carries.

    Mix it in *after* the backbone class (``class PSPNet(DeepStemResNet, SegModelMixin)``) so the
    backbone's ``grid`` and ``backbone_prefixes`` win over the defaults here.

    A model sets ``self.input_norm`` (its first module), ``num_classes``, ``feature_channels`` and
    ``architecture`` in its constructor; :func:`pipeline.registry.create_model` stamps ``model_name``.
    ``backbone_prefixes`` lists the state-dict prefixes of the ImageNet-initialisable backbone.
    """

    model_name: str | None = None
    architecture: str = "unknown"
    num_classes: int
    feature_channels: int
    backbone_prefixes: tuple[str, ...] = ()

    def grid(self, n: int) -> int:
        """Output grid size (logits, aux and feature) for an input side of ``n`` pixels."""
        return grid_size(n)

    def output_grid(self, h: int, w: int) -> tuple[int, int]:
        """(h, w) of the outputs for an (h, w) input, from the arithmetic (no forward)."""
        return self.grid(h), self.grid(w)

    @property
    def norm_spec(self) -> InputNormSpec:
        return self.input_norm.spec  # type: ignore[attr-defined]
