"""The model registry, teacher creation, and safe checkpoint loading (official, project, safetensors).

The names are imported from their modules (``pipeline.registry``, ``pipeline.weights``,
``pipeline.teachers``); one test checks that ``pipeline.teachers`` still re-exports the moved ones.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from torch import nn

from cache_tools.errors import ModelError, WeightsError
from cache_tools.schema import TeacherStamp
from pipeline import registry
from pipeline.models import SegOutput
from pipeline.registry import create_model, list_models, list_teachers, register_model
from pipeline.teachers import create_teacher
from pipeline.weights import (
    LoadReport,
    convert_official_state_dict,
    detect_format,
    load_weights,
    read_state_dict,
    save_weights,
    weights_sha256,
)

REQUIRED = {
    "psp101",
    "psp50",
    "psp34",
    "psp18",
    "deeplabv3_r18",
    "mbv2",
    "psp34_mini",
    "psp18_mini",
    "deeplabv3_r18_mini",
    "mbv2_mini",
    "psp_tiny",
}
UNPICKLED: list[str] = []


class Evil:
    """Stands for arbitrary code in a pickle: unpickling it would record itself."""

    def __setstate__(self, state):
        UNPICKLED.append("Evil")


class Hostile:
    """Pickles as a call of os.system: a checkpoint that would run a command if it were unpickled."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def model(name="psp_tiny", seed=0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, **kwargs).eval()


def randomise_bn(m: nn.Module, seed: int = 1) -> None:
    """Non-trivial BN parameters and statistics, so that a wrong conversion changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            n = mod.num_features
            mod.weight.data = torch.rand(n, generator=g) + 0.5
            mod.bias.data = torch.randn(n, generator=g) * 0.1
            mod.running_mean.data = torch.randn(n, generator=g) * 0.1
            mod.running_var.data = torch.rand(n, generator=g) + 0.5


def to_official(sd: dict[str, torch.Tensor], seed: int = 2) -> dict[str, torch.Tensor]:
    """This project's state dict -> the official toolbox / InPlace-ABN checkpoint layout."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.endswith(".weight") and k[: -len("weight")] + "running_var" in sd:
            sign = torch.where(torch.rand(v.shape, generator=g) < 0.5, -1.0, 1.0)
            v = sign * (v - 1e-5)  # ABN stores w' with |w'| + 1e-5 = w
        if k.startswith("pspmodule."):
            k = "head.0." + k[len("pspmodule.") :]
        elif k.startswith("head."):
            k = "head.1." + k[len("head.") :]
        out[k] = v
    out["fc.weight"] = torch.randn(1000, 8)
    out["fc.bias"] = torch.randn(1000)
    return out


def outputs(m: nn.Module, x: torch.Tensor) -> SegOutput:
    with torch.no_grad():
        return m.eval()(x)


X = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(0)) * 255


# ---------------------------------------------------------------------------------------------- registry


def test_registry_lists_the_required_models():
    names = {e.name for e in list_models()}
    assert names >= REQUIRED
    assert [e.name for e in list_models()] == sorted(names)
    assert "psp101" in {e.name for e in list_teachers()}
    assert "psp101" not in {e.name for e in list_models("student")}
    assert {"psp18", "psp18_mini", "mbv2"} <= {e.name for e in list_models("student")}
    assert all(e.description and e.roles for e in list_models())
    with pytest.raises(ModelError, match="unknown role"):
        list_models("critic")


