"""The README's main command, at smoke size: every step runs and the table and chart are written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_smoke(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "demo", "--out", str(out), "--preset", "smoke"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "one teacher pass, four students" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [r["losses"] for r in summary["rows"]] == ["task only", "none", "pixel", "pixel,pair", "pixel,pair,holistic"]
    assert all(0 <= r["miou"] <= 1 for r in summary["rows"])
    assert (out / "summary.png").stat().st_size > 10_000
    # the demo refuses to write into a non-empty directory
    again = subprocess.run(
        [sys.executable, "-m", "pipeline", "demo", "--out", str(out)], capture_output=True, text=True
    )
    assert again.returncode == 1 and "is not empty" in again.stderr and again.stderr.count("\n") <= 2
