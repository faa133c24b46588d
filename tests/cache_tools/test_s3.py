"""Sharing: caches on a real S3 API (moto's server on 127.0.0.1), over plain HTTP, and read-only.

The S3 tests run against ``tests/s3.py``'s moto server: the same botocore/s3fs/zarr code paths as
on AWS, including retries of transient errors injected by its middleware.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cache_tools import open_cache
from cache_tools.errors import CacheError, CacheNotFoundError, CacheWriteError, CorruptEntryError
from cache_tools.inspect import describe_cache
from cache_tools.testing import make_synthetic_cache, synthetic_schema
from cache_tools.transfer import copy_cache, merge_caches, subset_cache
from cache_tools.verify import verify_cache
from pipeline.cli import main

IDS = [f"train/a/a_{i:03d}" for i in range(3)] + [f"val/b/b_{i:03d}" for i in range(3)]


def _schema(ids=IDS, **kw):
    return synthetic_schema(mode="views", per_image=2, ids=ids, splits=("train", "val"), shard_images=2, **kw)


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("local") / "c.zarr")
    make_synthetic_cache(url, _schema(), ids=IDS, seed=3)
    return url


def _assert_same_entries(a: str, b: str, a_opts=None, b_opts=None, cache_dir=None) -> None:
    ra = open_cache(a, storage_options=a_opts)
    rb = open_cache(b, storage_options=b_opts, cache_dir=cache_dir)
    assert ra.schema.content_key() == rb.schema.content_key() and ra.image_ids == rb.image_ids
    for e in range(ra.num_entries):
        x, y = ra.read_entry(e, check=True), rb.read_entry(e, check=True)
        np.testing.assert_array_equal(x.logits, y.logits)
        np.testing.assert_array_equal(x.feature, y.feature)


def _cli_options(s3) -> list[str]:
    return ["-S", f"endpoint_url={s3.endpoint}", "-S", "key=testing", "-S", "secret=testing"]


# ------------------------------------------------------------------------------------------------
# S3


@pytest.mark.s3
def test_write_and_read_over_s3(s3, local_cache):
    """The build's writer and the training read path (open_cache + read_entry) over s3://."""
    url = f"{s3.bucket}/c.zarr"
    make_synthetic_cache(url, _schema(), ids=IDS, seed=3, storage_options=s3.storage_options)
    _assert_same_entries(local_cache, url, b_opts=s3.storage_options)
    d = describe_cache(url, storage_options=s3.storage_options)
    assert d["bytes_total"] == describe_cache(local_cache)["bytes_total"]
    report = verify_cache(url, storage_options=s3.storage_options)
    assert report.sound and report.entries_ok == 12


@pytest.mark.s3
def test_copy_local_s3_local_and_cli(s3, local_cache, tmp_path, capsys, monkeypatch):
    remote = f"{s3.bucket}/copy.zarr"
    rep = copy_cache(local_cache, remote, storage_options=s3.storage_options)
    assert rep.copied == rep.objects
    back = str(tmp_path / "back.zarr")
    copy_cache(remote, back, storage_options=s3.storage_options)
    for p in Path(local_cache).rglob("*"):
        if p.is_file():
            assert (Path(back) / p.relative_to(local_cache)).read_bytes() == p.read_bytes()
    # resumable: objects lost at the destination are copied again, nothing else
    fs = s3.client()
    bucket = s3.bucket.removeprefix("s3://")
    for key in ("copy.zarr/logits/dq/c/1/0/0/0", "copy.zarr/zarr.json"):
        fs.delete_object(Bucket=bucket, Key=key)
    again = copy_cache(local_cache, remote, storage_options=s3.storage_options)
    assert again.copied == 2 and again.skipped == rep.objects - 2
    # the CLI: info and verify over s3:// with -S options, and with SKD_STORAGE_OPTIONS
    main(["info", remote, *_cli_options(s3)])
    assert "skd-cache format v1" in capsys.readouterr().out
    monkeypatch.setenv(
        "SKD_STORAGE_OPTIONS", json.dumps({"endpoint_url": s3.endpoint, "key": "testing", "secret": "testing"})
    )
    main(["verify", remote, "--json"])
    assert json.loads(capsys.readouterr().out)["sound"] is True


