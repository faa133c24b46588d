"""Teacher precision: the choices and refusals, fp32 exactness, and the measured error a store records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_tools import open_cache
from cache_tools.datasets import open_dataset
from cache_tools.errors import ConfigError, ConfigMismatchError
from pipeline.build import BuildConfig, build_cache
from pipeline.cli import main as cache_main
from pipeline.inference import PRECISIONS, _tf32, check_precision, run_teacher, teacher_precision
from pipeline.teachers import create_teacher
from tests.cli import run_cli

CPU = torch.device("cpu")
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cache_v1"


def _config(sample_root, out, **kw) -> BuildConfig:
    base = dict(
        teacher="psp_tiny",
        random_weights=True,
        data=str(sample_root),
        out=str(out),
        device="cpu",
        loader_workers=0,
        writer_threads=1,
        shard_images=3,
        fidelity_samples=2,
    )
    base.update(kw)
    return BuildConfig(**base)


def _teacher(num_classes: int):
    return create_teacher("psp_tiny", num_classes=num_classes, random_weights=True, seed=0, device="cpu").model


def _image(dataset, i: int) -> torch.Tensor:
    image, _label, _sha = dataset.load(i)
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]


# ------------------------------------------------------------------------------------------------
# choices and refusals


def test_the_choices_and_the_default():
    assert PRECISIONS == ("fp32", "tf32", "fp16", "bf16")
    assert BuildConfig.__dataclass_fields__["precision"].default == "fp32"
    with pytest.raises(ConfigError, match="--precision must be one of fp32, tf32, fp16, bf16; got 'fp64'"):
        BuildConfig(teacher="psp_tiny", data="d", out="o", precision="fp64")


@pytest.mark.parametrize("precision", ["fp16", "tf32"])
def test_fp16_and_tf32_are_refused_on_cpu(precision, sample_root, tmp_path):
    with pytest.raises(ConfigError, match=r"on CPU the teacher runs in fp32 \(or bf16 when asked\)") as err:
        check_precision(CPU, precision)
    assert "\n" not in str(err.value)
    refused = pytest.raises(ConfigError, match=f"--teacher-precision {precision}: on CPU")
    with refused, teacher_precision(CPU, precision, flag="--teacher-precision"):
        pass
    out = tmp_path / "c.zarr"
    with pytest.raises(ConfigError, match=f"--precision {precision}: on CPU"):
        build_cache(_config(sample_root, out, precision=precision))
    assert not out.exists()  # refused while planning, before the destination is touched


def test_no_amp_is_fp32_and_contradicts_another_precision(sample_root, tmp_path):
    with pytest.raises(ConfigError, match=r"--no-amp \(deprecated\) means --precision fp32.*drop --no-amp"):
        build_cache(_config(sample_root, tmp_path / "a.zarr", amp=False, precision="bf16"))
    result = build_cache(_config(sample_root, tmp_path / "b.zarr", amp=False))
    assert result.schema.build["precision"] == "fp32"


def test_tf32_flags_are_set_for_cuda_and_restored():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    try:
        matmul.allow_tf32, cudnn.allow_tf32 = False, True  # torch's defaults: convolutions in TF32
        with _tf32(torch.device("cuda"), False):  # fp32: both off
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, False)
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, True)
        with _tf32(torch.device("cuda"), True):  # tf32: both on
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (True, True)
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, True)
        with _tf32(CPU, True):  # CPU arithmetic is not touched
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, True)
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


# ------------------------------------------------------------------------------------------------
# what each precision computes


def test_fp32_is_bit_identical_to_the_plain_forward_and_bf16_is_not(sample_root):
    dataset = open_dataset(sample_root)
    model = _teacher(dataset.num_classes)
    x = _image(dataset, 0)
    with torch.inference_mode():
        plain = model(x)
    logits, feature = run_teacher(model, x, CPU, "fp32")
    assert torch.equal(logits, plain.logits) and torch.equal(feature, plain.feature)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 turns an enclosing autocast off
        inside, _ = run_teacher(model, x, CPU, "fp32")
    assert torch.equal(inside, plain.logits)
    low, low_feature = run_teacher(model, x, CPU, "bf16")
    assert low.dtype == torch.float32 and low.shape == plain.logits.shape
    assert not torch.equal(low, plain.logits) and not torch.equal(low_feature, plain.feature)
    # bf16 keeps ~3 significant digits: close, not equal
    assert float((low - plain.logits).abs().max()) < 0.05 * float(plain.logits.abs().max()) + 0.05


# ------------------------------------------------------------------------------------------------
# the store's provenance


def test_bf16_error_is_measured_and_recorded_beside_the_codec_fidelity(sample_root, tmp_path, capsys):
    exact = build_cache(_config(sample_root, tmp_path / "fp32.zarr")).schema
    assert exact.build["precision"] == "fp32"
    assert exact.build["precision_error"] == {"reference": "fp32", "exact": True}

    out = tmp_path / "bf16.zarr"
    s = build_cache(_config(sample_root, out, precision="bf16")).schema
    assert s.build["precision"] == "bf16" and s.fidelity["sampled_entries"] >= 2
    pe = s.build["precision_error"]
    assert pe["reference"] == "fp32" and pe["exact"] is False and pe["sampled_entries"] == 2

    # independently: the fidelity sample's first two entries (6 images, 2 samples: entries 0 and 3)
    dataset = open_dataset(sample_root)
    model = _teacher(dataset.num_classes)
    diffs, agree = [], []
    for i in (0, 3):
        ref, _ = run_teacher(model, _image(dataset, i), CPU, "fp32")
        low, _ = run_teacher(model, _image(dataset, i), CPU, "bf16")
        diffs.append(float((ref - low).abs().max()))
        agree.append((ref.argmax(1) == low.argmax(1)).float().mean().item())
    assert pe["max_abs_logit_diff"] == pytest.approx(max(diffs), rel=1e-6)
    assert pe["argmax_agreement"] == pytest.approx(np.mean(agree), rel=1e-6)
    assert 0 < pe["kl_t1_mean"] <= pe["kl_t1_max"]
    assert pe["pair_cos_err_max"] >= pe["pair_cos_err_mean"] >= 0
    assert set(pe["stored_vs_fp32"]) == {"kl_t1_mean", "kl_t1_max", "argmax_agreement"}

    # the stored targets are bf16's: they differ from the fp32 build's
    a, b = open_cache(str(tmp_path / "fp32.zarr")), open_cache(str(out))
    assert not np.array_equal(a.read_entry(0).logits, b.read_entry(0).logits)

    code, stdout, _ = run_cli(cache_main, ["info", str(out), "--json"], capsys)
    assert code == 0
    shown = json.loads(stdout)["build"]
    assert shown["precision"] == "bf16" and shown["precision_error"] == pe


def test_a_store_is_resumed_only_at_its_own_precision(sample_root, tmp_path):
    out = tmp_path / "c.zarr"
    build_cache(_config(sample_root, out))
    with pytest.raises(ConfigMismatchError, match=r"built with --precision fp32 \(now bf16\).*--overwrite"):
        build_cache(_config(sample_root, out, precision="bf16"))
    assert open_cache(str(out)).schema.build["precision"] == "fp32"  # untouched
    again = build_cache(_config(sample_root, out, precision="bf16", overwrite=True))
    assert not again.already_complete and again.schema.build["precision"] == "bf16"
    assert build_cache(_config(sample_root, out, precision="bf16")).already_complete


def test_stores_from_before_the_choice_still_open(tmp_path, capsys):
    for name in ("dense.zarr", "views.zarr"):
        shutil.copytree(FIXTURES / name, tmp_path / name)
        s = open_cache(str(tmp_path / name)).schema
        assert "precision" not in s.build  # nothing recorded, nothing invented
        code, stdout, _ = run_cli(cache_main, ["info", str(tmp_path / name), "--json"], capsys)
        assert code == 0 and json.loads(stdout)["build"] == s.build
