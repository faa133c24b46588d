"""Recognising weights files from keys and shapes; misfit errors; student backbones from the files people have.

Files are written in each project's published layout from the registered architectures' own key
names (no download): mmsegmentation's ``{'meta', 'state_dict'}`` dict (its meta holding an object
of a class that is never unpickled), CIRKD's raw state dict with ``module.``, SKD's official
InPlace-ABN layout, skd's safetensors, and the ImageNet backbone files of each family. Depth-101
layouts are recognised from key sets built on the meta device (no weights materialised).
"""

from __future__ import annotations

import pytest
import torch

from cache_tools.errors import ModelError, WeightsError
from pipeline import recognize, weights
from pipeline.recognize import (
    backbone_mapping,
    check_fits,
    describe_weights_file,
    load_backbone,
    load_teacher,
    model_shapes,
    recognize_file,
    recognize_state_dict,
    resolve_teacher,
    weights_lines,
)
from pipeline.registry import create_model
from pipeline.weights import save_weights
from tests.pipeline.test_teachers import csail_style, randomise_bn, to_official


class ConfigDict(dict):
    """Stands for mmengine's ConfigDict in an mmseg checkpoint's meta: the reader must skip it."""


def build(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, **kwargs).eval()


def save_mmseg(model, path, legacy: bool = False) -> None:
    meta = {"mmseg_version": "1.2.2", "cfg": ConfigDict(model="EncoderDecoder"), "epoch": 80}
    torch.save({"meta": meta, "state_dict": model.state_dict()}, path, _use_new_zipfile_serialization=not legacy)


def save_cirkd(model, path) -> None:
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)


def official_keys(shapes: dict) -> dict:
    """Key renaming of :func:`to_official` on a shape dict (meta models have no values to convert)."""
    out = {}
    for k, v in shapes.items():
        if k.endswith("num_batches_tracked"):
            continue
        k = "head.0." + k[len("pspmodule.") :] if k.startswith("pspmodule.") else k
        k = "head.1." + k[len("head.") :] if k.startswith("head.") and not k.startswith("head.0.") else k
        out[k] = v
    return {**out, "fc.weight": (1000, 2048), "fc.bias": (1000,)}


# ----------------------------------------------------------------------------------------------------
# segmentation checkpoints


@pytest.mark.parametrize(
    "name, described",
    [
        ("mmseg_psp_r101", "mmseg PSPNet ResNetV1c-101-d8, 19 classes, aux head: registered as mmseg_psp_r101"),
        (
            "mmseg_deeplabv3_r101",
            "mmseg DeepLabV3 ResNetV1c-101-d8, 19 classes, aux head: registered as mmseg_deeplabv3_r101",
        ),
        (
            "cirkd_deeplabv3_r101",
            "CIRKD DeepLabV3 ResNet-101 (deep stem 64/64/128), 19 classes, aux head: registered as cirkd_deeplabv3_r101",
        ),
        ("psp101", "SKD PSPNet ResNet-101 (deep stem 64/64/128), 19 classes, aux head: registered as psp101"),
    ],
)
def test_depth_101_layouts_from_meta_key_sets(name, described):
    rec = recognize_state_dict(model_shapes(name))
    assert rec.describe() == described
    assert (rec.depth, rec.blocks, rec.block, rec.num_classes, rec.aux) == (101, (3, 4, 23, 3), "bottleneck", 19, True)


def test_official_skd_teacher_layout_from_meta_key_set():
    rec = recognize_state_dict(official_keys(model_shapes("psp101")))
    assert (rec.family, rec.layout, rec.model_name) == ("skd", "skd-official", "psp101")
    assert rec.describe() == (
        "SKD PSPNet ResNet-101 (deep stem 64/64/128) in the official InPlace-ABN layout, 19 classes, aux head: "
        "registered as psp101"
    )
    check_fits(rec, "psp101")  # the official layout loads into psp101 after conversion


