"""Distributed builds on dask: same bytes as one process, and a worker killed with SIGKILL loses nothing."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import numpy as np
import pytest
import zarr

from cache_tools import open_cache
from cache_tools.datasets import write_sample_dataset
from cache_tools.verify import verify_cache
from pipeline.build import BuildConfig, build_cache
from pipeline.distributed import build_cache_distributed

distributed = pytest.importorskip("distributed")

ARRAYS = ("logits/dq", "logits/top", "features/data", "entries/checksum", "images/sha256", "entries/fidelity")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-data")
    write_sample_dataset(root, num_train=10, num_val=0, size=(96, 192), seed=2)
    return root


def _cfg(data, out, **kw) -> BuildConfig:
    return BuildConfig(
        teacher="psp34_mini",
        random_weights=True,
        data=str(data),
        out=str(out),
        shard_images=1,
        threads=1,
        loader_workers=0,
        **kw,
    )


def _same_arrays(a_url, b_url):
    a, b = zarr.open_group(str(a_url), mode="r"), zarr.open_group(str(b_url), mode="r")
    for p in ARRAYS:
        np.testing.assert_array_equal(a[p][...], b[p][...], err_msg=p)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_workers_write_the_same_bytes_as_one(data, tmp_path):
    build_cache(_cfg(data, tmp_path / "single.zarr"))
    two = build_cache_distributed(_cfg(data, tmp_path / "two.zarr"), workers=2)
    assert two.entries_written == 10 and two.schema.build["workers"] == 2
    one = build_cache_distributed(_cfg(data, tmp_path / "one.zarr"), workers=1)
    assert one.entries_written == 10
    _same_arrays(tmp_path / "single.zarr", tmp_path / "two.zarr")
    _same_arrays(tmp_path / "one.zarr", tmp_path / "two.zarr")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_worker_loses_nothing(data, tmp_path):
    build_cache(_cfg(data, tmp_path / "reference.zarr"))
    out = tmp_path / "faulty.zarr"
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
    )
    client = distributed.Client(cluster)
    result: dict = {}

    def run():
        try:
            result["build"] = build_cache_distributed(_cfg(data, out), client=client)
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    thread = threading.Thread(target=run)
    try:
        thread.start()
        killed = None
        deadline = time.time() + 300
        while time.time() < deadline and thread.is_alive():
            time.sleep(0.05)
            try:
                done = int(zarr.open_group(str(out), mode="r")["entries/done"][...].sum())
            except Exception:  # noqa: BLE001 - the store is being created
                continue
            if 1 <= done < 9:
                pids = client.run(os.getpid)
                killed = next(iter(pids.values()))
                os.kill(killed, signal.SIGKILL)
                break
        thread.join(timeout=400)
    finally:
        client.close()
        cluster.close()
    assert killed is not None, "the build finished before a worker could be killed"
    assert "error" not in result, result.get("error")
    r = open_cache(str(out))
    assert r.schema.status == "complete" and r.done.all()
    report = verify_cache(str(out), dataset_root=str(data))
    assert report.sound and report.entries_ok == r.num_entries, report
    _same_arrays(tmp_path / "reference.zarr", out)
