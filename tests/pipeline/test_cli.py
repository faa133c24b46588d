"""skdcache sample-data / teachers / build from the command line: results, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cache_tools import open_cache
from pipeline.cli import main
from pipeline.teachers import create_model, save_weights
from tests.cli import assert_one_line_error, run_cli


def run(argv, capsys) -> tuple[int, str, str]:
    return run_cli(main, argv, capsys)


def test_teachers_and_sample_data(tmp_path, capsys):
    code, out, _ = run(["teachers", "--json"], capsys)
    names = {t["name"] for t in json.loads(out)}
    assert code == 0 and {"psp101", "psp18", "psp34_mini", "psp_tiny"} <= names
    code, out, _ = run(
        ["sample-data", str(tmp_path / "d"), "-n", "3", "--num-val", "1", "--size", "64x128", "--json"], capsys
    )
    assert code == 0 and json.loads(out)["splits"] == {"train": 3, "val": 1}


def test_build_with_own_weights_and_json(sample_root, tmp_path, capsys):
    weights = tmp_path / "t.safetensors"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        save_weights(create_model("psp_tiny", num_classes=19), weights, {"model_name": "psp_tiny", "num_classes": 19})
    out_url = str(tmp_path / "c.zarr")
    args = ["build", "--teacher", "psp_tiny", "--weights", str(weights), "--data", str(sample_root), "--out", out_url]
    code, out, _ = run([*args, "--json", "--loader-workers", "0"], capsys)
    assert code == 0
    summary = json.loads(out)
    assert summary["entries_written"] == 6 and summary["fidelity"]["argmax_agreement"] == 1.0
    s = open_cache(out_url).schema
    assert s.teacher.weights_sha256 and not s.teacher.random_weights
    code, out, _ = run([*args, "--json", "--loader-workers", "0"], capsys)
    assert code == 0 and json.loads(out)["resumed"] is True


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--teacher", "nope", "--random-weights"], ["unknown model 'nope'", "psp101"]),
        (["--teacher", "psp_tiny"], ["needs --weights PATH"]),
        (["--teacher", "psp_tiny", "--random-weights", "--mode", "dense", "--crop", "12xx"], ["--crop"]),
        (["--teacher", "psp_tiny", "--random-weights", "--logits-codec", "top5"], ["unknown logits codec 'top5'"]),
        (["--teacher", "psp_tiny", "--random-weights", "--features-codec", "jpeg"], ["unknown features codec"]),
    ],
)
def test_build_bad_options(sample_root, tmp_path, capsys, extra, fragments):
    out = tmp_path / "c.zarr"
    code, _, err = run(["build", "--data", str(sample_root), "--out", str(out), *extra], capsys)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()


def test_build_bad_data_and_destinations(sample_root, tmp_path, capsys):
    base = ["build", "--teacher", "psp_tiny", "--random-weights", "--loader-workers", "0"]
    code, _, err = run([*base, "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "a.zarr")], capsys)
    assert_one_line_error(code, err, "does not exist")
    (tmp_path / "empty" / "leftImg8bit" / "train").mkdir(parents=True)
    code, _, err = run([*base, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "a.zarr")], capsys)
    assert_one_line_error(code, err, "no images")
    # a checkpoint of another architecture
    wrong = tmp_path / "w.safetensors"
    save_weights(create_model("psp18_mini", num_classes=19), wrong, {"model_name": "psp18_mini", "num_classes": 19})
    code, _, err = run(
        [
            "build",
            "--teacher",
            "psp_tiny",
            "--weights",
            str(wrong),
            "--data",
            str(sample_root),
            "--out",
            str(tmp_path / "b.zarr"),
        ],
        capsys,
    )
    assert_one_line_error(code, err, "does not fit psp_tiny")
    # an unwritable destination: a file stands where the store's directory would go
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run([*base, "--data", str(sample_root), "--out", str(blocker / "c.zarr")], capsys)
    assert_one_line_error(code, err, "cannot")
    # an existing store of another configuration is refused and left intact
    good = tmp_path / "good.zarr"
    assert run([*base, "--data", str(sample_root), "--out", str(good), "--json"], capsys)[0] == 0
    before = sorted(p.name for p in good.rglob("*"))
    code, _, err = run([*base, "--data", str(sample_root), "--out", str(good), "--logits-codec", "fp16"], capsys)
    assert_one_line_error(code, err, "different configuration", "--overwrite")
    assert sorted(p.name for p in good.rglob("*")) == before
    assert open_cache(str(good)).schema.logits.codec == "gap-u8"
    # a directory of other files is never written into
    other = tmp_path / "other"
    shutil.copytree(sample_root, other)
    code, _, err = run([*base, "--data", str(sample_root), "--out", str(other), "--overwrite"], capsys)
    assert_one_line_error(code, err, "not an skd cache")
    assert (other / "leftImg8bit").exists()
