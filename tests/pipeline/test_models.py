"""Model architectures: shapes, grids, parameter counts, key layout, the raw-pixel contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import (
    IMAGENET_NORM,
    OFFICIAL_NORM,
    BNLeaky,
    InputNorm,
    PSPModule,
    SegOutput,
    as_norm_spec,
    grid_size,
)
from pipeline.registry import create_model, list_models

SMALL = ["psp34_mini", "psp18_mini", "deeplabv3_r18_mini", "mbv2_mini", "psp_tiny"]
# raw RGB pixel that every model's normalisation maps to exactly 0 (official: BGR mean, flipped)
OFFICIAL_ZERO_RGB = tuple(reversed(OFFICIAL_NORM.mean))


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def psp101():
    torch.manual_seed(0)
    return create_model("psp101").eval()


def test_grid_size_is_8k_plus_1():
    assert [grid_size(n) for n in (512, 1024, 2048, 64)] == [65, 129, 257, 9]


def test_psp101_parameter_counts_match_the_spec(psp101):
    total, dsn = n_params(psp101), n_params(psp101.dsn)
    assert total == 70_437_350 and round(total / 1e6, 2) == 70.44
    assert total - dsn == 65_707_475 and round((total - dsn) / 1e6, 2) == 65.71
    assert psp101.architecture == "PSPNet(resnet101, psp_out=512, dsn)"
    assert psp101.feature_channels == 512


def test_psp18_parameter_counts_match_the_spec():
    with torch.device("meta"):
        m = create_model("psp18")
    assert n_params(m) == 13_068_262 and round(n_params(m) / 1e6, 2) == 13.07
    assert round((n_params(m) - n_params(m.dsn)) / 1e6, 2) == 12.77


def test_psp101_forward_shapes(psp101):
    with torch.no_grad():
        out = psp101(torch.rand(1, 3, 64, 64) * 255)
    assert isinstance(out, SegOutput) and out.aux is None
    assert out.logits.shape == (1, 19, 9, 9) and out.feature.shape == (1, 512, 9, 9)


@pytest.mark.parametrize("name", [e.name for e in list_models()])
def test_full_size_shapes_on_meta(name):
    with torch.device("meta"):
        m = create_model(name)
    out = m.train()(torch.empty(2, 3, 512, 1024, device="meta"))
    g = (m.grid(512), m.grid(1024))
    assert m.output_grid(512, 1024) == g
    eight_k = name.startswith("mbv2") or getattr(m, "grid_convention", "8k+1") == "8k"
    assert g == ((64, 128) if eight_k else (65, 129))
    assert out.logits.shape == (2, 19, *g) and (out.aux is None or out.aux.shape == (2, 19, *g))
    assert out.feature.shape == (2, m.feature_channels, *g)
    if name == "psp101":
        assert m.feature_channels == 512
    if name in ("psp18", "mbv2"):
        assert m.feature_channels == 128


def test_psp_tiny_real_grid_at_512():
    m = create_model("psp_tiny").eval()
    with torch.no_grad():
        out = m(torch.rand(1, 3, 512, 1024) * 255)
    assert out.logits.shape == (1, 19, 65, 129) and out.feature.shape == (1, 16, 65, 129)


def test_mbv2_real_grid_at_512():
    m = create_model("mbv2_mini").eval()
    with torch.no_grad():
        out = m(torch.rand(1, 3, 512, 512) * 255)
    assert out.logits.shape[-2:] == (64, 64) == (m.grid(512),) * 2


def test_official_key_layout(psp101):
    children = [n for n, _ in psp101.named_children()]
    assert children == [
        "input_norm",
        *["conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "conv3", "bn3", "relu3", "maxpool"],
        *["layer1", "layer2", "layer3", "layer4", "pspmodule", "head", "dsn"],
    ]
    keys = set(psp101.state_dict())
    expected = {
        "conv1.weight",
        "bn3.running_var",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_var",
        "layer3.22.conv3.weight",
        "layer4.2.bn3.num_batches_tracked",
        "pspmodule.stages.0.1.weight",
        "pspmodule.stages.3.2.running_mean",
        "pspmodule.bottleneck.0.weight",
        "pspmodule.bottleneck.1.weight",
        "head.weight",
        "head.bias",
        "dsn.0.weight",
        "dsn.0.bias",
        "dsn.1.running_var",
        "dsn.3.weight",
        "dsn.3.bias",
    }
    assert expected <= keys
    assert not any(k.startswith("input_norm") for k in keys)  # normalisation is not a weight
    assert not any(k.startswith(("pspmodule.bottleneck.2", "dsn.2", "fc")) for k in keys)


def test_backbone_geometry(psp101):
    assert psp101.maxpool.ceil_mode and psp101.maxpool.stride == 2
    assert psp101.conv1.stride == (2, 2) and psp101.conv1.kernel_size == (3, 3)
    assert psp101.layer2[0].conv2.stride == (2, 2) and psp101.layer2[0].downsample[0].stride == (2, 2)
    for layer, d in ((psp101.layer3, 2), (psp101.layer4, 4)):
        for block in layer:  # every block, the first one included
            assert block.conv2.dilation == (d, d) and block.conv2.padding == (d, d) and block.conv2.stride == (1, 1)
    r18 = create_model("psp_tiny", width=1.0)
    assert r18.layer4[0].conv1.dilation == r18.layer4[0].conv2.dilation == (4, 4)  # BasicBlock: both convs


def test_bn_leaky_is_one_module_with_abn_keys():
    bn = BNLeaky(4).eval()
    assert set(bn.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    x = torch.randn(2, 4, 3, 3)
    ref = F.leaky_relu(F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias), 0.01)
    assert torch.allclose(bn(x), ref)


def test_psp_module_matches_the_official_forward():
    torch.manual_seed(0)
    psp = PSPModule(8, 4).eval()
    x = torch.randn(1, 8, 9, 11)
    priors = [F.interpolate(s(x), size=(9, 11), mode="bilinear", align_corners=True) for s in psp.stages]
    ref = psp.bottleneck(torch.cat([*priors, x], 1))
    assert torch.allclose(psp(x), ref)
    assert psp.bottleneck[0].in_channels == 8 + 4 * 4 and isinstance(psp.bottleneck[2], nn.Dropout2d)


@pytest.mark.parametrize("name", SMALL)
def test_forward_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    m = create_model(name).train()
    out = m(torch.rand(2, 3, 64, 80) * 255)
    assert out.aux is not None and out.aux.shape == out.logits.shape
    assert out.logits.shape[-2:] == (m.grid(64), m.grid(80)) == out.feature.shape[-2:]
    (out.logits.square().mean() + out.aux.square().mean()).backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", SMALL)
def test_eval_mode_returns_no_aux(name):
    m = create_model(name).eval()
    with torch.no_grad():
        out = m(torch.rand(1, 3, 48, 48) * 255)
    assert out.aux is None and out.feature.shape[1] == m.feature_channels


@pytest.mark.parametrize("name", ["psp_tiny", "mbv2_mini", "deeplabv3_r18_mini"])
def test_nan_padding_equals_zero_after_normalisation(name):
    torch.manual_seed(0)
    m = create_model(name).eval()
    x = torch.rand(1, 3, 64, 64) * 255
    padded = x.clone()
    padded[..., 40:, :] = float("nan")
    padded[..., :, 50:] = float("nan")
    zero = x.clone()
    mean_rgb = torch.tensor(OFFICIAL_ZERO_RGB).view(1, 3, 1, 1)
    zero[..., 40:, :] = mean_rgb
    zero[..., :, 50:] = mean_rgb
    assert torch.equal(m.input_norm(zero)[..., 40:, :], torch.zeros(1, 3, 24, 64))
    with torch.no_grad():
        a, b = m(padded), m(zero)
    assert torch.isfinite(a.logits).all()
    assert torch.equal(a.logits, b.logits) and torch.equal(a.feature, b.feature)


def test_input_norm_orders_and_specs():
    x = torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1)
    official = InputNorm(OFFICIAL_NORM)(x).flatten().tolist()
    assert official == pytest.approx(
        [30 - OFFICIAL_NORM.mean[0], 20 - OFFICIAL_NORM.mean[1], 10 - OFFICIAL_NORM.mean[2]]
    )
    m = create_model("psp_tiny", norm="imagenet")
    assert m.input_norm.spec == IMAGENET_NORM and m.norm_spec == IMAGENET_NORM
    assert as_norm_spec(IMAGENET_NORM.to_dict()) == IMAGENET_NORM
    with pytest.raises(ValueError, match="unknown input normalisation"):
        as_norm_spec("caffe")


def test_model_attributes_and_options():
    m = create_model("psp_tiny", num_classes=7, aux=False)
    assert m.dsn is None and m.head.out_channels == 7
    assert (m.model_name, m.num_classes, m.feature_channels, m.norm_spec) == ("psp_tiny", 7, 16, OFFICIAL_NORM)
    assert m.train()(torch.rand(2, 3, 32, 32) * 255).aux is None


@pytest.mark.parametrize("name", ["psp_tiny", "mbv2_mini", "deeplabv3_r18_mini"])
def test_grid_arithmetic_matches_the_forward(name):
    with torch.device("meta"):
        m = create_model(name).eval()
    for n in (33, 97, 255, 256, 257, 511, 769):
        out = m(torch.empty(1, 3, n, n + 1, device="meta"))
        assert tuple(out.logits.shape[-2:]) == m.output_grid(n, n + 1), n
