"""The mmsegmentation and CIRKD families: key layouts, grids, normalisation, and forwards re-derived
from the reference projects' rules (mmsegmentation 1.2.2 / mmcv 2.x; CIRKD ``models/``).

The expected key lists and the functional forwards below are written from the reference sources'
naming and computation rules, independently of :mod:`pipeline.models.mmseg` / ``cirkd``. When
mmsegmentation is importable, the models are also compared with mmseg's own modules.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import families
from pipeline.models.cirkd import CIRKDDeepLabV3
from pipeline.models.mmseg import DilatedBasicBlock, MMSegEncoderDecoder, grid_size_8k
from pipeline.models.resnet import Bottleneck
from pipeline.registry import _REGISTRY, create_model, list_models
from pipeline.teachers import create_teacher
from pipeline.weights import load_weights


def test_each_family_module_registers_its_own_names():
    # a family is one module plus its registrations: each name's factory lives beside its architecture
    where = {name: entry.factory.__module__ for name, entry in _REGISTRY.items()}
    assert {n for n, m in where.items() if m == "pipeline.models.mmseg"} == {n for n in where if n.startswith("mmseg_")}
    assert {n for n, m in where.items() if m == "pipeline.models.cirkd"} == {n for n in where if n.startswith("cirkd_")}
    assert {n for n, m in where.items() if m == "pipeline.models.pspnet"} == {n for n in where if n.startswith("psp")}
    assert where["deeplabv3_r18"] == where["deeplabv3_r18_mini"] == "pipeline.models.deeplab"
    assert where["mbv2"] == where["mbv2_mini"] == "pipeline.models.mobilenet"


MMSEG_MEAN, MMSEG_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
CAFFE_BGR = (104.00698793, 116.66876762, 122.67891434)
FULL = {
    # name: (family, head, block kind, layers, head channels, aux channels)
    "mmseg_psp_r101": ("mmseg", "psp", "bottleneck", (3, 4, 23, 3), 512, 256),
    "mmseg_psp_r50": ("mmseg", "psp", "bottleneck", (3, 4, 6, 3), 512, 256),
    "mmseg_deeplabv3_r101": ("mmseg", "aspp", "bottleneck", (3, 4, 23, 3), 512, 256),
    "mmseg_deeplabv3_r50": ("mmseg", "aspp", "bottleneck", (3, 4, 6, 3), 512, 256),
    "mmseg_psp_r18": ("mmseg", "psp", "basic", (2, 2, 2, 2), 128, 64),
    "mmseg_deeplabv3_r18": ("mmseg", "aspp", "basic", (2, 2, 2, 2), 128, 64),
    "cirkd_deeplabv3_r101": ("cirkd", "aspp", "bottleneck", (3, 4, 23, 3), 512, 256),
    "cirkd_deeplabv3_r18": ("cirkd", "aspp", "basic", (2, 2, 2, 2), 512, 64),
    "cirkd_deeplabv3_mbv2": ("cirkd", "aspp", "mbv2", None, 128, None),
}
MINI = ["mmseg_psp_r18_mini", "mmseg_deeplabv3_r18_mini", "cirkd_deeplabv3_r18_mini", "cirkd_deeplabv3_mbv2_mini"]
#: Parameter counts of the same configs built by mmsegmentation 1.2.2 (``MODELS.build`` of the
#: ``*_r{18,50,101}-d8`` Cityscapes configs) and by CIRKD's ``DeepLabV3`` classes, measured once.
REFERENCE_PARAMS = {
    "mmseg_psp_r18": 12_790_086,
    "mmseg_deeplabv3_r18": 13_986_374,
    "mmseg_psp_r50": 48_975_494,
    "mmseg_psp_r101": 67_967_622,
    "mmseg_deeplabv3_r101": 87_105_158,
    "cirkd_deeplabv3_r18": 22_762_918,
    "cirkd_deeplabv3_mbv2": 3_233_171,
    "cirkd_deeplabv3_r101": 79_084_262,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str) -> nn.Module:
    with torch.device("meta"):
        return create_model(name)


# ----------------------------------------------------------------------------------------------------
# key names, derived from the reference projects' naming rules


def _bn(prefix: str) -> list[str]:
    return [prefix + s for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def _conv_bn(conv: str, bn: str) -> list[str]:
    return [conv + "weight", *_bn(bn)]


def _resnet_keys(prefix: str, kind: str, layers, stem_downsamples_layer1: bool) -> list[str]:
    keys = []
    convs = 3 if kind == "bottleneck" else 2
    for i, n in enumerate(layers, start=1):
        for b in range(n):
            p = f"{prefix}layer{i}.{b}."
            for c in range(1, convs + 1):
                keys += _conv_bn(f"{p}conv{c}.", f"{p}bn{c}.")
            # a downsample where the shape changes: stride (layer2) or channels (layer1 when the stem
            # width differs from the block output, every stage's first bottleneck)
            if b == 0 and (i > 1 or kind == "bottleneck" or stem_downsamples_layer1):
                keys += _conv_bn(f"{p}downsample.0.", f"{p}downsample.1.")
    return keys


def mmseg_keys(head: str, kind: str, layers) -> set[str]:
    """mmseg ``EncoderDecoder`` keys: ResNetV1c ``stem.{0,1,3,4,6,7}``, heads of ConvModules."""
    keys = [k for i in (0, 3, 6) for k in _conv_bn(f"backbone.stem.{i}.", f"backbone.stem.{i + 1}.")]
    keys += _resnet_keys("backbone.", kind, layers, stem_downsamples_layer1=False)
    cm = lambda p: _conv_bn(p + "conv.", p + "bn.")  # noqa: E731 - mmcv ConvModule
    keys += ["decode_head.conv_seg.weight", "decode_head.conv_seg.bias"]
    if head == "psp":
        keys += [k for i in range(4) for k in cm(f"decode_head.psp_modules.{i}.1.")]
    else:
        keys += cm("decode_head.image_pool.1.") + [k for i in range(4) for k in cm(f"decode_head.aspp_modules.{i}.")]
    keys += cm("decode_head.bottleneck.")
    keys += ["auxiliary_head.conv_seg.weight", "auxiliary_head.conv_seg.bias", *cm("auxiliary_head.convs.0.")]
    return set(keys)


def cirkd_keys(kind: str, layers) -> set[str]:
    """CIRKD ``DeepLabV3`` keys: ``pretrained.*`` backbone, ``head.aspp.*``, ``head.block``, ``auxlayer``."""
    keys = []
    if kind == "mbv2":
        keys += _conv_bn("pretrained.net.features.0.0.", "pretrained.net.features.0.1.")
        for i in range(1, 18):
            p = f"pretrained.net.features.{i}.conv."
            idx = (0, 3) if i == 1 else (0, 3, 6)  # t=1 block: dw, pw; others: pw, dw, pw-linear
            keys += [k for j in idx for k in _conv_bn(f"{p}{j}.", f"{p}{j + 1}.")]
    else:
        keys += [k for i in (1, 2, 3) for k in _conv_bn(f"pretrained.conv{i}.", f"pretrained.bn{i}.")]
        keys += _resnet_keys("pretrained.", kind, layers, stem_downsamples_layer1=True)
        keys += [k for k in _conv_bn("auxlayer.block.0.", "auxlayer.block.1.")] + ["auxlayer.block.4.weight"]
        keys += ["auxlayer.block.4.bias"]
    a = "head.aspp."
    keys += _conv_bn(a + "b0.0.", a + "b0.1.") + _conv_bn(a + "b4.gap.1.", a + "b4.gap.2.")
    keys += [k for i in (1, 2, 3) for k in _conv_bn(f"{a}b{i}.block.0.", f"{a}b{i}.block.1.")]
    keys += _conv_bn(a + "project.0.", a + "project.1.") + _conv_bn("head.block.0.", "head.block.1.")
    return set(keys + ["head.block.4.weight", "head.block.4.bias"])


@pytest.mark.parametrize("name", sorted(FULL))
def test_state_dict_keys_equal_the_reference_naming(name):
    family, head, kind, layers, _, _ = FULL[name]
    expected = mmseg_keys(head, kind, layers) if family == "mmseg" else cirkd_keys(kind, layers)
    assert set(meta_model(name).state_dict()) == expected


SHAPES = {
    "mmseg_psp_r101": {
        "backbone.stem.0.weight": (32, 3, 3, 3),
        "backbone.stem.3.weight": (32, 32, 3, 3),
        "backbone.stem.6.weight": (64, 32, 3, 3),
        "backbone.layer1.0.conv1.weight": (64, 64, 1, 1),
        "backbone.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "backbone.layer4.2.conv3.weight": (2048, 512, 1, 1),
        "decode_head.psp_modules.0.1.conv.weight": (512, 2048, 1, 1),
        "decode_head.psp_modules.3.1.bn.running_var": (512,),
        "decode_head.bottleneck.conv.weight": (512, 4096, 3, 3),
        "decode_head.conv_seg.weight": (19, 512, 1, 1),
        "auxiliary_head.convs.0.conv.weight": (256, 1024, 3, 3),
        "auxiliary_head.conv_seg.bias": (19,),
    },
    "mmseg_deeplabv3_r18": {
        "backbone.stem.7.weight": (64,),
        "backbone.layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "decode_head.image_pool.1.conv.weight": (128, 512, 1, 1),
        "decode_head.aspp_modules.0.conv.weight": (128, 512, 1, 1),
        "decode_head.aspp_modules.3.conv.weight": (128, 512, 3, 3),
        "decode_head.bottleneck.conv.weight": (128, 640, 3, 3),
        "auxiliary_head.convs.0.conv.weight": (64, 256, 3, 3),
    },
    "cirkd_deeplabv3_r101": {
        "pretrained.conv1.weight": (64, 3, 3, 3),
        "pretrained.conv3.weight": (128, 64, 3, 3),
        "pretrained.layer1.0.downsample.0.weight": (256, 128, 1, 1),
        "head.aspp.b0.0.weight": (512, 2048, 1, 1),
        "head.aspp.b3.block.0.weight": (512, 2048, 3, 3),
        "head.aspp.b4.gap.1.weight": (512, 2048, 1, 1),
        "head.aspp.project.0.weight": (512, 2560, 1, 1),
        "head.block.0.weight": (512, 512, 3, 3),
        "head.block.4.weight": (19, 512, 1, 1),
        "auxlayer.block.0.weight": (256, 1024, 3, 3),
        "auxlayer.block.4.weight": (19, 256, 1, 1),
    },
    "cirkd_deeplabv3_r18": {
        "pretrained.layer1.0.downsample.0.weight": (64, 128, 1, 1),
        "head.aspp.b1.block.0.weight": (512, 512, 3, 3),
        "auxlayer.block.0.weight": (64, 256, 3, 3),
    },
    "cirkd_deeplabv3_mbv2": {
        "pretrained.net.features.0.0.weight": (32, 3, 3, 3),
        "pretrained.net.features.1.conv.0.weight": (32, 1, 3, 3),
        "pretrained.net.features.17.conv.6.weight": (320, 960, 1, 1),
        "head.aspp.b0.0.weight": (128, 320, 1, 1),
        "head.aspp.project.0.weight": (128, 640, 1, 1),
        "head.block.4.weight": (19, 128, 1, 1),
    },
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_spot_checked_shapes(name):
    sd = meta_model(name).state_dict()
    assert {k: tuple(sd[k].shape) for k in SHAPES[name]} == SHAPES[name]


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_counts_equal_the_reference_builds(name):
    model = meta_model(name)
    assert n_params(model) == REFERENCE_PARAMS[name]
    assert model.feature_channels == FULL[name][4]


def test_registry_roles_and_conventions():
    family_of = families.family_of
    teachers = {e.name for e in list_models("teacher")}
    students = {e.name for e in list_models("student")}
    assert {"mmseg_psp_r101", "mmseg_psp_r50", "mmseg_deeplabv3_r101", "cirkd_deeplabv3_r101"} <= teachers
    assert {"mmseg_psp_r18", "mmseg_deeplabv3_r18", "cirkd_deeplabv3_r18", "cirkd_deeplabv3_mbv2"} <= students
    mm, ck = family_of(meta_model("mmseg_psp_r18")), family_of(meta_model("cirkd_deeplabv3_r18"))
    assert (mm.family, mm.grid, mm.align_corners, mm.ignore_index) == ("mmseg", "8k", False, 255)
    assert (mm.normalization.order, mm.normalization.mean, mm.normalization.std) == ("RGB", MMSEG_MEAN, MMSEG_STD)
    assert (ck.family, ck.grid, ck.align_corners, ck.ignore_index) == ("cirkd", "8k", True, -1)
    assert (ck.normalization.order, ck.normalization.mean, ck.normalization.std) == ("BGR", CAFFE_BGR, (1.0,) * 3)
    assert family_of(meta_model("psp18")) == families.FAMILIES["skd"]
    assert families.FAMILIES["mmseg"].to_dict()["normalization"]["mean"] == list(MMSEG_MEAN)


# ----------------------------------------------------------------------------------------------------
# grids and the model contract


def test_grid_is_ceil_of_an_eighth():
    assert [grid_size_8k(n) for n in (512, 1024, 2048, 65, 64, 97, 1)] == [64, 128, 256, 9, 8, 13, 1]


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_grid_is_64x128_for_512x1024(name):
    model = meta_model(name)
    out = model.train()(torch.empty(2, 3, 512, 1024, device="meta"))
    assert model.output_grid(512, 1024) == (64, 128) == tuple(out.logits.shape[-2:])
    assert out.feature.shape[1] == model.feature_channels == FULL[name][4]
    assert (out.aux is None) == (FULL[name][5] is None)


@pytest.mark.parametrize("name", MINI)
@pytest.mark.parametrize("size", [(65, 65), (64, 128)])
def test_forward_gives_the_documented_grid(name, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5)
    h, w = (-(-s // 8) for s in size)
    assert model.output_grid(*size) == (h, w)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, *size) * 255)
    assert out.logits.shape == (2, 5, h, w) and out.aux is None
    assert out.feature.shape == (2, model.feature_channels, h, w)
    model.train()
    out = model(torch.rand(2, 3, *size) * 255)
    has_aux = "mbv2" not in name
    assert (out.aux is not None) == has_aux
    if has_aux:
        assert out.aux.shape == (2, 5, h, w)


def test_mmseg_dilations_pool_and_blocks():
    model = meta_model("mmseg_psp_r101")
    bb = model.backbone
    assert not bb.maxpool.ceil_mode and bb.maxpool.padding == 1
    assert bb.layer2[0].conv2.stride == (2, 2) and bb.layer2[0].conv1.stride == (1, 1)  # 'pytorch' style
    assert [bb.layer3[i].conv2.dilation for i in (0, 1)] == [(1, 1), (2, 2)]  # contract_dilation
    assert [bb.layer4[i].conv2.dilation for i in (0, 1)] == [(2, 2), (4, 4)]
    r18 = meta_model("mmseg_psp_r18").backbone
    assert [r18.layer4[i].conv1.dilation for i in (0, 1)] == [(2, 2), (4, 4)]
    assert {r18.layer4[i].conv2.dilation for i in (0, 1)} == {(1, 1)}  # mmseg never dilates conv2
    assert isinstance(model.decode_head.dropout, nn.Dropout2d) and model.decode_head.dropout.p == 0.1


def test_cirkd_dilations():
    r18 = meta_model("cirkd_deeplabv3_r18").pretrained
    assert not r18.maxpool.ceil_mode
    assert [(r18.layer3[i].conv1.dilation, r18.layer3[i].conv2.dilation) for i in (0, 1)] == [((1, 1), (2, 2))] + [
        ((2, 2), (2, 2))
    ]
    assert [(r18.layer4[i].conv1.dilation, r18.layer4[i].conv2.dilation) for i in (0, 1)] == [((2, 2), (4, 4))] + [
        ((4, 4), (4, 4))
    ]
    feats = meta_model("cirkd_deeplabv3_mbv2").pretrained.net.features
    dw = {i: feats[i].conv[3] for i in range(2, 18)}
    assert [(dw[i].stride, dw[i].dilation) for i in (4, 7, 8, 13, 14, 15, 17)] == [
        ((2, 2), (1, 1)),
        ((1, 1), (1, 1)),
        ((1, 1), (2, 2)),
        ((1, 1), (2, 2)),
        ((1, 1), (2, 2)),
        ((1, 1), (4, 4)),
        ((1, 1), (4, 4)),
    ]


def test_normalisation_matches_each_project():
    rgb = torch.randint(0, 256, (1, 3, 7, 9)).float()
    rgb[0, :, 0, 0] = float("nan")  # padding
    mm = create_model("mmseg_psp_r18_mini").input_norm(rgb)
    mean, std = torch.tensor(MMSEG_MEAN).view(1, 3, 1, 1), torch.tensor(MMSEG_STD).view(1, 3, 1, 1)
    assert torch.equal(mm[..., 1:], ((rgb - mean) / std)[..., 1:])  # SegDataPreProcessor divides
    assert torch.equal(mm[0, :, 0, 0], torch.zeros(3))
    ck = create_model("cirkd_deeplabv3_r18_mini").input_norm(rgb)
    bgr64 = rgb.flip(1).double() - torch.tensor(CAFFE_BGR, dtype=torch.float64).view(1, 3, 1, 1)
    assert torch.equal(ck[..., 1:], bgr64.float()[..., 1:])  # numpy float64 subtraction, then float32
    assert torch.equal(ck[0, :, 0, 0], torch.zeros(3))


# ----------------------------------------------------------------------------------------------------
# forwards re-derived functionally from the reference rules


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights *and* BN statistics, so a wrong key, order or op shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.dtype.is_floating_point:
                continue
            if name.endswith("running_var") or (name.endswith("weight") and t.ndim == 1):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / max(1, t[0].numel())) ** 0.5)
    return model.eval()


class Ref:
    """Functional ops over a state dict."""

    def __init__(self, sd: dict[str, Tensor]):
        self.sd = sd

    def conv(self, p: str, x: Tensor, stride: int = 1, dil: int = 1, groups: int = 1) -> Tensor:
        w = self.sd[p + "weight"]
        return F.conv2d(x, w, self.sd.get(p + "bias"), stride, dil * (w.shape[-1] // 2), dil, groups)

    def bn(self, p: str, x: Tensor) -> Tensor:
        s = self.sd
        return F.batch_norm(x, s[p + "running_mean"], s[p + "running_var"], s[p + "weight"], s[p + "bias"], eps=1e-5)

    def cbr(self, conv: str, bn: str, x: Tensor, stride: int = 1, dil: int = 1, act=F.relu) -> Tensor:
        return act(self.bn(bn, self.conv(conv, x, stride, dil)))

    def resnet(self, p: str, x: Tensor, layers, bottleneck: bool, first_dil, conv2_dil) -> list[Tensor]:
        outs = []
        for i, (n, s, d) in enumerate(zip(layers, (1, 2, 1, 1), (1, 1, 2, 4), strict=True), start=1):
            for b in range(n):
                q, stride, dil = f"{p}layer{i}.{b}.", (s if b == 0 else 1), (first_dil(d) if b == 0 else d)
                idt = x
                if q + "downsample.0.weight" in self.sd:
                    idt = self.bn(q + "downsample.1.", self.conv(q + "downsample.0.", x, stride))
                if bottleneck:
                    y = self.cbr(q + "conv1.", q + "bn1.", x)
                    y = self.cbr(q + "conv2.", q + "bn2.", y, stride, dil)
                    y = self.bn(q + "bn3.", self.conv(q + "conv3.", y))
                else:
                    y = self.cbr(q + "conv1.", q + "bn1.", x, stride, dil)
                    y = self.bn(q + "bn2.", self.conv(q + "conv2.", y, 1, conv2_dil(d)))
                x = F.relu(y + idt)
            outs.append(x)
        return outs


def up(x: Tensor, like: Tensor, align_corners: bool) -> Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=align_corners)


def mmseg_reference(sd, rgb: Tensor, head: str, layers, bottleneck: bool) -> tuple[Tensor, Tensor]:
    """mmseg's forward: normalise, ResNetV1c-d8 (contract_dilation, floor pool), PSP/ASPP, FCN aux."""
    r = Ref(sd)
    x = (rgb - torch.tensor(MMSEG_MEAN).view(1, 3, 1, 1)) / torch.tensor(MMSEG_STD).view(1, 3, 1, 1)
    for i, stride in ((0, 2), (3, 1), (6, 1)):
        x = r.cbr(f"backbone.stem.{i}.", f"backbone.stem.{i + 1}.", x, stride)
    x = F.max_pool2d(x, 3, 2, 1, ceil_mode=False)
    _, _, x3, x4 = r.resnet("backbone.", x, layers, bottleneck, lambda d: d // 2 if d > 1 else d, lambda d: 1)
    cm = lambda p, x, dil=1: r.cbr(p + "conv.", p + "bn.", x, 1, dil)  # noqa: E731
    h = "decode_head."
    if head == "psp":
        branches = [x4] + [
            up(cm(f"{h}psp_modules.{i}.1.", F.adaptive_avg_pool2d(x4, b)), x4, False)
            for i, b in enumerate((1, 2, 3, 6))
        ]
    else:
        branches = [up(cm(h + "image_pool.1.", F.adaptive_avg_pool2d(x4, 1)), x4, False)]
        branches += [cm(f"{h}aspp_modules.{i}.", x4, d) for i, d in enumerate((1, 12, 24, 36))]
    logits = r.conv(h + "conv_seg.", cm(h + "bottleneck.", torch.cat(branches, 1)))
    aux = r.conv("auxiliary_head.conv_seg.", cm("auxiliary_head.convs.0.", x3))
    return logits, aux


def cirkd_mbv2(r: Ref, x: Tensor) -> Tensor:
    """CIRKD's MobileNetV2 with ``_nostride_dilate`` over features[7:14] (2) and [14:18] (4)."""
    f = "pretrained.net.features."
    x = r.cbr(f + "0.0.", f + "0.1.", x, 2, act=F.relu6)
    first_of_stage = {1: 1, 2: 2, 4: 2, 7: 2, 11: 1, 14: 2, 17: 1}  # block index -> its original stride
    for i in range(1, 18):
        p, stride = f"{i}.conv.", first_of_stage.get(i, 1)
        dil = 1
        for lo, hi, dilate in ((7, 14, 2), (14, 18, 4)):
            if lo <= i < hi:
                dil = dilate // 2 if stride == 2 else dilate
                stride_now = 1
                break
        else:
            stride_now = stride
        expand = f + p + "6.weight" in r.sd
        y = r.cbr(f + p + "0.", f + p + "1.", x, act=F.relu6) if expand else x
        dw = 3 if expand else 0
        y = r.bn(f + p + f"{dw + 1}.", r.conv(f + p + f"{dw}.", y, stride_now, dil, groups=y.shape[1]))
        y = r.bn(f + p + f"{dw + 4}.", r.conv(f + p + f"{dw + 3}.", F.relu6(y)))
        x = x + y if stride == 1 and x.shape[1] == y.shape[1] else y
    return x


def cirkd_reference(sd, rgb: Tensor, layers, bottleneck: bool | None) -> tuple[Tensor, Tensor | None]:
    """CIRKD's forward: BGR minus mean in float64, ResNetV1b-s / dilated MobileNetV2, DeepLabV3 head."""
    r = Ref(sd)
    x = (rgb.flip(1).double() - torch.tensor(CAFFE_BGR, dtype=torch.float64).view(1, 3, 1, 1)).float()
    x3 = None
    if bottleneck is None:
        x4 = cirkd_mbv2(r, x)
    else:
        for i in (1, 2, 3):
            x = r.cbr(f"pretrained.conv{i}.", f"pretrained.bn{i}.", x, 2 if i == 1 else 1)
        x = F.max_pool2d(x, 3, 2, 1)
        _, _, x3, x4 = r.resnet("pretrained.", x, layers, bottleneck, lambda d: 1 if d in (1, 2) else 2, lambda d: d)
    a = "head.aspp."
    pool = up(r.cbr(a + "b4.gap.1.", a + "b4.gap.2.", F.adaptive_avg_pool2d(x4, 1)), x4, True)
    branches = [r.cbr(a + "b0.0.", a + "b0.1.", x4)]
    branches += [r.cbr(f"{a}b{i}.block.0.", f"{a}b{i}.block.1.", x4, 1, d) for i, d in ((1, 12), (2, 24), (3, 36))]
    y = r.cbr(a + "project.0.", a + "project.1.", torch.cat([*branches, pool], 1))
    logits = r.conv("head.block.4.", r.cbr("head.block.0.", "head.block.1.", y))
    aux = None if x3 is None else r.conv("auxlayer.block.4.", r.cbr("auxlayer.block.0.", "auxlayer.block.1.", x3))
    return logits, aux


def outputs_with_aux(model: nn.Module, rgb: Tensor):
    """Eval outputs, plus the aux head computed with BN and dropout in eval mode."""
    with torch.no_grad():
        out = model.eval()(rgb)
        model.train()
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.Dropout, nn.Dropout2d)):
                m.eval()
        aux = model(rgb).aux
    model.eval()
    return out, aux


