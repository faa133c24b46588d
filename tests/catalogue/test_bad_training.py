"""Bad-input catalogue: training divergence, non-finite inputs, full disks and bad run options.

Each case runs ``skdstudent train`` in-process and checks the exit code, a single ``error:`` line
without traceback, and that what was in the run directory before is byte-identical afterwards (or
absent where nothing may be written).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.build import BuildConfig, build_cache
from pipeline.registry import create_model
from pipeline.weights import save_weights
from student.checkpoint import load_checkpoint
from student.cli import main
from tests.cli import assert_one_line_error, run_cli


def run(argv, capsys) -> tuple[int, str, str]:
    return run_cli(main, argv, capsys)


def _train(data, out, *extra) -> list[str]:
    return [
        "train", "--data", str(data), "--out", str(out), "--student", "psp_tiny", "--iters", "2",
        "--batch-size", "2", "--crop", "64x64", "--workers", "0", "--eval-split", "none", *extra,
    ]  # fmt: skip


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links as their target) by relative path."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_symlink() or p.is_file()
    }


def _user_file(out: Path) -> dict[str, bytes]:
    """A run directory holding a file of the user's; returns the snapshot to compare against."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "notes.txt").write_text("the user's own notes\n")
    return _snapshot(out)


def _nan_weights(path: Path) -> str:
    model = create_model("psp_tiny", num_classes=19)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    save_weights(model, path, {"model_name": "psp_tiny", "num_classes": 19})
    return str(path)


def _finite_teacher(tmp_path: Path) -> str:
    """A finite teacher (random weights), for cases where only the student should misbehave."""
    path = tmp_path / "teacher.safetensors"
    save_weights(create_model("psp_tiny", num_classes=19), path, {"model_name": "psp_tiny", "num_classes": 19})
    return str(path)


@pytest.fixture(scope="module")
def nan_cache(sample_root, tmp_path_factory) -> Path:
    """A complete fp32 dense cache whose first entry's logits are all NaN (checksum kept consistent)."""
    import zarr

    from cache_tools.store import entry_checksum

    url = tmp_path_factory.mktemp("nan-cache") / "dense.zarr"
    build_cache(
        BuildConfig(
            teacher="psp_tiny",
            random_weights=True,
            data=str(sample_root),
            out=str(url),
            loader_workers=0,
            logits_codec="fp32",
        )
    )
    group = zarr.open_group(str(url), mode="r+")
    logits = group["logits/data"]
    bad = np.asarray(logits[0])
    bad[:] = np.nan
    logits[0] = bad
    parts = {"logits": {"data": bad}, "features": {n: np.asarray(a[0]) for n, a in group["features"].arrays()}}
    group["entries/checksum"][0] = np.uint64(entry_checksum(parts))
    return url


# ------------------------------------------------------------------------------------------------
# divergence and non-finite numbers: nothing non-finite is saved, the cause is named


def test_lr_overflow_in_one_iteration(sample_root, tmp_path, capsys):
    out = tmp_path / "run"
    before = _user_file(out)
    argv = _train(sample_root, out, "--teacher", "psp_tiny", "--weights", _finite_teacher(tmp_path), "--iters", "1")
    code, _, err = run([*argv, "--lr", "1e38"], capsys)
    assert_one_line_error(code, err, "non-finite", "learning rate is too high", "--lr 1e+38", "nothing to resume")
    assert "WGAN" not in err and not (out / "checkpoints").exists() and not (out / "model.safetensors").exists()
    assert all(_snapshot(out)[k] == v for k, v in before.items())


def test_lr_overflow_over_several_steps_saves_no_checkpoint(sample_root, tmp_path, capsys):
    out = tmp_path / "run"
    before = _user_file(out)
    code, _, err = run(
        _train(sample_root, out, "--losses", "none", "--iters", "4", "--ckpt-every", "2", "--lr", "1e38"), capsys
    )
    assert_one_line_error(code, err, "non-finite", "--lr 1e+38")
    assert _snapshot(out).keys() <= before.keys() | {"config.json", "metrics.jsonl"}
    assert all(_snapshot(out)[k] == v for k, v in before.items())