def test_register_model_warns_on_overwrite(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_model("tmp_model", description="first", roles=("student",))
    def first(num_classes=19, **kwargs):
        return create_model("psp_tiny", num_classes=num_classes, **kwargs)

    with pytest.warns(UserWarning, match="registered again"):

        @register_model("tmp_model", description="second")
        def second(num_classes=19, **kwargs):
            return create_model("psp_tiny", num_classes=num_classes, aux=False, **kwargs)

    m = create_model("tmp_model", num_classes=3)
    assert m.dsn is None and m.model_name == "tmp_model"
    assert {e.name: e.description for e in list_models()}["tmp_model"] == "second"


def test_unknown_model_lists_known_names():
    with pytest.raises(ModelError) as info:
        create_model("psp1O1")
    msg = str(info.value)
    assert msg.startswith("unknown model 'psp1O1'; known: ")
    assert "deeplabv3_r18, deeplabv3_r18_mini, mbv2," in msg
    assert "psp101" in msg and "(or give package.module:factory)" in msg and "\n" not in msg


def test_create_model_options():
    m = create_model("psp_tiny", num_classes=5, aux=None, psp_out=8)  # None options are dropped
    assert m.model_name == "psp_tiny" and m.head.out_channels == 5 and m.feature_channels == 8
    assert m.dsn is not None
    with pytest.raises(ModelError, match="does not take this option"):
        create_model("psp_tiny", colour="blue")
    with pytest.raises(ModelError, match="num_classes must be a positive integer"):
        create_model("psp_tiny", num_classes=0)


def test_custom_import_path():
    name = "tests.pipeline.custom_teacher:make"
    m = create_model(name, num_classes=7, channels=4)
    assert m.model_name == name
    out = m.eval()(torch.rand(1, 3, 33, 33) * 255)
    assert out.logits.shape == (1, 7, 5, 5)
    teacher = create_teacher(name, num_classes=7, random_weights=True)
    assert teacher.info.feature_channels == 8  # probed: the model has no feature_channels attribute
    assert teacher.info.architecture == "TinySeg" and teacher.info.normalization["order"] == "RGB"
    for bad, match in [
        ("tests.pipeline.no_such_module:make", "cannot import"),
        ("tests.pipeline.custom_teacher:nothing", "has no callable 'nothing'"),
        ("tests.pipeline.custom_teacher:", "expected package.module:factory"),
        ("tests.pipeline.custom_teacher:TinySeg.__init__", "expected package.module:factory"),
        ("os:system", "'os', a Python standard-library module, not a model package"),
        ("subprocess:run", "'subprocess', a Python standard-library module"),
        ("builtins:eval", "'builtins', a Python standard-library module"),
        ("torch:zeros", r"its factory torch:zeros\(num_classes=\.\.\.\) failed with TypeError"),
    ]:
        with pytest.raises(ModelError, match=match) as info:
            create_model(bad)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- teachers


def test_create_teacher_needs_weights():
    with pytest.raises(ModelError) as info:
        create_teacher("psp101")
    assert str(info.value) == (
        "teacher 'psp101' needs --weights PATH; random targets are useless — pass --random-weights only for smoke tests"
    )
    with pytest.raises(ModelError, match="not both"):
        create_teacher("psp_tiny", weights="x.pth", random_weights=True)


def test_random_teacher_is_reproducible_and_frozen():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = create_teacher("psp_tiny", random_weights=True, seed=3)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG is untouched
    b = create_teacher("psp_tiny", random_weights=True, seed=3)
    c = create_teacher("psp_tiny", random_weights=True, seed=4)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])
    assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())
    out = a.model(X)
    assert out.aux is None and torch.isfinite(out.logits).all()
    assert out.logits.abs().max() < 1e3  # BN statistics calibrated: fp16-safe targets
    info = a.info
    assert info.random_weights and info.seed == 3 and info.weights_sha256 is None and info.weights_path is None
    assert info.architecture == "PSPNet(resnet(BasicBlock[1,1,1,1])x0.125, psp_out=16, dsn)"
    assert info.feature_channels == 16 and info.num_classes == 19
    assert info.parameters == sum(p.numel() for p in a.model.parameters())
    assert isinstance(info, TeacherStamp) and (info.family, info.grid, info.ignore_index) == ("skd", "8k+1", 255)
    assert TeacherStamp.from_dict(json.loads(json.dumps(info.to_dict()))) == info  # what a store reads back


def test_teacher_from_weights(tmp_path):
    src = model(seed=5)
    randomise_bn(src)
    path = save_weights(src, tmp_path / "tiny.safetensors", {"step": 10})
    teacher = create_teacher("psp_tiny", weights=path, seed=99)
    assert torch.equal(outputs(teacher.model, X).logits, outputs(src, X).logits)
    assert teacher.info.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == weights_sha256(path)
    assert teacher.info.weights_path == str(path.resolve())
    assert not teacher.info.random_weights and teacher.info.seed is None
    assert teacher.report.converted_from == "safetensors" and teacher.report.ok


