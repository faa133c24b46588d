"""The team workflow over a real S3 API (moto on 127.0.0.1): build to s3://, inspect, verify, train, evaluate."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main as skdcache
from student.cli import main as skdstudent
from tests.cli import run_cli as run
from tests.s3 import moto_s3


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.timeout(600)
def test_build_info_verify_train_over_s3(sample_root, tmp_path, capsys, monkeypatch):
    with moto_s3(buckets=("team",)) as s3:
        monkeypatch.setenv("SKD_STORAGE_OPTIONS", json.dumps(s3.storage_options))
        url = "s3://team/sample.zarr"
        code, out, err = run(
            skdcache,
            ["build", "--teacher", "psp_tiny", "--random-weights", "--data", str(sample_root), "--out", url,
             "--shard-size", "2", "--json"],
            capsys,
        )  # fmt: skip
        assert code == 0, err
        assert json.loads(out)["entries_written"] == 6
        code, out, err = run(skdcache, ["info", url, "--json"], capsys)
        assert code == 0, err
        info = json.loads(out)
        assert info["status"] == "complete" and info["entries"] == 6 and info["bytes_per_image"] > 0
        code, out, err = run(skdcache, ["verify", url, "--dataset", str(sample_root), "--json"], capsys)
        assert code == 0, err
        assert json.loads(out)["sound"] is True
        # students read the store from S3 through a local read-through cache, in DataLoader workers
        code, out, err = run(
            skdstudent,
            ["train", "--data", str(sample_root), "--out", str(tmp_path / "run"), "--cache", url,
             "--cache-dir", str(tmp_path / "cache"), "--student", "psp_tiny", "--iters", "3", "--batch-size", "2",
             "--crop", "64x64", "--workers", "2", "--json"],
            capsys,
        )  # fmt: skip
        assert code == 0, err
        assert json.loads(out)["steps"] == 3
        assert any((tmp_path / "cache").rglob("*")), "the read-through cache holds the shards"
        # a URL that does not exist, and a bucket without credentials: one line each
        code, _, err = run(skdcache, ["info", "s3://team/nothing.zarr"], capsys)
        assert code == 1 and err.strip().startswith("error:") and "Traceback" not in err