def test_nan_online_teacher_weights_are_refused_before_training(sample_root, tmp_path, capsys):
    out = tmp_path / "run"
    before = _user_file(out)
    weights = _nan_weights(tmp_path / "nan.safetensors")
    code, _, err = run(_train(sample_root, out, "--teacher", "psp_tiny", "--weights", weights), capsys)
    assert_one_line_error(code, err, "--weights", "holds NaN/inf values")
    assert "WGAN" not in err and not (out / "checkpoints").exists()
    assert all(_snapshot(out)[k] == v for k, v in before.items())


def test_nan_pretrained_backbone_is_refused_before_training(sample_root, tmp_path, capsys):
    out = tmp_path / "run"
    before = _user_file(out)
    weights = _nan_weights(tmp_path / "nan.safetensors")
    code, _, err = run(_train(sample_root, out, "--losses", "none", "--pretrained", weights), capsys)
    assert_one_line_error(code, err, "--pretrained", "holds NaN/inf values")
    assert all(_snapshot(out)[k] == v for k, v in before.items()) and not (out / "checkpoints").exists()


@pytest.mark.slow
def test_overflowing_online_teacher_outputs_are_blamed_on_the_teacher(sample_root, tmp_path, capsys):
    out = tmp_path / "run"
    path = tmp_path / "huge.safetensors"
    model = create_model("psp_tiny", num_classes=19)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1e30)  # finite weights whose outputs overflow
    save_weights(model, path, {"model_name": "psp_tiny", "num_classes": 19})
    code, _, err = run(_train(sample_root, out, "--teacher", "psp_tiny", "--weights", str(path)), capsys)
    assert_one_line_error(code, err, "the teacher targets became non-finite at step 1", "check --weights")
    assert "WGAN" not in err and not (out / "checkpoints").exists()


def test_nan_teacher_targets_from_a_cache(sample_root, nan_cache, tmp_path, capsys):
    out = tmp_path / "run"
    before = _user_file(out)
    cache_before = _snapshot(nan_cache)
    code, _, err = run(
        _train(sample_root, out, "--cache", str(nan_cache), "--iters", "3", "--log-every", "100"), capsys
    )
    assert_one_line_error(code, err, "the teacher targets became non-finite", "skdcache verify", "rebuild")
    assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists()
    assert all(_snapshot(out)[k] == v for k, v in before.items())
    assert _snapshot(nan_cache) == cache_before