@pytest.mark.parametrize("head", ["psp", "aspp"])
@pytest.mark.parametrize(("block", "layers"), [(DilatedBasicBlock, (2, 1, 1, 2)), (Bottleneck, (1, 1, 1, 2))])
def test_mmseg_forward_equals_the_functional_reference(head, block, layers):
    model = randomise(MMSegEncoderDecoder(block, layers, head=head, num_classes=5, width=0.125, channels=8))
    rgb = torch.randint(0, 256, (1, 3, 64, 97)).float()
    out, aux = outputs_with_aux(model, rgb)
    ref_logits, ref_aux = mmseg_reference(model.state_dict(), rgb, head, layers, block is Bottleneck)
    assert out.logits.shape == (1, 5, 8, 13)
    torch.testing.assert_close(out.logits, ref_logits)
    torch.testing.assert_close(aux, ref_aux)


@pytest.mark.parametrize(
    ("backbone", "layers", "bottleneck"),
    [((DilatedBasicBlock, (2, 1, 1, 2)), (2, 1, 1, 2), False), ((Bottleneck, (1, 1, 1, 2)), (1, 1, 1, 2), True)],
)
def test_cirkd_resnet_forward_equals_the_functional_reference(backbone, layers, bottleneck):
    model = randomise(CIRKDDeepLabV3(backbone, num_classes=5, width=0.125, head_channels=8))
    rgb = torch.randint(0, 256, (1, 3, 64, 97)).float()
    out, aux = outputs_with_aux(model, rgb)
    ref_logits, ref_aux = cirkd_reference(model.state_dict(), rgb, layers, bottleneck)
    assert out.logits.shape == (1, 5, 8, 13)
    torch.testing.assert_close(out.logits, ref_logits)
    torch.testing.assert_close(aux, ref_aux)


