"""skdstudent from the command line: train/eval/students, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from pipeline.build import BuildConfig, build_cache
from pipeline.registry import create_model
from pipeline.weights import save_weights
from student.cli import main
from tests.cli import assert_one_line_error, assert_refused, run_cli


def run(argv, capsys) -> tuple[int, str, str]:
    return run_cli(main, argv, capsys)


@pytest.fixture(scope="module")
def caches(sample_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-caches")
    common = dict(teacher="psp_tiny", random_weights=True, data=str(sample_root), loader_workers=0)
    build_cache(BuildConfig(out=str(root / "dense.zarr"), shard_images=2, **common))
    build_cache(BuildConfig(out=str(root / "nofeat.zarr"), features=False, **common))
    return root


def _train(sample_root, out, *extra):
    return [
        "train", "--data", str(sample_root), "--out", str(out), "--student", "psp_tiny", "--iters", "2",
        "--batch-size", "2", "--crop", "64x64", "--workers", "0", *extra,
    ]  # fmt: skip


def test_students_train_and_eval(sample_root, caches, tmp_path, capsys):
    code, out, _ = run(["students", "--json"], capsys)
    assert code == 0 and "psp18" in {s["name"] for s in json.loads(out)}
    code, out, _ = run(_train(sample_root, tmp_path / "run", "--cache", str(caches / "dense.zarr"), "--json"), capsys)
    assert code == 0
    summary = json.loads(out)
    assert summary["steps"] == 2 and 0 <= summary["miou"] <= 1
    code, out, _ = run(
        ["eval", "--checkpoint", summary["weights"], "--data", str(sample_root), "--json", "--device", "cpu"], capsys
    )
    assert code == 0 and json.loads(out)["images"] == 2
    code, out, _ = run(["eval", "--checkpoint", summary["checkpoint"], "--data", str(sample_root)], capsys)
    assert code == 0 and "mIoU" in out


def test_bad_input_is_one_line(sample_root, caches, tmp_path, capsys):
    # cache and dataset that do not match: the val split is not in the cache
    code, _, err = run(
        _train(sample_root, tmp_path / "a", "--cache", str(caches / "dense.zarr"), "--split", "val"), capsys
    )
    assert_one_line_error(code, err, "are not in the cache")
    # a pair-wise loss asked of a store without features
    code, _, err = run(_train(sample_root, tmp_path / "b", "--cache", str(caches / "nofeat.zarr")), capsys)
    assert_one_line_error(code, err, "needs teacher features", "--no-features")
    # a checkpoint from another architecture (online teacher, and eval)
    wrong = tmp_path / "w.safetensors"
    save_weights(create_model("psp18_mini", num_classes=19), wrong, {"model_name": "psp18_mini", "num_classes": 19})
    code, _, err = run(_train(sample_root, tmp_path / "c", "--teacher", "psp_tiny", "--weights", str(wrong)), capsys)
    assert_one_line_error(code, err, "does not fit psp_tiny")
    code, _, err = run(["eval", "--checkpoint", str(tmp_path / "nope.pt"), "--data", str(sample_root)], capsys)
    assert_one_line_error(code, err, "does not exist")
    # an unwritable output directory
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(_train(sample_root, blocker / "run", "--losses", "none"), capsys)
    assert_one_line_error(code, err, "cannot write to --out")
    # a cache URL that does not exist
    code, _, err = run(_train(sample_root, tmp_path / "d", "--cache", str(tmp_path / "missing.zarr")), capsys)
    assert_one_line_error(code, err, "no cache at")


def test_a_corrupt_chunk_stops_training_with_one_line(sample_root, caches, tmp_path, capsys):
    import shutil

    url = tmp_path / "corrupt.zarr"
    shutil.copytree(caches / "dense.zarr", url)
    for shard in sorted((url / "logits" / "dq" / "c").rglob("*")):
        if shard.is_file():
            data = bytearray(shard.read_bytes())
            data[30:400] = bytes(370)  # zero the start of the shard: every chunk in it is damaged
            shard.write_bytes(bytes(data))
    code, _, err = run(_train(sample_root, tmp_path / "e", "--cache", str(url), "--iters", "4"), capsys)
    assert_one_line_error(code, err, "entry", "skdcache verify")


# ------------------------------------------------------------------------------------------------
# one source per option, and every option checked in one line


def test_train_flags_match_the_train_config():
    from student.cli import app
    from student.train import TrainConfig
    from tests.catalogue.conftest import flag_drift

    assert flag_drift(app, "train", TrainConfig, cli_only={"json_out", "nproc"}) == []


_BAD_TRAIN_VALUES = [
    (["--scales", "0"], ["--scales", "greater than 0"]),
    (["--scales", "abc"], ["--scales", "numbers"]),
    (["--scales", ","], ["--scales", "at least one"]),
    (["--nproc", "0"], ["--nproc", "at least 1"]),
    (["--photometric", "-5"], ["--photometric", "at least 0"]),
    (["--photometric", "nan"], ["--photometric", "finite"]),
    (["--lr", "nan"], ["--lr", "finite"]),
    (["--lr", "inf"], ["--lr", "finite"]),
    (["--lr", "-1"], ["--lr", "greater than 0"]),
    (["--critic-lr", "0"], ["--critic-lr"]),
    (["--momentum", "1.5"], ["--momentum"]),
    (["--weight-decay", "-0.1"], ["--weight-decay"]),
    (["--poly-power", "-1"], ["--poly-power"]),
    (["--lambda-pa", "-1"], ["--lambda-pa"]),
    (["--temperature", "0", "--pixel-mode", "kl"], ["--temperature"]),
    (["--iters", "0"], ["--iters"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--crop", "100000x100000"], ["--crop", "at most 8192"]),
    (["--crop", "axb"], ["--crop", "HxW"]),
    (["--seed", "-1"], ["--seed"]),
    (["--workers", "-1"], ["--workers"]),
    (["--log-every", "0"], ["--log-every"]),
    (["--eval-every", "-5"], ["--eval-every"]),
    (["--pixel-mode", "mse"], ["--pixel-mode", "official, kl"]),
    (["--pair", "dense"], ["--pair", "official, paper, cirkd"]),
    (["--adversarial", "lsgan"], ["--adversarial", "wgan-gp, hinge"]),
    (["--critic-optimizer", "rmsprop"], ["--critic-optimizer", "sgd, adam"]),
    (["--eval-mode", "tiled"], ["--eval-mode", "whole, slide"]),
    (["--device", "tpu"], ["--device"]),
]


@pytest.mark.parametrize("extra, fragments", _BAD_TRAIN_VALUES, ids=[" ".join(e) for e, _ in _BAD_TRAIN_VALUES])
def test_every_train_option_is_checked(sample_root, tmp_path, capsys, extra, fragments):
    out = tmp_path / "run"
    code, _, err = run([*_train(sample_root, out, "--losses", "none"), *extra], capsys)
    assert_refused(code, err, *fragments)
    assert not out.exists()


def test_train_out_under_proc_is_one_line(sample_root, capsys):
    code, _, err = run(_train(sample_root, "/proc/skd-run", "--losses", "none"), capsys)
    assert_one_line_error(code, err, "cannot write to --out", "/proc")
