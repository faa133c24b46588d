"""The store: schema round trip, write -> reopen -> equal, resume rules, refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

from cache_tools import open_cache
from cache_tools.codecs import LogitCodec
from cache_tools.errors import (
    CacheNotFoundError,
    ConfigMismatchError,
    CorruptEntryError,
    FormatVersionError,
    IncompleteCacheError,
    NotACacheError,
    SchemaError,
    UnsafeCacheError,
)
from cache_tools.schema import ROOT_ATTR, Arrays, CacheSchema
from cache_tools.testing import make_synthetic_cache, synthetic_schema


def test_schema_round_trip():
    for mode in ("dense", "views"):
        s = synthetic_schema(mode=mode, per_image=2)
        d = json.loads(json.dumps(s.to_dict()))
        assert CacheSchema.from_dict(d) == s


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda d: d.update(format_version=99), FormatVersionError, "format version 99 is newer than this skd reads"),
        (lambda d: d.update(format="other"), SchemaError, "does not describe"),
        (lambda d: d["logits"].update(codec="pickle"), UnsafeCacheError, "knows only"),
        (lambda d: d.update(mode="sparse"), UnsafeCacheError, "knows only"),
        (lambda d: d["logits"]["compressor"].update(name="lzma"), UnsafeCacheError, "knows only"),
        (lambda d: d.update(num_entries=-1), SchemaError, "num_entries"),
        (lambda d: d["teacher"].update(weights_sha256="zz"), SchemaError, "64 hex"),
        (lambda d: d["build"].update(x=object()), SchemaError, "unsupported value"),
        (lambda d: d["dataset"].update(num_classes=3), SchemaError, "disagrees"),
    ],
)
def test_schema_rejects_bad_attributes(mutate, error, match):
    d = synthetic_schema().to_dict()
    mutate(d)
    with pytest.raises(error, match=match):
        CacheSchema.from_dict(d)


@pytest.mark.parametrize("mode, per_image", [("dense", 1), ("dense", 2), ("views", 3)])
def test_write_reopen_equal(tmp_path, mode, per_image):
    schema = synthetic_schema(mode=mode, per_image=per_image, num_images=5, shard_images=2)
    url = str(tmp_path / "c.zarr")
    _, exact = make_synthetic_cache(url, schema)
    r = open_cache(url)
    assert r.schema.status == "complete" and r.num_entries == 5 * per_image
    assert r.schema.num_shards == 3  # 2 + 2 + 1 images
    codec = LogitCodec.from_params(schema.logits.codec, schema.logits.params)
    for e in range(r.num_entries):
        entry = r.read_entry(e, check=True)
        logits, _ = exact[e]
        np.testing.assert_array_equal(entry.logits, codec.decode(codec.encode(logits)[0]))
        assert entry.image_index == e // per_image
        assert entry.feature.shape == (8, 3, 5)
    fid = r.schema.fidelity
    assert fid["sampled_entries"] == r.num_entries
    assert fid["argmax_agreement"] == 1.0 and fid["kl_t1_mean"] < 1e-3


def test_plain_zarr_reads_every_array(tmp_path):
    url = str(tmp_path / "c.zarr")
    make_synthetic_cache(url)
    g = zarr.open_group(url, mode="r")
    assert g.attrs[ROOT_ATTR]["format_version"] == 1
    q = g["logits/dq"][0]
    assert q.dtype == np.uint8 and q.shape == (5, 9, 17)
    assert g[Arrays.ENTRY_DONE][...].all()


def test_resume_and_config_mismatch(tmp_path):
    url = str(tmp_path / "c.zarr")
    schema = synthetic_schema(num_images=6, shard_images=2)
    writer, _ = make_synthetic_cache(url, schema, shards=[0, 2], finalize=False)
    assert writer.pending_shards() == [1]
    with pytest.raises(IncompleteCacheError, match="incomplete"):
        open_cache(url)
    partial = open_cache(url, allow_incomplete=True)
    with pytest.raises(IncompleteCacheError, match="never written"):
        partial.read_entry(2)
    # same configuration: resumed, the finished shards are kept
    before = zarr.open_group(url)["logits/dq"][0].copy()
    writer2, _ = make_synthetic_cache(url, schema, shards=[1], finalize=False)
    assert writer2.pending_shards() == []
    np.testing.assert_array_equal(zarr.open_group(url)["logits/dq"][0], before)
    writer2.finalize()
    assert open_cache(url).schema.status == "complete"
    # another configuration: refused, nothing touched
    other = synthetic_schema(num_images=6, shard_images=2, logits_codec="fp16")
    with pytest.raises(ConfigMismatchError, match=r"logits\.codec: 'gap-u8' there vs 'fp16' now"):
        make_synthetic_cache(url, other)
    assert open_cache(url).schema.logits.codec == "gap-u8"
    # ... unless asked to overwrite
    make_synthetic_cache(url, other, overwrite=True)
    assert open_cache(url).schema.logits.codec == "fp16"


def test_refuses_to_write_over_other_data(tmp_path):
    target = tmp_path / "mydata"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(NotACacheError, match="not an skd cache; refusing"):
        make_synthetic_cache(str(target), overwrite=True)
    assert (target / "precious.txt").read_text() == "keep me"


def test_open_errors(tmp_path):
    with pytest.raises(CacheNotFoundError, match="nothing exists there"):
        open_cache(str(tmp_path / "missing.zarr"))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "file.txt").write_text("x")
    with pytest.raises(NotACacheError):
        open_cache(str(tmp_path / "dir"))
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(NotACacheError, match="not an skd cache"):
        open_cache(str(tmp_path / "plain.zarr"))


def test_corrupt_chunk_is_reported(tmp_path):
    url = tmp_path / "c.zarr"
    make_synthetic_cache(str(url))
    shard = sorted((url / "logits" / "dq" / "c").rglob("*"))
    files = [p for p in shard if p.is_file()]
    data = bytearray(files[0].read_bytes())
    data[40:60] = bytes(20)
    files[0].write_bytes(bytes(data))
    r = open_cache(str(url))
    with pytest.raises(CorruptEntryError):
        for e in range(r.num_entries):
            r.read_entry(e, check=True)


@pytest.mark.filterwarnings("ignore:Numcodecs codecs are not")
def test_unsafe_codec_is_refused(tmp_path):
    url = tmp_path / "c.zarr"
    make_synthetic_cache(str(url))
    g = zarr.open_group(str(url), mode="r+")
    g.create_array("evil", shape=(2,), dtype="uint8", compressors=[zarr.codecs.numcodecs.Zlib()])
    zarr.consolidate_metadata(str(url))
    with pytest.raises(UnsafeCacheError, match=r"numcodecs\.zlib"):
        open_cache(str(url))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_string_dtype_is_refused(tmp_path):
    url = tmp_path / "c.zarr"
    make_synthetic_cache(str(url))
    g = zarr.open_group(str(url), mode="r+")
    g.create_array("names", shape=(2,), dtype=str)
    zarr.consolidate_metadata(str(url))
    with pytest.raises(UnsafeCacheError, match="plain numeric arrays"):
        open_cache(str(url))


def test_import_is_torch_free():
    code = "import cache_tools, cache_tools.store, cache_tools.inspect, sys; print(sorted(m for m in ('torch','dask','typer','rich') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