@pytest.mark.parametrize("legacy", [False, True])
def test_mmseg_checkpoint_file(tmp_path, legacy):
    path = tmp_path / "pspnet_r18-d8_512x1024_80k_cityscapes.pth"
    save_mmseg(build("mmseg_psp_r18_mini"), path, legacy)
    rec, sd, _ = recognize_file(path)
    assert (rec.family, rec.architecture, rec.depth, rec.width, rec.prefix) == (
        "mmseg",
        "pspnet",
        18,
        0.25,
        "backbone.",
    )
    assert rec.describe() == (
        "mmseg PSPNet ResNetV1c-18-d8 x0.25, 19 classes, aux head: registered as mmseg_psp_r18_mini"
    )
    info = describe_weights_file(path)
    assert info["format"] == ("torch legacy (torch < 1.6)" if legacy else "torch zip (torch >= 1.6)")
    assert info["keys"] == len(sd) == 172
    assert info["tensor_bytes"] == sum(v.numel() * v.element_size() for v in sd.values())
    assert "test_recognize.ConfigDict" in info["skipped"] and "not imported, not executed" in info["skipped"]
    assert info["loads"] == {
        "model": "mmseg_psp_r18_mini",
        "num_classes": 19,
        "options": {},
        "missing": 0,
        "unexpected": 0,
        "mismatched": 0,
        "how": "strict",
    }
    lines = weights_lines(info)
    assert lines[1] == f"holds: {rec.describe()}"
    assert lines[-1] == "loads into mmseg_psp_r18_mini (num_classes=19) strict: 0 missing, 0 unexpected, 0 mis-shaped"


def test_cirkd_checkpoint_with_module_prefix_other_classes_no_aux(tmp_path):
    path = tmp_path / "deeplabv3_resnet18_citys_best_model.pth"
    save_cirkd(build("cirkd_deeplabv3_r18_mini", num_classes=11, aux=False), path)
    rec, _, _ = recognize_file(path)
    assert (rec.family, rec.prefix, rec.num_classes, rec.aux) == ("cirkd", "pretrained.", 11, False)
    assert (rec.model_name, rec.model_kwargs) == ("cirkd_deeplabv3_r18_mini", {"aux": False})
    assert rec.describe().endswith("11 classes, no aux head: registered as cirkd_deeplabv3_r18_mini with aux=False")
    info = describe_weights_file(path)
    assert info["loads"]["options"] == {"aux": False} and info["loads"]["missing"] == 0


def test_cirkd_mobilenet_and_skd_students(tmp_path):
    mbv2 = recognize_state_dict(model_shapes("cirkd_deeplabv3_mbv2_mini"))
    assert (mbv2.backbone, mbv2.prefix, mbv2.model_name) == (
        "mobilenetv2",
        "pretrained.net.",
        "cirkd_deeplabv3_mbv2_mini",
    )
    for name in ("psp18_mini", "deeplabv3_r18_mini", "mbv2_mini", "psp_tiny"):
        rec = recognize_state_dict(model_shapes(name))
        assert (rec.family, rec.model_name) == ("skd", name), rec.describe()


def test_official_and_own_skd_files(tmp_path):
    src = build("psp18_mini")
    randomise_bn(src)
    official = tmp_path / "CS_scenes_38413_0.7832.pth"
    torch.save(to_official(src.state_dict()), official, _use_new_zipfile_serialization=False)
    rec, _, _ = recognize_file(official)
    assert (rec.layout, rec.model_name) == ("skd-official", "psp18_mini")
    info = describe_weights_file(official)
    assert info["loads"]["how"] == "strict, after the official InPlace-ABN conversion"
    assert (info["loads"]["missing"], info["loads"]["unexpected"]) == (0, 0)
    own = save_weights(src, tmp_path / "psp18_mini.safetensors")
    rec, _, _ = recognize_file(own)
    assert (rec.layout, rec.metadata_name, rec.model_name) == ("skd-safetensors", "psp18_mini", "psp18_mini")
    assert describe_weights_file(own)["format"] == "safetensors"


