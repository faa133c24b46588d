"""benchmarks/gpu.py at smoke size: every section runs through the real build, store and trainer."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def _numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _numbers(v)]
    return [float(tree)] if isinstance(tree, int | float) and not isinstance(tree, bool) else []


def _positive(tree) -> bool:
    values = _numbers(tree)
    return bool(values) and all(math.isfinite(v) and v > 0 for v in values)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_benchmark_tiny_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--cpu", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NO GPU: a CPU-SIZED run (profile tiny)" in proc.stdout
    res = json.loads(out.read_text())
    assert res["gpu"] is False and res["profile"]["name"] == "tiny" and res["errors"] == {}

    # (a) one row per precision, fp32 first and exact against itself
    rows = res["teacher"]["rows"]
    assert [r["precision"] for r in rows] == ["fp32", "bf16"]
    assert _positive([r["images_per_s"] for r in rows])
    assert rows[0]["kl_mean"] == 0 and rows[0]["argmax_agreement"] == 1 and rows[0]["max_abs_logit_diff"] == 0
    for r in rows[1:]:
        assert r["finite"] and math.isfinite(r["kl_mean"]) and 0 <= r["argmax_agreement"] <= 1

    # (b) the write path per thread count, per core, and whole replay builds
    write = res["write"]
    assert set(write["encode_entries_per_s"]) == {"1", "2"} == set(write["entries_per_cpu_s"])
    assert _positive([write["encode_entries_per_s"], write["entries_per_cpu_s"], write["per_core_entries_per_s"]])
    assert _positive(write["decode_per_core_images_per_s"])
    assert _positive([b["entries_per_s"] for b in write["replay_builds"]])
    assert write["entry"]["logits"][0] == 19 and write["entry"]["cells"][0] == 512

    # the FLOPs estimate: psp101 at 1024x2048 is some TFLOP, every row needs at least one core
    est = res["estimate"]
    assert 1e12 < est["psp101_flops_1024x2048"] < 1e14
    assert _positive([[r["images_per_s"], r["encode_cores"], r["decode_cores"]] for r in est["rows"]])

    # (c) three step times, (d) the loader against what the student consumes
    train = res["train"]
    assert set(train["step_s"]) == {"student only", "cached KD (dense)", "online KD"}
    assert _positive([train["step_s"], train["loader_samples_per_s"], train["student_consumes_per_s"]])
    assert _positive(train["dense_build"])
