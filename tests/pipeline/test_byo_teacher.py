"""Bring your own teacher (issue 11), through the CLI: each family's published checkpoint layout builds a
cache without ``--teacher``; the family's conventions are recorded; the sanity gate stops an untrained
teacher and records a good one; a student of another family gets the teacher's targets on its own grid.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cache_tools import open_cache
from cache_tools.datasets import open_dataset
from pipeline.cli import main
from pipeline.families import FAMILIES
from pipeline.models.base import IMAGENET_NORM, InputNorm, SegOutput
from pipeline.registry import create_model
from pipeline.teachers import create_teacher
from pipeline.views import apply_view
from pipeline.weights import save_weights
from student.data import PairSpec, SegTrainData
from tests.cli import assert_one_line_error, run_cli
from tests.pipeline.test_checkpoint_io import as_mmengine, mmseg_checkpoint
from tests.pipeline.test_teachers import randomise_bn, to_official


def run(argv, capsys) -> tuple[int, str, str]:
    return run_cli(main, argv, capsys)


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = create_model(name, num_classes=19).eval()
    randomise_bn(m)
    for k, v in m.state_dict().items():  # a trained-looking classifier: mmseg initialises its bias to zero
        if k.endswith(("conv_seg.bias", "head.block.4.bias")):
            v.copy_(torch.randn_like(v))
    return m


def _mmseg_file(m: nn.Module, path) -> None:
    with as_mmengine():  # meta holds mmengine objects: read without importing them
        torch.save(mmseg_checkpoint(m.state_dict()), path)


def _cirkd_file(m: nn.Module, path) -> None:
    torch.save({"module." + k: v for k, v in m.state_dict().items()}, path)  # as saved from DDP


def _official_file(m: nn.Module, path) -> None:
    torch.save(to_official(m.state_dict()), path, _use_new_zipfile_serialization=False)


PUBLISHED = {
    "mmseg_psp_r18_mini": ("pspnet_r18-d8_512x1024_80k_cityscapes.pth", _mmseg_file),
    "mmseg_deeplabv3_r18_mini": ("deeplabv3_r18-d8_512x1024_80k_cityscapes.pth", _mmseg_file),
    "cirkd_deeplabv3_r18_mini": ("deeplabv3_resnet18_citys_best_model.pth", _cirkd_file),
    "psp18_mini": ("CS_scenes_38413_0.7832.pth", _official_file),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_layout_builds_without_teacher_and_matches_its_forward(name, sample_root, tmp_path, capsys):
    m = _model(name)
    filename, save = PUBLISHED[name]
    path = tmp_path / filename
    save(m, path)
    out = str(tmp_path / "c.zarr")
    args = ["build", "--weights", str(path), "--data", str(sample_root), "--out", out, "--loader-workers", "0"]
    code, stdout, err = run([*args, "--no-teacher-check", "--logits-codec", "fp32", "--no-features", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["recognised"]["chosen"] == name and summary["teacher_check"] is None
    family = FAMILIES[m.family] if hasattr(m, "family") else FAMILIES["skd"]
    reader = open_cache(out)
    t = reader.schema.teacher
    assert (t.name, t.family, t.grid, t.align_corners) == (name, family.family, family.grid, family.align_corners)
    assert t.normalization == family.normalization.to_dict()
    # the stored logits are the family's own forward on the same images (fp32 codec: exact)
    ds = open_dataset(sample_root, splits="train")
    worst = 0.0
    for e in range(reader.num_entries):
        image, _, _ = ds.load(e)
        with torch.no_grad():
            ref = m(torch.from_numpy(image).permute(2, 0, 1)[None].float()).logits[0]
        got = torch.from_numpy(reader.read_entry(e).logits)
        assert got.shape == ref.shape
        worst = max(worst, float((got - ref).abs().max()))
    assert worst < 1e-4 * max(1.0, float(ref.abs().max())), worst
    # skdcache weights names the model and how it loads
    code, stdout, _ = run(["weights", str(path), "--json"], capsys)
    info = json.loads(stdout)
    assert code == 0 and info["recognition"]["model_name"] == name
    code, stdout, _ = run(["info", out], capsys)
    assert code == 0 and f"family {family.family}" in stdout and "teacher check: not run" in stdout


def test_a_teacher_that_does_not_fit_names_what_the_file_holds(sample_root, tmp_path, capsys):
    path = tmp_path / "pspnet.pth"
    _mmseg_file(_model("mmseg_psp_r18_mini"), path)
    out = tmp_path / "c.zarr"
    argv = ["build", "--teacher", "psp18_mini", "--weights", str(path), "--data", str(sample_root), "--out", str(out)]
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, "--teacher psp18_mini does not fit", "mmseg PSPNet ResNetV1c-18-d8")
    assert "--teacher mmseg_psp_r18_mini" in err and not out.exists()


def test_gate_stops_an_untrained_teacher_before_anything_is_written(sample_root, tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "pspnet.pth"
    _mmseg_file(create_model("mmseg_psp_r18_mini").eval(), path)  # mmseg's init: conv_seg bias all zero
    out = tmp_path / "c.zarr"
    code, _, err = run(["build", "--weights", str(path), "--data", str(sample_root), "--out", str(out)], capsys)
    assert_one_line_error(
        code, err, "near chance", "input normalisation", "decode_head.conv_seg.bias is still all zero"
    )
    assert "--no-teacher-check" in err and not out.exists()


# ---------------------------------------------------------------------------------------------- the gate passes


def _key(x: Tensor) -> bytes:
    return x.to(torch.uint8).cpu().numpy().tobytes()


class Oracle(nn.Module):
    """A teacher that predicts the stored label of the image it is given (unknown images: class 0)."""

    family = "mmseg"
    align_corners = False

    def __init__(self, num_classes: int = 19):
        super().__init__()
        self.input_norm = InputNorm(IMAGENET_NORM)
        self.head = nn.Conv2d(1, num_classes, 1)
        nn.init.constant_(self.head.bias, 0.5)
        self.k = self.feature_channels = num_classes
        ds = open_dataset(os.environ["SKD_TEST_ORACLE_DATA"], splits="train,val")
        self.labels = {}
        for i in range(len(ds)):
            image, label, _ = ds.load(i)
            self.labels[_key(torch.from_numpy(image).permute(2, 0, 1))] = torch.from_numpy(label.astype(np.int64))

    def output_grid(self, h: int, w: int) -> tuple[int, int]:
        return h, w  # one-hot labels at full resolution

    def forward(self, x: Tensor) -> SegOutput:
        out = []
        for img in x:
            label = self.labels.get(_key(img), torch.zeros(img.shape[-2:], dtype=torch.int64))
            out.append(F.one_hot(label % self.k, self.k).permute(2, 0, 1).float())
        logits = torch.stack(out)
        return SegOutput(logits, None, logits)


def oracle(num_classes: int = 19) -> Oracle:
    return Oracle(num_classes)


def test_gate_records_a_good_teacher_and_info_shows_it(sample_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SKD_TEST_ORACLE_DATA", str(sample_root))
    weights = save_weights(Oracle(), tmp_path / "oracle.safetensors")
    out = str(tmp_path / "c.zarr")
    argv = ["build", "--teacher", f"{__name__}:oracle", "--weights", str(weights), "--data", str(sample_root)]
    argv += ["--out", out, "--check-split", "val", "--loader-workers", "0", "--no-features"]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    assert "teacher check: mIoU 100.0% on 2 labelled images of val" in " ".join(stdout.split())
    check = open_cache(out).schema.build["teacher_check"]
    assert check["verdict"] == "ok" and check["split"] == "val" and check["miou"] == 1.0
    code, stdout, _ = run(["info", out], capsys)
    assert code == 0 and "teacher check: mIoU 100.0%" in stdout and "family mmseg" in stdout
    code, stdout, _ = run(["info", out, "--json"], capsys)
    assert json.loads(stdout)["teacher_check"]["images"] == 2
    # the same command again: a complete cache, its recorded check reported, nothing re-run or rewritten
    before = (tmp_path / "c.zarr" / "zarr.json").read_bytes()
    code, stdout, err = run(argv, capsys)
    flat = " ".join(stdout.split())
    assert code == 0 and "nothing to do" in flat and "teacher check: mIoU 100.0%" in flat
    assert (tmp_path / "c.zarr" / "zarr.json").read_bytes() == before


def test_teachers_list_families_and_random_weights_need_a_name(sample_root, tmp_path, capsys):
    code, stdout, _ = run(["teachers", "--json"], capsys)
    family = {t["name"]: t["family"] for t in json.loads(stdout)}
    assert code == 0
    assert (family["psp101"], family["mmseg_psp_r101"], family["cirkd_deeplabv3_r101"]) == ("skd", "mmseg", "cirkd")
    code, stdout, _ = run(["teachers"], capsys)
    assert "family" in stdout
    argv = ["build", "--random-weights", "--data", str(sample_root), "--out", str(tmp_path / "c.zarr")]
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, "--random-weights needs --teacher NAME")


def test_student_backbone_from_the_open_mmlab_file(tmp_path, caplog):
    from student.models import create_student
    from tests.pipeline.test_recognize import mmcv_v1c_file

    path = tmp_path / "resnet18_v1c-b5776b93.pth"
    sd = mmcv_v1c_file(path)
    with caplog.at_level("INFO", logger="student.models"):
        student = create_student("mmseg_psp_r18_mini", num_classes=19, pretrained=path)
    assert torch.equal(student.backbone.stem[0].weight, sd["stem.0.weight"])
    assert "open-mmlab ImageNet ResNetV1c-18" in caplog.text and "stayed random: decode_head" in caplog.text


# ---------------------------------------------------------------------------------------------- item 4


def _views_store(sample_root, tmp_path, teacher: str, capsys, crop: str = "48x64") -> str:
    out = str(tmp_path / f"{teacher}.zarr")
    argv = ["build", "--teacher", teacher, "--random-weights", "--data", str(sample_root), "--out", out]
    argv += ["--mode", "views", "--views", "2", "--crop", crop, "--logits-codec", "fp32", "--features-block", "1x1"]
    code, _, err = run([*argv, "--features-codec", "fp32", "--loader-workers", "0"], capsys)
    assert code == 0, err
    return out


def _normalised(pixels: Tensor, length: int, align_corners: bool) -> Tensor:
    """grid_sample's coordinate of pixel positions on a map whose nodes follow ``align_corners``."""
    return 2 * pixels / (length - 1) - 1 if align_corners else 2 * (pixels + 0.5) / length - 1


