"""Catalogue: bad options and usage of every command, through the installed console scripts.

Usage errors (unknown flag, missing argument, a value of the wrong type) must print click's short
usage block and exit 2 with whichever typer/click the install resolved (typer >= 0.20 vendors click
as ``typer._click``; a test runner calling the app in-process would not notice). A bad value
(out of range, NaN/inf, unknown choice, impossible destination) is one ``error:`` line, exit 1.
Every case checks that a cache and a dataset next to it are byte-identical afterwards.

Cases that import torch in the subprocess (build, train) cost a few seconds each and run under
``slow``; the same checks run in-process, fast, in tests/pipeline/test_cli.py and tests/student/test_cli.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.catalogue.conftest import assert_one_line, assert_usage_error, console_script, run_console, snapshot


@pytest.fixture(scope="module")
def world(sample_root, tmp_path_factory) -> dict[str, Path]:
    """A small cache of the sample dataset, and a working directory with a file the user wrote."""
    from pipeline.build import BuildConfig, build_cache

    root = tmp_path_factory.mktemp("bad-usage")
    cache = root / "c.zarr"
    build_cache(
        BuildConfig(teacher="psp_tiny", random_weights=True, data=str(sample_root), out=str(cache), loader_workers=0)
    )
    (root / "notes.txt").write_text("the user's own file\n")
    return {"root": root, "cache": cache, "data": sample_root}


def _fill(args: tuple[str, ...], world: dict[str, Path]) -> list[str]:
    """The case's arguments with ``{cache}``, ``{data}`` and ``{root}`` filled in."""
    out = []
    for a in args:
        for key in ("cache", "data", "root"):
            a = a.replace("{" + key + "}", str(world[key]))
        out.append(a)
    return out


def _run_unchanged(world, script: str, args: tuple[str, ...]) -> tuple[int, str, str]:
    """Run one case; the cache, the dataset and the user's files must be byte-identical afterwards."""
    before = (snapshot(world["root"]), snapshot(world["data"]))
    code, out, err = run_console(script, *_fill(args, world), cwd=world["root"], timeout=300)
    assert (snapshot(world["root"]), snapshot(world["data"])) == before, err
    return code, out, err


USAGE = [
    ("skdcache", ("build", "--bogus-flag"), "No such option: --bogus-flag"),
    ("skdcache", ("info",), "Missing argument"),
    ("skdcache", ("build", "--teacher", "psp_tiny", "--out", "{root}/x.zarr"), "Missing option '--data'"),
    (
        "skdcache",
        ("build", "--teacher", "psp_tiny", "--data", "{data}", "--out", "{root}/x.zarr", "--views", "four"),
        "--views",
    ),
    (
        "skdcache",
        ("build", "--teacher", "psp_tiny", "--data", "{data}", "--out", "{root}/x.zarr", "--overlap", "lots"),
        "--overlap",
    ),
    ("skdcache", ("verify", "{cache}", "--workers", "abc"), "--workers"),
    ("skdcache", ("verify",), "Missing argument"),
    ("skdcache", ("info", "{cache}", "--bogus"), "No such option: --bogus"),
    ("skdcache", ("copy", "{cache}"), "Missing argument"),
    ("skdcache", ("subset", "{cache}", "{root}/s.zarr", "--fraction", "half"), "--fraction"),
    ("skdcache", ("merge", "{root}/m.zarr"), "Missing argument"),
    ("skdcache", ("diff", "{cache}"), "Missing argument"),
    ("skdcache", ("preview", "{cache}"), "Missing option '--out'"),
    ("skdcache", ("preview", "{cache}", "--out", "{root}/p.png", "--index", "first"), "--index"),
    ("skdcache", ("sample-data",), "Missing argument"),
    ("skdcache", ("sample-data", "{root}/d", "-n", "many"), "--num-images"),
    ("skdcache", ("nosuchcommand",), "No such command 'nosuchcommand'"),
    ("skdcache", ("--bogus-top-level", "info", "{cache}"), "No such option: --bogus-top-level"),
    ("skdstudent", ("train", "--bogus-flag"), "No such option: --bogus-flag"),
    ("skdstudent", ("train", "--out", "{root}/run"), "Missing option '--data'"),
    ("skdstudent", ("train", "--data", "{data}", "--out", "{root}/run", "--iters", "1.5"), "--iters"),
    ("skdstudent", ("train", "--data", "{data}", "--out", "{root}/run", "--lr", "fast"), "--lr"),
    ("skdstudent", ("eval", "--data", "{data}"), "Missing option '--checkpoint'"),
    ("skdstudent", ("eval", "--checkpoint", "{root}/m.pt", "--data", "{data}", "--bogus"), "No such option: --bogus"),
    ("skdstudent", ("students", "--bogus"), "No such option: --bogus"),
    ("skdstudent", ("nosuchcommand",), "No such command 'nosuchcommand'"),
]