def test_cirkd_mbv2_forward_equals_the_functional_reference():
    model = randomise(create_model("cirkd_deeplabv3_mbv2_mini", num_classes=5))
    rgb = torch.randint(0, 256, (1, 3, 64, 97)).float()
    out, aux = outputs_with_aux(model, rgb)
    ref_logits, _ = cirkd_reference(model.state_dict(), rgb, None, None)
    assert aux is None and out.logits.shape == (1, 5, 8, 13)
    torch.testing.assert_close(out.logits, ref_logits)


# ----------------------------------------------------------------------------------------------------
# checkpoints in the projects' layouts load through the registry


def test_mmseg_checkpoint_layout_loads_as_teacher(tmp_path):
    src = randomise(create_model("mmseg_psp_r18_mini", num_classes=5))
    path = tmp_path / "mmseg.pth"
    # mmcv/mmengine's save_checkpoint: {'meta': {...}, 'state_dict': ...} (plain meta here)
    torch.save({"meta": {"mmseg_version": "1.2.2", "iter": 80000}, "state_dict": src.state_dict()}, path)
    teacher = create_teacher("mmseg_psp_r18_mini", num_classes=5, weights=path)
    rgb = torch.rand(1, 3, 64, 128) * 255
    with torch.no_grad():
        assert torch.equal(teacher.model(rgb).logits, src(rgb).logits)
    assert teacher.info.normalization["order"] == "RGB" and teacher.model.output_grid(512, 1024) == (64, 128)


