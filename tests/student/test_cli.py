"""skdstudent from the command line: train/eval/students, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from pipeline.build import BuildConfig, build_cache
from pipeline.teachers import create_model, save_weights
from student.cli import main
from tests.cli import assert_one_line_error, run_cli


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
    assert_one_line_error(code, err, "cannot be read", "skdcache verify")