@pytest.mark.parametrize(("script", "args", "fragment"), USAGE, ids=[" ".join((s, *a))[:60] for s, a, _ in USAGE])
def test_usage_errors_print_the_short_usage_block(world, script, args, fragment):
    code, _, err = _run_unchanged(world, script, args)
    assert_usage_error(code, err, fragment)
    assert f"Usage: {script} " in err


# one line, exit 1; these need no torch in the subprocess (cache commands, sample-data, demo)
VALUES = [
    ("skdcache", ("verify", "{cache}", "--workers", "0"), ("--workers", "at least 1")),
    ("skdcache", ("verify", "{cache}", "--show", "-1"), ("--show", "at least 0")),
    ("skdcache", ("preview", "{cache}", "--out", "{root}/p.png", "--dpi", "0"), ("--dpi", "at least 10")),
    ("skdcache", ("preview", "{cache}", "--out", "{root}/p.png", "--sheet", "0"), ("--sheet",)),
    ("skdcache", ("preview", "{cache}", "--out", "{root}/p.png", "--index", "-3"), ("--index", "at least 0")),
    ("skdcache", ("preview", "{cache}", "--out", "/proc/p.png"), ("--out", "/proc", "kernel file system")),
    ("skdcache", ("copy", "{cache}", "{root}/d.zarr", "--workers", "0"), ("--workers",)),
    ("skdcache", ("copy", "{cache}", "/proc/d.zarr"), ("DST", "/proc", "choose a directory")),
    ("skdcache", ("copy", "{cache}", "{root}/notes.txt/d.zarr"), ("notes.txt", "is a file")),
    ("skdcache", ("subset", "{cache}", "{root}/s.zarr", "--fraction", "0"), ("--fraction", "(0, 1]")),
    ("skdcache", ("subset", "{cache}", "{root}/s.zarr", "--fraction", "1.5"), ("--fraction",)),
    ("skdcache", ("subset", "{cache}", "{root}/s.zarr", "--fraction", "nan"), ("--fraction",)),
    ("skdcache", ("subset", "{cache}", "{root}/s.zarr", "--fraction", "0.5", "--seed", "-1"), ("--seed",)),
    ("skdcache", ("subset", "{cache}", "{root}/s.zarr", "--split", "train", "--shard-size", "0"), ("--shard-size",)),
    ("skdcache", ("subset", "{cache}", "{root}/s.zarr"), ("exactly one of --split, --ids and --fraction",)),
    ("skdcache", ("merge", "{root}/m.zarr", "{cache}", "--workers", "0"), ("--workers",)),
    ("skdcache", ("merge", "{root}/m.zarr", "{cache}", "--shard-size", "-2"), ("--shard-size",)),
    ("skdcache", ("diff", "{cache}", "{cache}", "--max-entries", "0"), ("--max-entries",)),
    ("skdcache", ("diff", "{cache}", "{cache}", "--workers", "0"), ("--workers",)),
    ("skdcache", ("sample-data", "{root}/d", "--size", "100000x100000"), ("--size", "at most 8192")),
    ("skdcache", ("sample-data", "{root}/d", "-n", "0"), ("--num-images", "at least 1")),
    ("skdcache", ("sample-data", "{root}/d", "--size", "64xx"), ("--size", "HxW")),
    ("skdcache", ("sample-data", "/proc/d"), ("/proc",)),
    ("skdcache", ("demo", "--preset", "huge", "--out", "{root}/demo"), ("--preset", "full or smoke")),
    # no teacher at all: neither --weights (whose model is recognised) nor a --teacher name
    ("skdcache", ("build", "--data", "{data}", "--out", "{root}/x.zarr"), ("--weights FILE", "--teacher NAME")),
]