def test_unknown_layout_and_unregistered_variant():
    rec = recognize_state_dict({"encoder.0.weight": torch.zeros(2, 3), "decoder.weight": torch.zeros(2)})
    assert rec.family == "unknown" and rec.model_name is None
    assert (
        rec.describe()
        == "an unrecognised state dict: no known layout has these keys (decoder.weight, encoder.0.weight)"
    )
    # CIRKD's other heads (here its PSPNet): the backbone is recognised, no model is offered
    shapes = {k: v for k, v in model_shapes("cirkd_deeplabv3_r18_mini").items() if not k.startswith("head.")}
    rec = recognize_state_dict(
        {**shapes, "head.psp.conv1.0.weight": (8, 128, 1, 1), "head.block.4.weight": (19, 32, 1, 1)}
    )
    assert rec.describe() == (
        "CIRKD model (unknown head) ResNet-18 x0.25 (deep stem 64/64/128), class count unknown, aux head: "
        "no registered model fits (skd has no model with this head)"
    )
    # an mmseg PSPNet whose head channels no registered model has
    shapes = dict(model_shapes("mmseg_psp_r18_mini"))
    shapes["decode_head.conv_seg.weight"] = (19, 48, 1, 1)
    rec = recognize_state_dict(shapes)
    assert rec.family == "mmseg" and rec.model_name is None
    assert rec.reason == (
        "mmseg_psp_r18_mini does not fit: 1 mis-shaped (decode_head.conv_seg.weight: file (19, 48, 1, 1) vs model "
        "(19, 32, 1, 1))"
    )


# ----------------------------------------------------------------------------------------------------
# --teacher against the file


def test_teacher_that_does_not_fit_names_what_the_file_holds():
    rec = recognize_state_dict(model_shapes("mmseg_psp_r101"))
    with pytest.raises(WeightsError) as info:
        check_fits(rec, "psp101")
    assert str(info.value) == (
        "--teacher psp101 does not fit this file: it holds an mmseg PSPNet ResNetV1c-101-d8 "
        "(use --teacher mmseg_psp_r101, or omit --teacher)"
    )
    check_fits(rec, "mmseg_psp_r101")
    check_fits(rec, "my_pkg.models:teacher")  # custom factories: the strict load judges them
    cirkd = recognize_state_dict(model_shapes("cirkd_deeplabv3_r101"))
    with pytest.raises(WeightsError, match=r"^--teacher mmseg_deeplabv3_r101 does not fit x.pth: it holds a CIRKD "):
        check_fits(cirkd, "mmseg_deeplabv3_r101", path="x.pth")


def test_backbone_file_as_teacher_is_refused():
    shapes = {
        k[len("backbone.") :]: v for k, v in model_shapes("mmseg_psp_r18_mini").items() if k.startswith("backbone.")
    }
    rec = recognize_state_dict(shapes)
    with pytest.raises(WeightsError) as info:
        check_fits(rec, "mmseg_psp_r18_mini")
    assert str(info.value) == (
        "--teacher mmseg_psp_r18_mini does not fit this file: it holds an ImageNet backbone (ResNetV1c-18 x0.25 "
        "(deep stem 32/32/64)), not a segmentation model (give a segmentation checkpoint to --weights; backbone "
        "files initialise students)"
    )


def test_resolve_teacher_for_build(tmp_path):
    path = tmp_path / "deeplabv3_resnet18_citys_best_model.pth"
    save_cirkd(build("cirkd_deeplabv3_r18_mini", aux=False), path)
    name, kwargs, rec = resolve_teacher(path, None, 19)
    assert (name, kwargs, rec.family) == ("cirkd_deeplabv3_r18_mini", {"aux": False}, "cirkd")
    assert resolve_teacher(path, "cirkd_deeplabv3_r18_mini", 19)[:2] == ("cirkd_deeplabv3_r18_mini", {"aux": False})
    with pytest.raises(WeightsError, match=r"^--teacher psp18_mini does not fit .*: it holds a CIRKD DeepLabV3 "):
        resolve_teacher(path, "psp18_mini", 19)
    with pytest.raises(WeightsError) as info:
        resolve_teacher(path, None, 21)
    assert str(info.value) == (
        f"{path} holds a 19-class teacher and the dataset has 21 classes; the teacher must predict the dataset's "
        "classes, in its train-id order"
    )
    assert resolve_teacher(None, "psp18_mini", 19) == ("psp18_mini", {}, None)  # --random-weights
    with pytest.raises(ModelError, match="give --weights FILE"):
        resolve_teacher(None, None, 19)
    backbone = tmp_path / "resnet18_v1c.pth"
    mmcv_v1c_file(backbone)
    with pytest.raises(WeightsError, match=r"cannot tell which model .* it holds an ImageNet backbone"):
        resolve_teacher(backbone, None, 19)