def test_cirkd_checkpoint_with_module_prefix_loads(tmp_path):
    src = randomise(create_model("cirkd_deeplabv3_r18_mini", num_classes=5))
    path = tmp_path / "kd_deeplabv3_resnet18_citys_best_model.pth"
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, path)  # a DDP-wrapped save
    model = create_model("cirkd_deeplabv3_r18_mini", num_classes=5)
    report = load_weights(model, path)
    assert report.loaded == len(src.state_dict()) and not report.missing and not report.unexpected
    rgb = torch.rand(1, 3, 64, 128) * 255
    with torch.no_grad():
        assert torch.equal(model.eval()(rgb).logits, src(rgb).logits)


# ----------------------------------------------------------------------------------------------------
# mmsegmentation itself, when it is installed


def _import_mmseg():
    """mmseg's modules, or skip. mmcv-lite lacks the compiled ``mmcv.ops`` that ``mmseg.models``
    imports for unrelated heads; a stub stands in for it (PSP/ASPP/FCN and ResNet use none)."""
    pytest.importorskip("mmseg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import mmcv.ops  # noqa: F401
        except (ImportError, ModuleNotFoundError):
            for k in [k for k in sys.modules if k.startswith("mmcv.ops")]:
                del sys.modules[k]
            stub = types.ModuleType("mmcv.ops")

            def _missing(name):
                if name.startswith("__"):
                    raise AttributeError(name)
                return type(name, (), {})

            stub.__getattr__ = _missing
            sys.modules["mmcv.ops"] = stub
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules

        register_all_modules()
    return MODELS


def _mmseg_config(depth: int, head: str, width_base: int, channels: int, aux_channels: int, expansion: int) -> dict:
    norm = {"type": "BN", "requires_grad": True}
    c4, c3 = width_base * 8 * expansion, width_base * 4 * expansion
    decode = {"type": "PSPHead", "pool_scales": (1, 2, 3, 6)} if head == "psp" else {"type": "ASPPHead"}
    if head == "aspp":
        decode["dilations"] = (1, 12, 24, 36)
    common = {"dropout_ratio": 0.1, "num_classes": 5, "norm_cfg": norm, "align_corners": False}
    return {
        "type": "EncoderDecoder",
        "data_preprocessor": {
            "type": "SegDataPreProcessor",
            "mean": list(MMSEG_MEAN),
            "std": list(MMSEG_STD),
            "bgr_to_rgb": True,
            "pad_val": 0,
            "seg_pad_val": 255,
        },
        "backbone": {
            "type": "ResNetV1c",
            "depth": depth,
            "stem_channels": width_base,
            "base_channels": width_base,
            "num_stages": 4,
            "out_indices": (0, 1, 2, 3),
            "dilations": (1, 1, 2, 4),
            "strides": (1, 2, 1, 1),
            "norm_cfg": norm,
            "style": "pytorch",
            "contract_dilation": True,
        },
        "decode_head": {**decode, "in_channels": c4, "in_index": 3, "channels": channels, **common},
        "auxiliary_head": {
            "type": "FCNHead",
            "in_channels": c3,
            "in_index": 2,
            "channels": aux_channels,
            "num_convs": 1,
            "concat_input": False,
            **common,
        },
        "test_cfg": {"mode": "whole"},
    }


@pytest.mark.parametrize(
    ("name", "depth", "head", "block", "layers"),
    [
        ("psp_r18", 18, "psp", DilatedBasicBlock, (2, 2, 2, 2)),
        ("deeplabv3_r18", 18, "aspp", DilatedBasicBlock, (2, 2, 2, 2)),
        ("psp_r50", 50, "psp", Bottleneck, (3, 4, 6, 3)),
    ],
)
def test_outputs_equal_mmsegmentations_own_forward(name, depth, head, block, layers):
    models = _import_mmseg()
    expansion = 4 if block is Bottleneck else 1
    ours = randomise(
        MMSegEncoderDecoder(block, layers, head=head, num_classes=5, width=0.125, channels=16, aux_channels=8)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = models.build(_mmseg_config(depth, head, 8, 16, 8, expansion)).eval()
        assert list(ref.state_dict()) == list(ours.state_dict())  # same keys, same order
        ref.load_state_dict(ours.state_dict(), strict=True)
        bgr = torch.randint(0, 256, (3, 75, 101), dtype=torch.uint8)  # what mmseg's loader gives
        with torch.no_grad():
            x = ref.data_preprocessor({"inputs": [bgr], "data_samples": None}, training=False)["inputs"]
            feats = ref.extract_feat(x)
            ref_logits, ref_aux = ref.decode_head(feats), ref.auxiliary_head(feats)
    out, aux = outputs_with_aux(ours, bgr.flip(0)[None].float())
    assert out.logits.shape[-2:] == (10, 13)
    assert torch.equal(out.logits, ref_logits) and torch.equal(aux, ref_aux)


# ----------------------------------------------------------------------------------------------------
# CIRKD itself, when a checkout is given (its models are plain PyTorch; nothing is downloaded)


def _import_cirkd(module: str):
    """``models.<module>`` of the CIRKD checkout in ``$SKD_CIRKD_SRC``, without its package ``__init__``
    (which imports every model of the project)."""
    root = os.environ.get("SKD_CIRKD_SRC")
    if not root:
        pytest.skip("set SKD_CIRKD_SRC to a winycg/CIRKD checkout to compare with CIRKD's own models")
    if "cirkd_models" not in sys.modules:
        pkg = types.ModuleType("cirkd_models")
        pkg.__path__ = [str(Path(root) / "models")]
        sys.modules["cirkd_models"] = pkg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(f"cirkd_models.{module}")


@pytest.mark.parametrize(
    "name",
    ["cirkd_deeplabv3_r18", "cirkd_deeplabv3_mbv2", pytest.param("cirkd_deeplabv3_r101", marks=pytest.mark.slow)],
)
def test_outputs_equal_cirkds_own_forward(name):
    if name.endswith("mbv2"):
        ref = _import_cirkd("deeplabv3_mobile").DeepLabV3(
            19, backbone="mobilenetv2", pretrained_base="None", norm_layer=nn.BatchNorm2d
        )
    else:
        backbone = "resnet101" if name.endswith("r101") else "resnet18"
        ref = _import_cirkd("deeplabv3").DeepLabV3(
            19, backbone=backbone, aux=True, pretrained_base="None", norm_layer=nn.BatchNorm2d
        )
    ours = randomise(create_model(name))
    assert list(ref.state_dict()) == list(ours.state_dict())  # same keys, same order
    ref.load_state_dict(ours.state_dict(), strict=True)
    bgr = np.random.default_rng(0).integers(0, 256, (64, 97, 3), dtype=np.uint8)  # cv2.imread's order
    x = torch.from_numpy((np.asarray(bgr, np.float32) - np.array(CAFFE_BGR)).transpose(2, 0, 1).astype(np.float32))
    with torch.no_grad():
        ref_out = ref.eval()(x[None])
    out, aux = outputs_with_aux(ours, torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1)[None].float())
    assert torch.equal(out.logits, ref_out[0]) and torch.equal(out.feature, ref_out[-1])
    if len(ref_out) == 3:
        assert torch.equal(aux, ref_out[1])