@pytest.mark.parametrize(
    "teacher, student",
    [("mmseg_psp_r18_mini", "psp_tiny"), ("psp_tiny", "mmseg_psp_r18_mini")],
)
def test_student_of_another_family_gets_the_teachers_crop_on_its_own_grid(
    teacher, student, sample_root, tmp_path, capsys
):
    url = _views_store(sample_root, tmp_path, teacher, capsys)
    data = SegTrainData(str(sample_root), crop=(48, 64), cache=url, pair=PairSpec(), student=student, flip=False)
    s_model = create_model(student)
    t_model = create_teacher(teacher, random_weights=True, seed=0).model
    t_ac, s_ac = FAMILIES[_family(t_model)].align_corners, FAMILIES[_family(s_model)].align_corners
    hs, ws = s_model.output_grid(48, 64)
    assert data.teacher_grid == (hs, ws) and t_model.output_grid(48, 64) != (hs, ws)
    reader = open_cache(url)
    ds = open_dataset(sample_root, splits="train")
    worst = 0.0
    for n in range(4):
        sample = data[n]
        entry = reader.read_entry(data._entries[n])
        image, _, _ = ds.load(entry.image_index)
        crop, _ = apply_view(torch.from_numpy(image).permute(2, 0, 1), None, entry.view)
        with torch.no_grad():
            z = t_model(crop[None]).logits
        # the student's nodes on the crop by its convention, looked up on the teacher's map by the teacher's
        ys = torch.arange(hs, dtype=torch.float64)
        xs = torch.arange(ws, dtype=torch.float64)
        py = ys * (47 / (hs - 1)) if s_ac else (ys + 0.5) * (48 / hs) - 0.5
        px = xs * (63 / (ws - 1)) if s_ac else (xs + 0.5) * (64 / ws) - 0.5
        gy, gx = _normalised(py, 48, t_ac), _normalised(px, 64, t_ac)
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None].float()
        ref = F.grid_sample(z, grid, mode="bilinear", padding_mode="border", align_corners=t_ac)[0]
        assert sample.teacher_logits.shape == ref.shape == (19, hs, ws)
        worst = max(worst, float((sample.teacher_logits - ref).abs().max()))
        kernel = PairSpec().kernel((hs, ws))
        assert sample.teacher_nodes.shape[-2:] == (-(-hs // kernel[0]), -(-ws // kernel[1]))
    assert worst < 1e-4, worst


def _family(model: nn.Module) -> str:
    return getattr(model, "family", "skd")


@pytest.mark.slow
def test_skd_student_trains_from_an_mmseg_teacher_cache(sample_root, tmp_path, capsys):
    from student.train import train
    from tests.student.helpers import tiny_config

    url = _views_store(sample_root, tmp_path, "mmseg_psp_r18_mini", capsys, crop="64x64")  # the critic needs 8x8
    result = train(tiny_config(sample_root, tmp_path / "run", cache=url))
    assert result.steps == 2
    for key in ("task", "pixel", "pair"):
        assert key in result.last and np.isfinite(result.last[key])


_FAMILY_MINIS = {"skd": "psp18_mini", "mmseg": "mmseg_psp_r18_mini", "cirkd": "cirkd_deeplabv3_r18_mini"}


@pytest.fixture(scope="module")
def family_caches(sample_root, tmp_path_factory):
    """One small dense cache per family's teacher (random weights: the geometry is what is tested)."""
    from pipeline.cli import main

    root = tmp_path_factory.mktemp("family-caches")
    urls = {}
    for family, teacher in _FAMILY_MINIS.items():
        urls[family] = str(root / f"{family}.zarr")
        argv = ["build", "--teacher", teacher, "--random-weights", "--data", str(sample_root), "--out", urls[family]]
        try:
            main([*argv, "--loader-workers", "0", "--features-block", "1x1"])
        except SystemExit as exc:
            assert not exc.code, f"building the {family} cache failed"
    return urls


@pytest.mark.parametrize("teacher_family", list(_FAMILY_MINIS))
@pytest.mark.parametrize("student_family", list(_FAMILY_MINIS))
def test_students_of_each_family_train_from_each_familys_cache(
    teacher_family, student_family, family_caches, sample_root, tmp_path
):
    from student.train import train
    from tests.student.helpers import tiny_config

    cfg = tiny_config(
        sample_root,
        tmp_path / "run",
        student=_FAMILY_MINIS[student_family],
        cache=family_caches[teacher_family],
        losses=("pixel", "pair", "kd", "ifvd"),
        pixel_mode="kl",
    )
    result = train(cfg)
    assert result.steps == 2
    for key in ("task", "pixel", "pair", "kd", "ifvd"):
        assert key in result.last and np.isfinite(result.last[key]), (key, result.last)


def test_dense_mmseg_map_replayed_on_an_skd_students_view(sample_root, tmp_path, capsys):
    from pipeline.views import sample_view

    out = str(tmp_path / "dense.zarr")
    argv = ["build", "--teacher", "mmseg_psp_r18_mini", "--random-weights", "--data", str(sample_root), "--out", out]
    code, _, err = run([*argv, "--logits-codec", "fp32", "--no-features", "--loader-workers", "0"], capsys)
    assert code == 0, err
    data = SegTrainData(str(sample_root), crop=(48, 64), cache=out, student="psp_tiny", scales=(1.0,), flip=False)
    t_model = create_teacher("mmseg_psp_r18_mini", random_weights=True, seed=0).model
    ds = open_dataset(sample_root, splits="train")
    assert data.teacher_grid == (7, 9)
    for draw in range(3):
        image, _, _ = ds.load(draw)
        H, W = image.shape[:2]
        view = sample_view(np.random.default_rng([0, draw]), draw, (H, W), (48, 64), (1.0,), False)
        with torch.no_grad():
            z = t_model(torch.from_numpy(image).permute(2, 0, 1)[None].float()).logits
        y0, x0 = view.box[:2]
        py = y0 + torch.arange(7, dtype=torch.float64) * (47 / 6)  # the student's nodes (align_corners=True)
        px = x0 + torch.arange(9, dtype=torch.float64) * (63 / 8)
        gy, gx = _normalised(py, H, False), _normalised(px, W, False)  # on the mmseg map of the whole image
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None].float()
        ref = F.grid_sample(z, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        got = data[draw].teacher_logits
        assert float((got - ref).abs().max()) < 1e-4
