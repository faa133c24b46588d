"""skdcache sample-data / teachers / build from the command line: results, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cache_tools import open_cache
from pipeline.cli import main
from pipeline.registry import create_model
from pipeline.weights import save_weights
from tests.cli import assert_one_line_error, assert_refused, run_cli


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
    # untrained weights are near chance: the teacher check would stop them (tested in test_byo_teacher)
    args.append("--no-teacher-check")
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
        (
            ["--teacher", "psp_tiny", "--random-weights", "--logits-codec", "top5"],
            ["--logits-codec", "'top5'", "gap-u8"],
        ),
        (["--teacher", "psp_tiny", "--random-weights", "--features-codec", "jpeg"], ["unknown features codec"]),
    ],
)
def test_build_bad_options(sample_root, tmp_path, capsys, extra, fragments):
    out = tmp_path / "c.zarr"
    code, _, err = run(["build", "--data", str(sample_root), "--out", str(out), *extra], capsys)
    assert_refused(code, err, *fragments)
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
    assert_one_line_error(code, err, "--teacher psp_tiny does not fit")
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


# ------------------------------------------------------------------------------------------------
# one source per option: flags, config fields and docs agree


def test_build_flags_match_the_build_config():
    import dataclasses

    from pipeline.build import BuildConfig
    from pipeline.cli import app
    from tests.catalogue.conftest import flag_drift

    assert flag_drift(app, "build", BuildConfig, cli_only={"json_out", "workers", "scheduler"}) == []
    # and the check does catch drift: a field without a flag, a flag without a field
    extra = dataclasses.make_dataclass(
        "Extra", [("no_such_knob", int, dataclasses.field(default=3))], bases=(BuildConfig,), frozen=True, kw_only=True
    )
    assert flag_drift(app, "build", extra, cli_only={"json_out", "workers", "scheduler"}) == [
        "field 'no_such_knob' has no flag --no-such-knob"
    ]
    assert any("--workers" in p for p in flag_drift(app, "build", BuildConfig, cli_only={"json_out", "scheduler"}))


def test_an_option_table_declares_a_command_as_a_written_signature_would():
    import typer
    from typer.testing import CliRunner

    from cache_tools.clikit import Opt, with_options

    app, seen = typer.Typer(add_completion=False), {}
    table = {
        "count": Opt(int, ..., "How many."),
        "fast": Opt(bool, False, "Go fast."),
        "tag": Opt(list[str] | None, None, "A tag (repeatable).", ("--tag", "-t")),
        "json_out": Opt(bool, False, "Print JSON.", ("--json",)),
    }

    @app.command()
    @with_options(table)
    def cmd(**flags) -> None:
        """Do it."""
        seen.update(flags)

    runner = CliRunner()
    result = runner.invoke(app, ["--count", "3", "--fast", "-t", "a", "--tag", "b", "--json"])
    assert result.exit_code == 0, result.output
    assert seen == {"count": 3, "fast": True, "tag": ["a", "b"], "json_out": True}
    # the table's order is --help's order; a bool is one on-flag (no --no-fast twin); --count is required
    params = typer.main.get_command(app).params
    assert [p.opts for p in params] == [["--count"], ["--fast"], ["--tag", "-t"], ["--json"]]
    assert params[1].secondary_opts == [] and params[0].required
    assert runner.invoke(app, ["--count", "1", "--no-fast"]).exit_code == 2
    assert runner.invoke(app, []).exit_code == 2


def test_logits_clip_help_states_the_codec_defaults():
    import typer.main

    from cache_tools.codecs import LogitCodec
    from pipeline.cli import app

    cmd = typer.main.get_command(app).commands["build"]
    text = next(p.help for p in cmd.params if p.name == "logits_clip")
    for codec in ("gap-u8", "gap-u16"):
        assert f"{LogitCodec(codec).clip:g} for {codec}" in text


# flags of other programs that the docs show (torchrun, dask, slurm) and of the benchmark scripts
_OTHER_PROGRAMS = {"--nnodes", "--node-rank", "--nproc-per-node", "--rdzv-endpoint", "--standalone", "--port"}
_OTHER_PROGRAMS |= {"--nthreads", "--nworkers", "--gres"}
_OTHER_PROGRAMS |= {"--lambda-cwd-logit", "--lambda-ifv"}  # CIRKD's own flags, cited as the source of defaults


def test_docs_mention_only_flags_that_exist():
    import re
    from pathlib import Path

    import typer.main

    from pipeline.cli import app as cache_app
    from student.cli import app as student_app

    flags = set(_OTHER_PROGRAMS)
    for app in (cache_app, student_app):
        group = typer.main.get_command(app)
        for cmd in (group, *group.commands.values()):
            flags |= {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
    repo = Path(__file__).resolve().parents[2]
    for script in (repo / "benchmarks").glob("*.py"):
        flags |= set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", script.read_text()))
    unknown = {}
    for doc in [*sorted((repo / "docs").glob("*.md")), repo / "README.md"]:
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", doc.read_text()):
            if flag not in flags:
                unknown.setdefault(flag, doc.name)
    assert unknown == {}, f"docs mention flags no command has: {unknown}"


# ------------------------------------------------------------------------------------------------
# every numeric and choice option refused in one line (the subprocess catalogue repeats these
# through the installed script under -m slow)

_BAD_BUILD_VALUES = [
    (["--shard-size", "0"], ["--shard-size", "at least 1"]),
    (["--fidelity-samples", "-1"], ["--fidelity-samples"]),
    (["--weights-format", "bogus"], ["--weights-format", "auto, skd, official"]),
    (["--mode", "views", "--scales", "0"], ["--scales", "greater than 0"]),
    (["--mode", "views", "--scales", "abc"], ["--scales", "numbers"]),
    (["--threads", "-1"], ["--threads"]),
    (["--mode", "views", "--view-seed", "-1"], ["--view-seed"]),
    (["--seed", "-1"], ["--seed"]),
    (["--mode", "views", "--crop", "100000x100000"], ["--crop", "at most 8192"]),
    (["--mode", "views", "--views", "0"], ["--views"]),
    (["--overlap", "nan"], ["--overlap", "finite"]),
    (["--overlap", "1"], ["--overlap"]),
    (["--logits-clip", "inf"], ["--logits-clip", "finite"]),
    (["--logits-clip", "0"], ["--logits-clip"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--loader-workers", "-1"], ["--loader-workers"]),
    (["--writer-threads", "0"], ["--writer-threads"]),
    (["--queue-size", "0"], ["--queue-size"]),
    (["--pca-samples", "0"], ["--pca-samples"]),
    (["--features-pool", "median"], ["--features-pool", "max, avg"]),
    (["--inference", "tiled"], ["--inference", "whole, slide"]),
    (["--inference", "slide", "--tile", "0x0"], ["--tile"]),
    (["--features-block", "5000x5000"], ["--features-block"]),
    (["--compressor", "gzip"], ["unknown compressor 'gzip'"]),
    (["--device", "tpu"], ["--device", "cpu"]),
    (["--workers", "0"], ["--workers", "at least 1"]),
    (["--scheduler", "nohost"], ["--scheduler", "tcp://"]),
    (["--out", "/proc/skd.zarr"], ["cannot write to --out", "/proc"]),
]


@pytest.mark.parametrize("extra, fragments", _BAD_BUILD_VALUES, ids=[" ".join(e) for e, _ in _BAD_BUILD_VALUES])
def test_every_build_option_is_checked(sample_root, tmp_path, capsys, extra, fragments):
    out = tmp_path / "c.zarr"
    args = ["build", "--teacher", "psp_tiny", "--random-weights", "--data", str(sample_root), "--out", str(out)]
    code, _, err = run([*args, "--loader-workers", "0", *extra], capsys)
    assert_refused(code, err, *fragments)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_suggests_cpu(sample_root, tmp_path, capsys):
    out = tmp_path / "c.zarr"
    args = ["build", "--teacher", "psp_tiny", "--random-weights", "--data", str(sample_root), "--out", str(out)]
    code, _, err = run([*args, "--device", "cuda"], capsys)
    assert_one_line_error(code, err, "--device cuda", "no CUDA GPU", "--device cpu")
    assert not out.exists()


def test_build_config_refuses_bad_values_for_library_callers_too(sample_root, tmp_path):
    from cache_tools.errors import ConfigError
    from pipeline.build import BuildConfig

    for bad in ({"shard_images": 0}, {"overlap": float("inf")}, {"crop": (100000, 100000)}, {"mode": "x"}):
        with pytest.raises(ConfigError, match=r"^--"):
            BuildConfig(teacher="psp_tiny", data=str(sample_root), out=str(tmp_path / "c.zarr"), **bad)


def test_sample_data_and_demo_options_are_checked(tmp_path, capsys):
    for extra, fragment in [
        (["-n", "0"], "--num-images"),
        (["--num-val", "-1"], "--num-val"),
        (["--size", "100000x100000"], "--size"),
        (["--seed", "-1"], "--seed"),
    ]:
        code, _, err = run(["sample-data", str(tmp_path / "d"), *extra], capsys)
        assert_one_line_error(code, err, fragment)
    code, _, err = run(["demo", "--preset", "huge", "--out", str(tmp_path / "demo")], capsys)
    assert_one_line_error(code, err, "--preset", "full or smoke")
    assert not any(tmp_path.iterdir())