def test_teacher_from_an_already_read_file_uses_what_was_read(tmp_path):
    path = save_weights(model(seed=5), tmp_path / "tiny.safetensors")
    file = read_state_dict(path)
    file.state_dict["head.bias"] = file.state_dict["head.bias"] + 7.0  # only the in-memory copy changes
    teacher = create_teacher("psp_tiny", weights=path, state_dict=file)
    assert torch.equal(teacher.model.head.bias, file.state_dict["head.bias"])  # not the file's bias
    assert teacher.info.weights_sha256 == weights_sha256(path) and teacher.report.converted_from == "safetensors"
    with pytest.raises(ModelError, match="needs the weights path it was read from"):
        create_teacher("psp_tiny", random_weights=True, state_dict=file)


# ---------------------------------------------------------------------------------------------- weights


def test_save_load_roundtrip_with_metadata(tmp_path):
    src = model(seed=1)
    randomise_bn(src)
    path = save_weights(src, tmp_path / "sub" / "w.safetensors", {"step": 7, "note": "hello"})
    _, meta, source = read_state_dict(path)
    assert source == "safetensors"
    assert meta["model_name"] == "psp_tiny" and meta["num_classes"] == "19"
    assert meta["step"] == "7" and meta["note"] == "hello"
    dst = model(seed=2)
    report = load_weights(dst, path)
    assert isinstance(report, LoadReport) and report.ok and report.loaded == len(src.state_dict())
    assert "\n" not in report.summary() and "loaded" in report.summary()
    assert torch.equal(outputs(dst, X).feature, outputs(src, X).feature)
    renamed = tmp_path / "w.bin"  # recognised by content, not only by suffix
    os.replace(path, renamed)
    assert load_weights(model(seed=3), renamed).converted_from == "safetensors"


def test_project_training_checkpoint_and_dataparallel_prefix(tmp_path):
    src = model(seed=1)
    randomise_bn(src)
    sd = src.state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd, "model_name": "psp_tiny", "num_classes": 19, "step": 3, "optimizer": {}}, path)
    report = load_weights(model(seed=2), path)
    assert report.converted_from == "skd" and report.metadata == {"model_name": "psp_tiny", "num_classes": "19"}
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    dst = model(seed=2)
    load_weights(dst, path)
    assert torch.equal(outputs(dst, X).logits, outputs(src, X).logits)


@pytest.mark.parametrize("legacy", [False, True])
def test_official_layout_loads_and_reproduces_outputs(tmp_path, legacy):
    src = model(seed=1)
    randomise_bn(src)
    official = to_official(src.state_dict())
    assert "head.0.bottleneck.0.weight" in official and "head.1.weight" in official
    assert detect_format(official) == "official"
    path = tmp_path / "CS_scenes_official.pth"
    torch.save(official, path, _use_new_zipfile_serialization=not legacy)  # 2019 files are legacy pickles
    dst = model(seed=2)
    report = load_weights(dst, path)
    assert report.converted_from == "official" and report.ok
    assert sorted(report.ignored) == ["fc.bias", "fc.weight"]
    a, b = outputs(src, X), outputs(dst, X)
    assert torch.allclose(a.logits, b.logits, rtol=1e-4, atol=1e-4)
    assert torch.allclose(a.feature, b.feature, rtol=1e-4, atol=1e-4)
    # forcing "skd" leaves the toolbox names unconverted
    with pytest.raises(WeightsError, match="unexpected"):
        load_weights(model(), path, weights_format="skd")


def test_psp101_official_layout_roundtrip():
    src = model("psp101", seed=0)
    randomise_bn(src)
    official = to_official(src.state_dict())
    dst = model("psp101", seed=1)
    dst.load_state_dict(convert_official_state_dict(official), strict=True)
    x = X[..., :40, :40]
    a, b = outputs(src, x), outputs(dst, x)
    assert torch.allclose(a.logits, b.logits, rtol=1e-3, atol=1e-3 * a.logits.abs().max().item())
    assert torch.allclose(a.feature, b.feature, rtol=1e-3, atol=1e-3 * a.feature.abs().max().item())


def test_format_detection_rule():
    sd = model().state_dict()
    assert detect_format(sd) == "skd"
    assert detect_format({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}) == "official"
    assert detect_format({"w": torch.zeros(1)}) == "skd"  # no BN at all


