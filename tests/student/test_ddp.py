"""Two CPU processes (gloo) train one student with DDP; replicas stay in sync."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.build import BuildConfig, build_cache
from student.checkpoint import load_checkpoint


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_process_training_from_a_cache(sample_root, tmp_path):
    cache = str(tmp_path / "c.zarr")
    build_cache(
        BuildConfig(teacher="psp_tiny", random_weights=True, data=str(sample_root), out=cache, loader_workers=0)
    )
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "student",
        "train",
        "--data",
        str(sample_root),
        "--out",
        str(out),
        "--cache",
        cache,
        "--student",
        "psp_tiny",
        "--iters",
        "4",
        "--batch-size",
        "2",
        "--crop",
        "64x64",
        "--workers",
        "0",
        "--eval-split",
        "none",
        "--ckpt-every",
        "2",
        "--nproc",
        "2",
        "--json",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert summary["steps"] == 4 and all(k in summary["last"] for k in ("pixel", "pair", "adv", "critic"))
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == 4 and state["critic"] is not None
    # every line of metrics.jsonl comes from rank 0 only
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if "task" in json.loads(x)] == [1, 2, 3, 4][-len(lines) :]
    # resume under DDP, to a longer schedule
    more = [*cmd[: cmd.index("--iters") + 1], "6", *cmd[cmd.index("--iters") + 2 :], "--resume"]
    proc = subprocess.run(more, capture_output=True, text=True, env=env, timeout=500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 6
    # a user error in a multi-process run is still one line
    bad = [*cmd[: cmd.index("--out") + 1], str(tmp_path / "empty"), *cmd[cmd.index("--out") + 2 :], "--resume"]
    proc = subprocess.run(bad, capture_output=True, text=True, env=env, timeout=500)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: --resume: no checkpoint")
    assert len(proc.stderr.strip().splitlines()) == 1
