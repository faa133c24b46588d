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


# ------------------------------------------------------------------------------------------------
# every read is checked


def _shard_object(url, part: str, shard: int):
    arr = zarr.open_array(str(url / part), mode="r")
    return url / part / arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))


def test_a_missing_shard_object_of_done_entries_is_refused_on_read(tmp_path):
    """zarr reads a missing chunk as fill values; the reader compares every entry with its checksum."""
    url = tmp_path / "c.zarr"
    make_synthetic_cache(str(url))
    _shard_object(url, "logits/top", 1).unlink()
    r = open_cache(str(url))
    for e in (0, 1, 4, 5):
        r.read_entry(e)  # the other shards read as before
    for e in (2, 3):
        with pytest.raises(CorruptEntryError, match=r"town_00000\d\).*logits/top/c/1/0/0 is missing.*skdcache verify"):
            r.read_entry(e)
        with pytest.raises(CorruptEntryError, match="--checksum"):
            r.read_parts(e)
    assert r.read_parts(2, check=False)["logits"]["top"].max() == 0  # what an unchecked read would train on


def test_an_altered_chunk_that_still_decodes_is_refused(tmp_path):
    """Without a compressor nothing but the checksum notices a changed byte."""
    from dataclasses import replace

    from cache_tools.schema import Compressor

    s = synthetic_schema(features_codec=None, logits_codec="fp16")
    s = replace(s, logits=replace(s.logits, compressor=Compressor("none", 0)))
    url = tmp_path / "c.zarr"
    make_synthetic_cache(str(url), s)
    f = _shard_object(url, "logits/data", 0)
    data = bytearray(f.read_bytes())
    data[100] ^= 0x01
    f.write_bytes(bytes(data))
    r = open_cache(str(url))
    with pytest.raises(CorruptEntryError, match="does not match its build-time checksum"):
        r.read_entry(0)
    r.read_entry(2)


def test_all_zero_chunks_are_written(tmp_path, monkeypatch):
    """An all-zero part is stored like any other, so a missing chunk is never mistaken for zeros."""
    import cache_tools.testing as testing

    maps = testing.synthetic_maps
    monkeypatch.setattr(testing, "synthetic_maps", lambda *a: (maps(*a)[0], np.zeros_like(maps(*a)[1])))
    url = tmp_path / "c.zarr"
    writer, _ = make_synthetic_cache(str(url))
    for shard in range(writer.schema.num_shards):
        data = _shard_object(url, "features/data", shard).read_bytes()
        n = writer.schema.shard_entries
        index = np.frombuffer(data[-(16 * n + 4) : -4], dtype="<u8").reshape(n, 2)
        assert (index[:, 0] != 2**64 - 1).all()  # every inner chunk is there
    assert (url / "entries" / "clipped" / "c" / "0").is_file()  # all-zero tables too
    assert open_cache(str(url)).read_entry(0).feature.max() == 0


# ------------------------------------------------------------------------------------------------
# bounded work on untrusted metadata


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.update(num_entries=1 << 23), "num_entries"),
        (lambda d: d.update(shard_entries=1 << 17), "shard_entries"),
        (lambda d: d.update(id_bytes=4096), "id_bytes"),
        (lambda d: d["logits"].update(grid=[9, 1 << 14]), "grid"),
        (lambda d: d["features"].update(block=[4, 0]), "block"),
        (lambda d: d["teacher"].update(num_classes=1 << 15), "num_classes"),
        (lambda d: d["dataset"].update(class_names=["c"] * 20000, num_classes=20000), "class_names"),
        (lambda d: d["dataset"].update(num_images=1 << 23), "num_images"),
    ],
)
def test_absurd_sizes_are_refused_from_the_numbers(mutate, match):
    d = synthetic_schema().to_dict()
    mutate(d)
    with pytest.raises(SchemaError, match=match):
        CacheSchema.from_dict(d)


def test_huge_entries_and_shards_are_refused_before_any_array_is_read(tmp_path):
    url = tmp_path / "c.zarr"
    make_synthetic_cache(str(url))
    doc = json.loads((url / "zarr.json").read_text())
    attrs = doc["attributes"][ROOT_ATTR]
    attrs["features"].update(grid=[8193, 8193], block=[1, 1], channels=65536, stored_channels=65536)
    (url / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(SchemaError, match="one entry would take"):
        open_cache(str(url))
    attrs["features"].update(grid=[9, 17], block=[1, 1], channels=8192, stored_channels=8192)
    attrs.update(shard_entries=1 << 14, entries_per_image=1)
    (url / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(SchemaError, match="a shard of features/data would take"):
        open_cache(str(url))


def test_a_store_holding_fewer_table_objects_than_it_claims_is_refused(tmp_path):
    url = tmp_path / "c.zarr"
    make_synthetic_cache(str(url))
    for shard_dir in sorted((url / "entries" / "grid" / "c").iterdir())[1:]:
        for f in shard_dir.iterdir():
            f.unlink()
    with pytest.raises(SchemaError, match="holds 1 of the 3 objects of entries/grid"):
        open_cache(str(url))