@pytest.mark.parametrize(("script", "args", "fragments"), VALUES, ids=[" ".join(a)[:60] for _, a, _ in VALUES])
def test_bad_values_of_cache_commands_are_one_line(world, script, args, fragments):
    code, _, err = _run_unchanged(world, script, args)
    assert_one_line(code, err, *fragments)


_BUILD = ("build", "--teacher", "psp_tiny", "--random-weights", "--data", "{data}", "--out", "{root}/b.zarr")
_TRAIN = (
    "train",
    "--data",
    "{data}",
    "--out",
    "{root}/run",
    "--losses",
    "none",
    "--iters",
    "1",
    "--student",
    "psp_tiny",
)

# one line, exit 1; these import torch in the subprocess (a few seconds each), hence slow
TORCH_VALUES = [
    ("skdcache", (*_BUILD, "--shard-size", "0"), ("--shard-size", "at least 1")),
    ("skdcache", (*_BUILD, "--fidelity-samples", "-1"), ("--fidelity-samples",)),
    ("skdcache", (*_BUILD, "--weights-format", "bogus"), ("--weights-format", "auto, skd, official")),
    ("skdcache", (*_BUILD, "--mode", "views", "--scales", "0"), ("--scales", "greater than 0")),
    ("skdcache", (*_BUILD, "--mode", "views", "--scales", "abc"), ("--scales", "numbers")),
    ("skdcache", (*_BUILD, "--threads", "-1"), ("--threads",)),
    ("skdcache", (*_BUILD, "--mode", "views", "--view-seed", "-1"), ("--view-seed",)),
    ("skdcache", (*_BUILD, "--mode", "views", "--crop", "100000x100000"), ("--crop", "at most")),
    ("skdcache", (*_BUILD, "--overlap", "nan"), ("--overlap", "finite")),
    ("skdcache", (*_BUILD, "--logits-clip", "inf"), ("--logits-clip", "finite")),
    ("skdcache", (*_BUILD, "--mode", "bogus"), ("--mode", "dense, views")),
    ("skdcache", (*_BUILD, "--workers", "0"), ("--workers", "at least 1")),
    ("skdcache", (*_BUILD[:-1], "/proc/b.zarr"), ("--out", "/proc")),
    ("skdstudent", (*_TRAIN, "--scales", "0"), ("--scales",)),
    ("skdstudent", (*_TRAIN, "--scales", "abc"), ("--scales", "numbers")),
    ("skdstudent", (*_TRAIN, "--nproc", "0"), ("--nproc", "at least 1")),
    ("skdstudent", (*_TRAIN, "--photometric", "-5"), ("--photometric",)),
    ("skdstudent", (*_TRAIN, "--lr", "nan"), ("--lr", "finite")),
    ("skdstudent", (*_TRAIN, "--lr", "inf"), ("--lr", "finite")),
    ("skdstudent", (*_TRAIN, "--lr", "-1"), ("--lr", "greater than 0")),
    ("skdstudent", (*_TRAIN, "--momentum", "1.5"), ("--momentum",)),
    ("skdstudent", (*_TRAIN, "--eval-mode", "tiled"), ("--eval-mode", "whole, slide")),
    ("skdstudent", (*_TRAIN, "--crop", "100000x100000"), ("--crop", "at most")),
    ("skdstudent", (*_TRAIN[:4], "/proc/run", *_TRAIN[5:]), ("--out", "/proc")),
    ("skdstudent", ("eval", "--checkpoint", "{root}/m.pt", "--data", "{data}", "--mode", "tiled"), ("--mode",)),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "args", "fragments"), TORCH_VALUES, ids=[" ".join(a)[-40:] for _, a, _ in TORCH_VALUES]
)
def test_bad_values_of_build_and_train_are_one_line(world, script, args, fragments):
    code, _, err = _run_unchanged(world, script, args)
    if code == 2:  # a bad choice is a usage error: click's short usage block
        assert_usage_error(code, err, *fragments)
    else:
        assert_one_line(code, err, *fragments)
    assert not (world["root"] / "b.zarr").exists() and not (world["root"] / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["skdcache", "skdstudent"])