def test_load_teacher_reads_the_weights_file_once(tmp_path, monkeypatch):
    src = build("cirkd_deeplabv3_r18_mini", aux=False)
    path = tmp_path / "deeplabv3_resnet18_citys_best_model.pth"
    save_cirkd(src, path)
    reads, real = [], weights.read_state_dict

    def counting(p):  # the real reader, counted wherever the model code calls it
        reads.append(p)
        return real(p)

    monkeypatch.setattr(recognize, "read_state_dict", counting)
    monkeypatch.setattr(weights, "read_state_dict", counting)
    teacher, name, rec = load_teacher(path, None, 19, seed=3)
    assert reads == [path]  # recognised and loaded from one read
    assert (name, rec.family, teacher.info.name, teacher.info.family) == ("cirkd_deeplabv3_r18_mini", "cirkd") * 2
    x = torch.rand(1, 3, 33, 47) * 255
    with torch.no_grad():
        assert torch.equal(teacher.model(x).logits, src.eval()(x).logits)
    with pytest.raises(WeightsError, match="holds a 19-class teacher"):
        load_teacher(path, None, 21)
    teacher, name, rec = load_teacher(None, "psp_tiny", 19, random_weights=True)
    assert rec is None and name == teacher.info.name == "psp_tiny" and teacher.info.random_weights


# ----------------------------------------------------------------------------------------------------
# student backbones


def mmcv_v1c_file(path, seed: int = 1) -> dict:
    """An open-mmlab resnet18_v1c-style file (``stem.*``, ``layerN.*``, ``fc.*`` under ``state_dict``)."""
    src = build("mmseg_psp_r18_mini", seed=seed)
    randomise_bn(src)
    sd = {k[len("backbone.") :]: v for k, v in src.state_dict().items() if k.startswith("backbone.")}
    sd = {**sd, "fc.weight": torch.randn(1000, 128), "fc.bias": torch.randn(1000)}
    torch.save({"state_dict": sd}, path)
    return sd


def test_mmcv_v1c_backbone_initialises_mmseg_students(tmp_path):
    path = tmp_path / "resnet18_v1c-b5776b93.pth"
    sd = mmcv_v1c_file(path)
    rec, _, _ = recognize_file(path)
    assert (rec.family, rec.layout, rec.stem, rec.depth, rec.num_classes) == (
        "imagenet",
        "mmcv-v1c",
        "deep32",
        18,
        1000,
    )
    student = build("mmseg_deeplabv3_r18_mini", seed=5)
    head = student.decode_head.conv_seg.weight.clone()
    report = load_backbone(student, path)
    assert torch.equal(student.backbone.stem[0].weight, sd["stem.0.weight"])
    assert torch.equal(student.backbone.stem[7].running_var, sd["stem.7.running_var"])
    assert torch.equal(student.backbone.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])
    assert torch.equal(student.decode_head.conv_seg.weight, head)
    n_backbone = sum(1 for k in sd if not k.startswith("fc.") and not k.endswith("num_batches_tracked"))
    assert len(report.loaded) == n_backbone and report.ignored == ["fc.bias", "fc.weight"]
    assert set(report.random_modules()) == {"decode_head", "auxiliary_head"}
    assert report.summary().startswith(
        f"backbone from {path} (open-mmlab ImageNet ResNetV1c-18 x0.25 (deep stem 32/32/64)): loaded {n_backbone} "
        "tensors; stayed random: decode_head ("
    )
    assert describe_weights_file(path)["initialises"] == ["mmseg_deeplabv3_r18_mini", "mmseg_psp_r18_mini"]


