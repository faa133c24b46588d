"""A real `skdcache build` subprocess killed with SIGKILL resumes to the same bytes as an uninterrupted build."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from cache_tools import open_cache
from cache_tools.datasets import write_sample_dataset


def _cmd(data: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline",
        "build",
        "--teacher",
        "psp34_mini",
        "--random-weights",
        "--data",
        str(data),
        "--out",
        str(out),
        "--shard-size",
        "1",
        "--loader-workers",
        "0",
        "--writer-threads",
        "1",
        "--threads",
        "1",
        "--json",
    ]


def _data_files(root: Path) -> dict[str, str]:
    """sha256 of every chunk/shard object (metadata documents carry timestamps and are skipped)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "zarr.json":
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_mid_build_then_resume_gives_identical_bytes(tmp_path):
    data = tmp_path / "data"
    write_sample_dataset(data, num_train=16, num_val=0, size=(128, 256), seed=5)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    reference = tmp_path / "reference.zarr"
    subprocess.run(_cmd(data, reference), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed.zarr"
    proc = subprocess.Popen(_cmd(data, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = 0
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
            try:
                done = int(zarr.open_group(str(killed), mode="r")["entries/done"][...].sum())
            except Exception:  # noqa: BLE001 - the store is being created
                continue
            if 2 <= done < 14:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the build finished before it could be killed ({done} done)"

    partial = open_cache(str(killed), allow_incomplete=True)
    assert partial.schema.status == "building" and 2 <= partial.done.sum() < 16

    resumed = subprocess.run(_cmd(data, killed), check=True, env=env, capture_output=True, text=True)
    assert '"resumed": true' in resumed.stdout

    a, b = zarr.open_group(str(reference), mode="r"), zarr.open_group(str(killed), mode="r")
    for path in ("logits/dq", "logits/top", "features/data", "entries/checksum", "images/sha256", "entries/done"):
        np.testing.assert_array_equal(a[path][...], b[path][...], err_msg=path)
    assert _data_files(reference) == _data_files(killed)
    r = open_cache(str(killed))
    for e in range(r.num_entries):
        r.read_entry(e, check=True)