def test_device_cuda_without_a_gpu_is_one_line(world, script):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = (*_BUILD, "--device", "cuda") if script == "skdcache" else (*_TRAIN, "--device", "cuda")
    code, _, err = _run_unchanged(world, script, args)
    assert_one_line(code, err, "--device cuda", "no CUDA GPU", "--device cpu")


@pytest.mark.slow
def test_an_unreachable_scheduler_is_one_line_within_seconds(world):
    from pipeline.distributed import CONNECT_TIMEOUT

    code, _, err = _run_unchanged(world, "skdcache", (*_BUILD, "--scheduler", "tcp://127.0.0.1:9"))
    assert_one_line(code, err, "cannot reach the dask scheduler", f"within {CONNECT_TIMEOUT:.0f} s")


def test_verbose_shows_the_traceback_and_plain_runs_do_not(world):
    args = ("verify", "{cache}", "--workers", "0")
    code, _, err = _run_unchanged(world, "skdcache", ("--verbose", *args))
    assert code == 1 and "Traceback" in err and "ConfigError" in err
    assert err.strip().splitlines()[-1].startswith("error: --workers")
    code, _, err = _run_unchanged(world, "skdcache", args)
    assert_one_line(code, err, "--workers")


_WORKER_MASK = """
import os, signal, torch
from pathlib import Path
from cache_tools.workers import start_workers

class SignalMask(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        status = Path(f"/proc/{os.getpid()}/status").read_text()
        return next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigBlk"))

if __name__ == "__main__":
    loader = torch.utils.data.DataLoader(SignalMask(), num_workers=1, multiprocessing_context="forkserver")
    batches = start_workers(loader)
    parent = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set())
    (mask,) = next(batches).tolist()
    print(parent, bool(mask & (1 << (signal.SIGINT - 1))))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the signal mask from /proc")
def test_loader_workers_are_born_deaf_to_ctrl_c(tmp_path):
    """A Ctrl-C reaching a worker still importing ``site`` printed "Fatal Python error" and a traceback.

    The forkserver and the workers start with SIGINT blocked; the parent keeps receiving it. (A fresh
    process: a forkserver started earlier without the shield would hand its own mask to the workers.)
    """
    script = tmp_path / "mask.py"
    script.write_text(_WORKER_MASK)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"], done.stdout


@pytest.mark.slow
def test_sigint_during_a_build_says_how_to_resume(world, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) mid-build: one line, exit 130."""
    out = tmp_path / "i.zarr"
    args = [console_script("skdcache"), *_fill(_BUILD[:-1], world), str(out), "--loader-workers", "1"]
    # a teacher that sleeps in forward, so the build is still running when the signal comes
    args[args.index("psp_tiny")] = "tests.catalogue.conftest:slow_teacher"
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "TERM": "dumb", "PYTHONPATH": str(repo)}
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while not (out / "zarr.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # wait until the store exists: the build is under way
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("build ")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("interrupted") and "re-run the same command to resume" in lines[0], err
    # and the same command then completes the cache
    code, out_json, err = run_console("skdcache", *args[1:], "--json", timeout=600, env={"PYTHONPATH": str(repo)})
    assert code == 0 and json.loads(out_json)["entries"] == 6, err


@pytest.mark.slow
def test_a_two_worker_dask_build_logs_no_info_lines(world, tmp_path):
    pytest.importorskip("distributed")
    out = tmp_path / "d.zarr"
    args = (*_BUILD[:-1], str(out), "--workers", "2")
    code, _, err = run_console("skdcache", *_fill(args, world), cwd=tmp_path, timeout=600)
    assert code == 0, err
    assert "INFO" not in err and "dashboard" not in err.lower(), err