def test_deep_stem_backbone_initialises_cirkd_and_skd_students(tmp_path):
    src = build("psp18_mini", seed=1)
    randomise_bn(src)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(csail_style(src.state_dict()), path, _use_new_zipfile_serialization=False)  # no counters: pre-0.4.1
    student = build("cirkd_deeplabv3_r18_mini", seed=5)
    report = load_backbone(student, path)
    assert torch.equal(student.pretrained.conv3.weight, src.conv3.weight)
    assert torch.equal(
        student.pretrained.layer1[0].downsample[1].running_mean, src.layer1[0].downsample[1].running_mean
    )
    assert set(report.random_modules()) == {"head", "auxlayer"}
    mapping = backbone_mapping(recognize_file(path)[0], "psp18_mini")
    assert mapping["bn3.running_var"] == "bn3.running_var" and "fc.weight" not in mapping


def test_timm_deep_stem_maps_onto_resnetv1c(tmp_path):
    v1c = {k[len("backbone.") :]: v for k, v in model_shapes("mmseg_psp_r18_mini").items() if k.startswith("backbone.")}
    renames = {"stem.0": "conv1.0", "stem.1": "conv1.1", "stem.3": "conv1.3", "stem.4": "conv1.4", "stem.6": "conv1.6"}
    renames["stem.7"] = "bn1"
    timm = {}
    for k, v in v1c.items():
        module, _, leaf = k.rpartition(".")
        timm[f"{renames.get(module, module)}.{leaf}"] = v
    rec = recognize_state_dict({**timm, "fc.weight": (1000, 128), "fc.bias": (1000,)})
    assert (rec.layout, rec.stem, rec.avg_down) == ("timm-deep", "deep32", False)
    mapping = backbone_mapping(rec, "mmseg_psp_r18_mini")
    assert mapping["conv1.0.weight"] == "backbone.stem.0.weight"
    assert mapping["bn1.running_var"] == "backbone.stem.7.running_var"
    assert mapping["layer2.0.downsample.1.weight"] == "backbone.layer2.0.downsample.1.weight"


def test_backbone_refusals_name_the_mismatch(tmp_path):
    v1c = tmp_path / "resnet18_v1c.pth"
    mmcv_v1c_file(v1c)
    with pytest.raises(WeightsError) as info:
        load_backbone(build("cirkd_deeplabv3_r18_mini"), v1c)
    assert str(info.value) == (
        f"{v1c}: cannot initialise the backbone of cirkd_deeplabv3_r18_mini from this file: the file's backbone has a "
        "deep stem 3->32->32->64 (ResNetV1c), cirkd_deeplabv3_r18_mini a deep stem 3->64->64->128 (CSAIL / SKD / "
        "CIRKD); use a deep-stem file (CSAIL's or CIRKD's resnet18-imagenet.pth / resnet101-imagenet.pth)"
    )
    tv = {"conv1.weight": (64, 3, 7, 7), "bn1.weight": (64,), "fc.weight": (1000, 512)}
    tv |= {f"layer{n}.0.conv1.weight": (64 * 2 ** (n - 1), 64, 3, 3) for n in range(1, 5)}
    rec = recognize_state_dict(tv)
    assert (rec.layout, rec.stem) == ("torchvision", "7x7")
    with pytest.raises(WeightsError, match=r"a single 7x7 stem conv \(torchvision / timm ResNet\), psp18 a deep stem"):
        backbone_mapping(rec, "psp18")
    r101 = {k[len("backbone.") :]: v for k, v in model_shapes("mmseg_psp_r101").items() if k.startswith("backbone.")}
    with pytest.raises(WeightsError) as info:
        backbone_mapping(recognize_state_dict(r101), "mmseg_psp_r18")
    assert str(info.value) == (
        "cannot initialise the backbone of mmseg_psp_r18 from this file: the file holds a ResNetV1c-101 (deep stem "
        "32/32/64) backbone; mmseg_psp_r18 has a ResNetV1c-18-d8"
    )


def test_official_teacher_backbone_is_converted_from_inplace_abn(tmp_path):
    src = build("psp18_mini", seed=1)
    randomise_bn(src)
    path = tmp_path / "official.pth"
    torch.save(to_official(src.state_dict()), path)
    student = build("psp18_mini", seed=7)
    report = load_backbone(student, path)
    torch.testing.assert_close(student.bn1.weight, src.bn1.weight)  # |w'| + 1e-5 = w
    assert torch.equal(student.layer2[0].conv1.weight, src.layer2[0].conv1.weight)
    assert set(report.random_modules()) == {"pspmodule", "head", "dsn"}