@pytest.mark.slow
def test_critic_blow_up_is_blamed_on_the_critic(sample_root, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _train(sample_root, out, "--teacher", "psp_tiny", "--weights", _finite_teacher(tmp_path), "--iters", "4")
    code, _, err = run([*argv, "--critic-optimizer", "adam", "--critic-lr", "1e30", "--lr", "1e-9"], capsys)
    assert_one_line_error(code, err, "critic blew up", "--adversarial hinge", "--critic-lr (now 1e+30)")
    assert "learning rate is too high" not in err and not (out / "checkpoints").exists()


def test_divergence_after_a_good_checkpoint_keeps_it_and_says_where(sample_root, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, _ = run(_train(sample_root, out, "--losses", "none"), capsys)
    assert code == 0
    before = _snapshot(out)
    argv = _train(sample_root, out, "--losses", "none", "--iters", "5", "--log-every", "100", "--resume")
    code, _, err = run([*argv, "--lr", "1e38"], capsys)
    assert_one_line_error(code, err, "last good checkpoint", "(step 2) is kept", "--resume")
    after = _snapshot(out)
    assert all(after[k] == v for k, v in before.items() if k != "config.json")  # config.json: this attempt's


def test_resume_from_a_checkpoint_holding_nan_is_refused(sample_root, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, _ = run(_train(sample_root, out, "--losses", "none"), capsys)
    assert code == 0
    last = out / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["model"]["conv1.weight"] = torch.full_like(state["model"]["conv1.weight"], float("inf"))
    torch.save(state, last)  # what an older skd saved as "the last good checkpoint"
    before = _snapshot(out)
    code, _, err = run(_train(sample_root, out, "--losses", "none", "--iters", "4", "--resume"), capsys)
    assert_one_line_error(code, err, "holds NaN/inf values (model.conv1.weight)", "start a new run")
    assert _snapshot(out) == before


def test_a_batch_without_labelled_pixels_trains_finitely(sample_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(sample_root, data)
    for label in (data / "gtFine").rglob("*_labelIds.png"):
        size = Image.open(label).size
        Image.fromarray(np.zeros(size[::-1], np.uint8)).save(label)  # label id 0: unlabeled -> ignore
    out = tmp_path / "run"
    code, _, err = run(_train(data, out, "--losses", "none", "--json"), capsys)
    assert code == 0, err
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["metrics"]["task"] == 0.0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------------
# full disk and run options


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_full_disk_while_saving_a_checkpoint(sample_root, tmp_path, capsys):
    out = tmp_path / "run"
    before = _user_file(out)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.pt.tmp").symlink_to("/dev/full")  # every write fails with ENOSPC
    code, _, err = run(_train(sample_root, out, "--losses", "none", "--log-every", "100"), capsys)
    assert_one_line_error(code, err, "the disk is full", "no last.pt was written")
    assert not (out / "checkpoints" / "last.pt.tmp").is_symlink() and not (out / "checkpoints" / "last.pt").exists()
    assert not (out / "model.safetensors").exists()
    assert all(_snapshot(out)[k] == v for k, v in before.items())


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_full_disk_while_logging(sample_root, tmp_path, capsys):
    out = tmp_path / "run"
    before = _user_file(out)
    (out / "metrics.jsonl").symlink_to("/dev/full")
    code, _, err = run(_train(sample_root, out, "--losses", "none", "--log-every", "1"), capsys)
    assert_one_line_error(code, err, "metrics.jsonl: the disk is full")
    assert all(_snapshot(out)[k] == v for k, v in before.items()) and not (out / "model.safetensors").exists()


def test_an_unlabelled_eval_split_is_refused_before_training(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "classes.txt").write_text("road\ncar\n")
    rng = np.random.default_rng(0)
    for split, labelled in (("train", True), ("test", False)):
        for d in ("images", "masks") if labelled else ("images",):
            (data / d / split).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
                data / "images" / split / f"{i}.png"
            )
            if labelled:
                Image.fromarray(rng.integers(0, 2, (64, 64), dtype=np.uint8)).save(data / "masks" / split / f"{i}.png")
    out = tmp_path / "run"
    code, _, err = run(_train(data, out, "--losses", "none", "--eval-split", "test"), capsys)
    assert_one_line_error(code, err, "--eval-split test", "no label", "--eval-split none")
    assert not out.exists()


def test_an_unknown_eval_split_is_refused_before_training(sample_root, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(_train(sample_root, out, "--losses", "none", "--eval-split", "nosuch"), capsys)
    assert_one_line_error(code, err, "--eval-split nosuch", "available: train, val", "--eval-split none")
    assert not out.exists()


def test_a_run_directory_is_never_trained_over_without_resume(sample_root, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, _ = run(_train(sample_root, out, "--losses", "none", "--iters", "1"), capsys)
    assert code == 0
    before = _snapshot(out)
    code, _, err = run(_train(sample_root, out, "--losses", "none", "--iters", "1"), capsys)
    assert_one_line_error(code, err, "already holds a run", "--resume")
    assert _snapshot(out) == before


def test_resume_without_a_checkpoint(sample_root, tmp_path, capsys):
    out = tmp_path / "run"
    before = _user_file(out)
    code, _, err = run(_train(sample_root, out, "--losses", "none", "--resume"), capsys)
    assert_one_line_error(code, err, "--resume: no checkpoint")
    assert _snapshot(out) == before
