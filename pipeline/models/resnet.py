"""Deep-stem, dilated, output-stride-8 ResNets (the official SKD / CSAIL backbone).

Stem: conv3x3(3->64, s2)-BN-ReLU, conv3x3(64->64)-BN-ReLU, conv3x3(64->128)-BN-ReLU, then a 3x3/2
max-pool with ``ceil_mode=True``; so the grid is 8k+1 (65 for a 512 crop, see :func:`grid_size`).
Stages: strides 1/2/1/1, dilations 1/1/2/4 (every block of a dilated stage, padding = dilation), the
stride in the 3x3 conv, downsample = conv1x1(stride) + BN. Module names follow the CSAIL / official
checkpoints (``conv1, bn1, relu1, ..., maxpool, layer1..layer4``; ``layerL.B.conv{1,2,3}``,
``.bn{1,2,3}``, ``.downsample.0/.1``), and a segmentation model *inherits* this class so the keys sit
at the top level of its state dict, as in the official checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from pipeline.models.base import OFFICIAL_NORM, InputNorm, InputNormSpec, as_norm_spec

__all__ = ["BasicBlock", "Bottleneck", "DeepStemResNet", "he_init", "resnet_name", "scale_channels"]


def scale_channels(c: int, width: float) -> int:
    """``c`` scaled by a width multiplier, rounded, at least 4."""
    return max(4, round(c * width))


def he_init(module: nn.Module) -> None:
    """He (fan-out) init for convs, BN weight 1 / bias 0 (the torchvision / CSAIL convention)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs, both carrying the stage dilation (as in the official student)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4 channels)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_KNOWN_DEPTHS = {
    ("BasicBlock", (2, 2, 2, 2)): "resnet18",
    ("BasicBlock", (3, 4, 6, 3)): "resnet34",
    ("Bottleneck", (3, 4, 6, 3)): "resnet50",
    ("Bottleneck", (3, 4, 23, 3)): "resnet101",
    ("Bottleneck", (3, 8, 36, 3)): "resnet152",
}


def resnet_name(block: type[nn.Module], layers: Sequence[int], width: float = 1.0) -> str:
    """``resnet101``, ``resnet34x0.25``, or ``resnet(BasicBlock[1,1,1,1])x0.125`` for other layouts."""
    layers = tuple(layers)
    name = _KNOWN_DEPTHS.get((block.__name__, layers))
    if name is None:
        name = f"resnet({block.__name__}[{','.join(map(str, layers))}])"
    return name if width == 1.0 else f"{name}x{width:g}"


class DeepStemResNet(nn.Module):
    """The backbone, taking raw RGB pixels (0–255, NaN padding) like every model of the project.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage, e.g. ``(3, 4, 23, 3)``.
        width: channel multiplier for the stem and every stage (small CPU variants); channels are
            rounded and kept >= 4.
        norm: the input normalisation (default: the official BGR mean subtraction).

    Attributes:
        stage_channels: output channels of layer1..layer4.
    """

    backbone_prefixes = (
        "conv1.",
        "bn1.",
        "conv2.",
        "bn2.",
        "conv3.",
        "bn3.",
        "layer1.",
        "layer2.",
        "layer3.",
        "layer4.",
    )

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        *,
        width: float = 1.0,
        norm: InputNormSpec | str | dict = OFFICIAL_NORM,
    ):
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be 4 positive block counts, got {tuple(layers)}")
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        self.input_norm = InputNorm(as_norm_spec(norm))
        self.backbone_name = resnet_name(block, layers, width)
        s64, s128 = scale_channels(64, width), scale_channels(128, width)
        self.conv1 = conv3x3(3, s64, stride=2)
        self.bn1 = nn.BatchNorm2d(s64)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(s64, s64)
        self.bn2 = nn.BatchNorm2d(s64)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = conv3x3(s64, s128)
        self.bn3 = nn.BatchNorm2d(s128)
        self.relu3 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.inplanes = s128
        planes = [scale_channels(p, width) for p in (64, 128, 256, 512)]
        self.layer1 = self._make_layer(block, planes[0], layers[0], stride=1, dilation=1)
        self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2, dilation=1)
        self.layer3 = self._make_layer(block, planes[2], layers[2], stride=1, dilation=2)
        self.layer4 = self._make_layer(block, planes[3], layers[3], stride=1, dilation=4)
        self.stage_channels = tuple(p * block.expansion for p in planes)

    def _make_layer(self, block, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        mods = [block(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def init_weights(self) -> None:
        he_init(self)

    def forward_stages(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Raw pixels -> (x1, x2, x3, x4), the outputs of layer1..layer4 (x2..x4 at stride 8)."""
        x = self.input_norm(x)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.maxpool(x)
        x1 = self.layer1(x)
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        x4 = self.layer4(x3)
        return x1, x2, x3, x4

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.forward_stages(x)