def test_checkpoint_of_another_architecture(tmp_path):
    path = save_weights(model("psp18_mini"), tmp_path / "student.safetensors")
    with pytest.raises(WeightsError) as info:
        load_weights(model("psp_tiny"), path)
    msg = str(info.value)
    assert msg.startswith(f"checkpoint {path} does not fit psp_tiny: ")
    assert "48 unexpected (layer1.1." in msg and "missing" not in msg
    assert "mis-shaped (conv1.weight: checkpoint (16, 3, 3, 3) vs model (8, 3, 3, 3), " in msg
    assert "— is it a checkpoint of another architecture or class count?" in msg
    assert msg.endswith("(its metadata says model_name=psp18_mini, num_classes=19)") and "\n" not in msg


def test_checkpoint_with_another_class_count(tmp_path):
    path = tmp_path / "k21.pth"
    torch.save({"model": model(num_classes=21).state_dict()}, path)
    with pytest.raises(WeightsError) as info:
        load_weights(model(), path)
    msg = str(info.value)
    assert (
        "does not fit psp_tiny: 4 mis-shaped (head.weight: checkpoint (21, 16, 1, 1) vs model (19, 16, 1, 1), " in msg
    )
    assert msg.count(" vs model ") == 3 and "\n" not in msg  # at most three named
    report = load_weights(model(), path, strict=False)
    assert [m[0] for m in report.mismatched] == ["head.weight", "head.bias", "dsn.3.weight", "dsn.3.bias"]
    assert report.loaded == len(model().state_dict()) - 4 and not report.ok


def test_corrupt_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(4096))
    truncated = tmp_path / "truncated.pth"
    torch.save(model().state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    bad_st = tmp_path / "bad.safetensors"
    save_weights(model(), bad_st)
    bad_st.write_bytes(bad_st.read_bytes()[:3000])
    for path in (garbage, truncated, bad_st):
        with pytest.raises(WeightsError) as info:
            load_weights(model(), path)
        assert str(info.value).startswith(f"cannot read checkpoint {path}: ") and "\n" not in str(info.value)
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(model(), tmp_path / "nope.pth")
    not_a_sd = tmp_path / "ints.pth"
    torch.save({"model": {"a": 1}}, not_a_sd)
    with pytest.raises(WeightsError, match="holds no state dict"):
        load_weights(model(), not_a_sd)


def test_pickled_objects_are_skipped_not_unpickled(tmp_path):
    # another class beside the state dict: torch's weights_only load refuses it, the restricted
    # reader extracts the tensors and reports the object it skipped, without creating it
    src = model(seed=1)
    path = tmp_path / "with_object.pth"
    torch.save({"model": src.state_dict(), "x": Evil()}, path)
    dst = model(seed=2)
    report = load_weights(dst, path)
    assert report.ok and report.metadata["skipped"].startswith(
        "skipped 1 object of class tests.pipeline.test_teachers.Evil"
    )
    assert "skipped 1 object of class tests.pipeline.test_teachers.Evil" in report.summary()
    assert torch.equal(outputs(dst, X).logits, outputs(src, X).logits)
    assert UNPICKLED == []
    # a pickled object and no state dict: said so, nothing created
    torch.save(Evil(), path)
    with pytest.raises(WeightsError) as info:
        load_weights(model(), path)
    msg = str(info.value)
    assert "holds no state dict: it holds a pickled tests.pipeline.test_teachers.Evil object" in msg
    assert "\n" not in msg and UNPICKLED == []


def test_hostile_pickle_is_refused_naming_what_it_calls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "hostile.pth"
    torch.save({"model": model().state_dict(), "x": Hostile()}, path)
    with pytest.raises(WeightsError) as info:
        load_weights(model(), path)
    msg = str(info.value)
    assert msg.startswith(f"checkpoint {path} is refused: its pickle names posix.system") and "NOT executed" in msg
    assert "weights_only" not in msg and "\n" not in msg
    assert not (tmp_path / "PWNED").exists()


# ---------------------------------------------------------------------------------------------- backbone init


def csail_style(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CSAIL ImageNet checkpoint: the deep-stem backbone keys, plain BN, fc, no num_batches_tracked."""
    prefixes = ("conv", "bn", "layer")
    out = {k: v for k, v in sd.items() if k.startswith(prefixes) and not k.endswith("num_batches_tracked")}
    return {**out, "fc.weight": torch.randn(1000, 128), "fc.bias": torch.randn(1000)}