@pytest.mark.s3
def test_read_through_cache_dir(s3, local_cache, tmp_path):
    """--cache-dir: the first reader downloads each shard once; later readers (range reads of
    shards included) make no data requests at all."""
    url = f"{s3.bucket}/c.zarr"
    copy_cache(local_cache, url, storage_options=s3.storage_options)
    cache_dir = tmp_path / "cache"
    r1 = open_cache(url, storage_options=s3.storage_options, cache_dir=cache_dir)
    for e in range(r1.num_entries):
        r1.read_entry(e, check=True)
    files = [p for p in cache_dir.rglob("*") if p.is_file()]
    assert files and all(len(p.name) == 64 for p in files)  # hashed names, never the store's keys
    r2 = open_cache(url, storage_options=s3.storage_options, cache_dir=cache_dir)
    before = s3.faults.requests
    for e in reversed(range(r2.num_entries)):
        r2.read_entry(e, check=True)
    assert s3.faults.requests == before and r2.group.store.hits > 0 and r2.group.store.misses == 0
    _assert_same_entries(local_cache, url, b_opts=s3.storage_options, cache_dir=cache_dir)
    assert verify_cache(url, storage_options=s3.storage_options, cache_dir=str(cache_dir)).sound


@pytest.mark.s3
def test_a_repaired_store_is_read_afresh_through_the_cache_dir(s3, local_cache, tmp_path):
    """A damaged object read through --cache-dir, the documented repair (`copy --checksum`), then
    the same cache dir: the stale local copy fails its checksum, is dropped and fetched again."""
    opts = s3.storage_options
    url = f"{s3.bucket}/c.zarr"
    copy_cache(local_cache, url, storage_options=opts)
    client, bucket = s3.client(), s3.bucket.removeprefix("s3://")
    other = client.get_object(Bucket=bucket, Key="c.zarr/logits/dq/c/1/0/0/0")["Body"].read()
    client.put_object(Bucket=bucket, Key="c.zarr/logits/dq/c/0/0/0/0", Body=other)  # decodes, wrong entries
    cache_dir = tmp_path / "cache"
    with pytest.raises(CorruptEntryError, match="does not match its build-time checksum"):
        open_cache(url, storage_options=opts, cache_dir=cache_dir).read_entry(0)
    assert verify_cache(url, storage_options=opts, cache_dir=str(cache_dir)).corrupt == [IDS[0], IDS[1]]
    (local,) = cache_dir.rglob(hashlib.sha256(b"logits/dq/c/0/0/0/0").hexdigest())
    assert local.read_bytes() == other  # the stale copy
    copy_cache(local_cache, url, storage_options=opts, checksum=True)
    _assert_same_entries(local_cache, url, b_opts=opts, cache_dir=cache_dir)
    assert verify_cache(url, storage_options=opts, cache_dir=str(cache_dir)).sound
    assert local.read_bytes() == (Path(local_cache) / "logits/dq/c/0/0/0/0").read_bytes()


@pytest.mark.s3
def test_read_through_cache_is_not_used_while_building(s3, tmp_path):
    url = f"{s3.bucket}/building.zarr"
    make_synthetic_cache(url, _schema(), ids=IDS, shards=[0], finalize=False, storage_options=s3.storage_options)
    r = open_cache(url, storage_options=s3.storage_options, cache_dir=tmp_path / "cache", allow_incomplete=True)
    assert type(r.group.store).__name__ == "FsspecStore"  # objects still change: no local copies
    assert not (tmp_path / "cache").exists()


@pytest.mark.s3
def test_subset_and_merge_over_s3(s3, local_cache, tmp_path):
    opts = s3.storage_options
    val = f"{s3.bucket}/val.zarr"
    subset_cache(local_cache, val, split="val", dst_storage_options=opts)
    train = str(tmp_path / "train.zarr")  # one part local, one on s3: options apply to remote URLs only
    subset_cache(local_cache, train, split="train")
    merged = f"{s3.bucket}/merged.zarr"
    rep = merge_caches(merged, [train, val], storage_options=opts)
    assert rep.images == 6
    r = open_cache(merged, storage_options=opts)
    assert r.image_ids == IDS and r.schema.dataset.splits == ("train", "val")
    assert verify_cache(merged, storage_options=opts).sound
    _assert_same_entries(local_cache, merged, b_opts=opts)


@pytest.mark.s3
def test_transient_errors_lose_nothing(flaky_s3, local_cache, tmp_path):
    """~20% of requests answered 503 SlowDown / 500 InternalError: retries carry copy and verify."""
    s3 = flaky_s3
    remote = f"{s3.bucket}/flaky.zarr"
    copy_cache(local_cache, remote, storage_options=s3.storage_options)
    assert verify_cache(remote, storage_options=s3.storage_options).sound
    back = str(tmp_path / "back.zarr")
    copy_cache(remote, back, storage_options=s3.storage_options)
    assert s3.faults.injected > 20
    s3.faults.reset()
    _assert_same_entries(local_cache, back)
    _assert_same_entries(local_cache, remote, b_opts=s3.storage_options)


@pytest.mark.s3
def test_a_read_only_bucket_serves_every_reader(s3, local_cache, tmp_path, capsys):
    url = f"{s3.bucket}/c.zarr"
    copy_cache(local_cache, url, storage_options=s3.storage_options)
    s3.faults.read_only.add(s3.bucket.removeprefix("s3://"))
    opts = s3.storage_options
    r = open_cache(url, storage_options=opts)
    r.read_entry(3, check=True)
    assert describe_cache(url, storage_options=opts)["entries"] == 12
    assert verify_cache(url, storage_options=opts).sound
    open_cache(url, storage_options=opts, cache_dir=tmp_path / "cache").read_entry(0)
    render = tmp_path / "p.png"
    main(["preview", url, "-o", str(render), *_cli_options(s3)])
    assert render.stat().st_size > 0
    # writing is refused by the store, in one line
    with pytest.raises(SystemExit) as ex:
        main(["copy", local_cache, f"{s3.bucket}/new.zarr", *_cli_options(s3)])
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 1 and len(err.splitlines()) == 1 and "denied (Access Denied)" in err


@pytest.mark.s3
def test_missing_bucket_and_missing_credentials_are_one_line(s3, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "SKD_STORAGE_OPTIONS"}
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
        COLUMNS="200",
    )
    cmd = [sys.executable, "-m", "pipeline", "info", f"{s3.bucket}/c.zarr", "-S", f"endpoint_url={s3.endpoint}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1, out.stderr
    err = out.stderr.strip()
    assert len(err.splitlines()) == 1 and "no credentials" in err and "Traceback" not in err
    with pytest.raises(CacheNotFoundError, match="nothing exists there"):
        open_cache("s3://no-such-bucket-here/c.zarr", storage_options=s3.storage_options)


# ------------------------------------------------------------------------------------------------
# plain HTTP (read-only) and read-only local folders


def test_http_read_only(http_dir, local_cache, tmp_path):
    import shutil

    root, base = http_dir
    shutil.copytree(local_cache, root / "c.zarr")
    url = f"{base}/c.zarr"
    _assert_same_entries(local_cache, url)
    assert verify_cache(url).sound
    d = describe_cache(url)
    assert d["entries"] == 12 and d["bytes_total"] is None  # HTTP cannot list objects
    cache_dir = tmp_path / "cache"
    _assert_same_entries(local_cache, url, cache_dir=cache_dir)
    with pytest.raises(CacheWriteError, match="plain HTTP"):
        copy_cache(local_cache, f"{base}/new.zarr")
    with pytest.raises(CacheError, match="cannot list"):
        copy_cache(url, str(tmp_path / "back.zarr"))
    with pytest.raises(CacheWriteError, match="plain HTTP"):
        subset_cache(local_cache, f"{base}/val.zarr", split="val")
    with pytest.raises(CacheNotFoundError):
        open_cache(f"{base}/missing.zarr")


def test_http_without_range_support_works_through_the_cache_dir(local_cache, tmp_path):
    """``python -m http.server`` ignores Range headers; the read-through cache downloads whole objects."""
    import shutil

    from tests.cache_tools.conftest import serve_http

    shutil.copytree(local_cache, tmp_path / "www" / "c.zarr")
    base, server = serve_http(tmp_path / "www", ranges=False)
    try:
        _assert_same_entries(local_cache, f"{base}/c.zarr", cache_dir=tmp_path / "cache")
    finally:
        server.shutdown()
        server.server_close()


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_readers_never_write(local_cache, tmp_path, capsys):
    """open, info, verify, read entries, preview: the store is not touched (works as root too)."""
    before = _snapshot(Path(local_cache))
    r = open_cache(local_cache)
    r.read_entry(0, check=True)
    describe_cache(local_cache)
    verify_cache(local_cache)
    main(["preview", local_cache, "-o", str(tmp_path / "p.png")])
    assert _snapshot(Path(local_cache)) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_a_read_only_folder(local_cache, tmp_path):
    import shutil

    ro = tmp_path / "ro.zarr"
    shutil.copytree(local_cache, ro)
    for p in [ro, *ro.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        open_cache(str(ro)).read_entry(1, check=True)
        assert describe_cache(str(ro))["entries"] == 12
        assert verify_cache(str(ro)).sound
    finally:
        for p in [ro, *ro.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
