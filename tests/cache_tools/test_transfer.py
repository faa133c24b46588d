"""copy, subset, merge: moved and cut caches hold exactly the source's encoded parts."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cache_tools import open_cache
from cache_tools.errors import (
    CacheError,
    ConfigMismatchError,
    CorruptEntryError,
    IncompleteCacheError,
    NotACacheError,
    SchemaMismatchError,
)
from cache_tools.schema import Arrays, ids_digest
from cache_tools.testing import make_synthetic_cache, synthetic_schema
from cache_tools.transfer import copy_cache, merge_caches, select_images, subset_cache
from cache_tools.verify import verify_cache
from pipeline.cli import main
from tests.catalogue.conftest import snapshot

TRAIN = [f"train/a/a_{i:03d}" for i in range(5)]
VAL = [f"val/b/b_{i:03d}" for i in range(3)]
IDS = TRAIN + VAL


def _views(url: str, ids: list[str], seed: int = 0) -> str:
    schema = synthetic_schema(mode="views", per_image=2, ids=ids, splits=("train", "val"), shard_images=3)
    make_synthetic_cache(url, schema, ids=ids, seed=seed)
    return url


@pytest.fixture
def src(tmp_path) -> str:
    return _views(str(tmp_path / "src.zarr"), IDS)


def _same_parts(a: str, b: str, image_ids: list[str] | None = None) -> None:
    """Every entry of ``b`` holds byte-identical encoded parts and tables to ``a``'s entry of that image."""
    ra, rb = open_cache(a), open_cache(b)
    for img, image_id in enumerate(image_ids or rb.image_ids):
        ia = ra.image_index(image_id)
        ib = rb.image_index(image_id)
        assert img == ib or image_ids is None
        for ea, eb in zip(ra.entries_of_image(ia), rb.entries_of_image(ib), strict=True):
            pa, pb = ra.read_parts(ea), rb.read_parts(eb)
            for t in pa:
                for n in pa[t]:
                    np.testing.assert_array_equal(pa[t][n], pb[t][n])
                    assert pa[t][n].dtype == pb[t][n].dtype
            assert ra.checksums()[ea] == rb.checksums()[eb]
            assert ra.view(ea)._replace(image=0) == rb.view(eb)._replace(image=0)
            np.testing.assert_array_equal(ra.array(Arrays.ENTRY_FIDELITY)[ea], rb.array(Arrays.ENTRY_FIDELITY)[eb])
        assert ra.image_sha256()[ia] == rb.image_sha256()[ib]


# ------------------------------------------------------------------------------------------------
# copy


def test_copy_is_exact_and_resumable(src, tmp_path, monkeypatch):
    dst = tmp_path / "dst.zarr"
    seen = []
    rep = copy_cache(src, str(dst), progress=lambda *a: seen.append(a))
    assert rep.copied == rep.objects == rep.verified and rep.skipped == 0
    assert seen[-1][0] == seen[-1][1] and seen[-1][2] == seen[-1][3] == rep.objects
    for p in Path(src).rglob("*"):
        if p.is_file():
            assert (dst / p.relative_to(src)).read_bytes() == p.read_bytes()
    assert verify_cache(str(dst)).sound
    again = copy_cache(src, str(dst))
    assert again.copied == 0 and again.skipped == rep.objects
    # a damaged shard of the same size: found by verify, repaired by --checksum
    shard = next(p for p in sorted((dst / "logits" / "dq").rglob("*")) if p.is_file() and p.name != "zarr.json")
    data = bytearray(shard.read_bytes())
    data[25] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert not verify_cache(str(dst)).sound
    monkeypatch.setattr("cache_tools.transfer._SMALL", 0)  # as if every object were a big shard
    assert copy_cache(src, str(dst)).copied == 0  # sizes equal: big objects are not re-read
    assert copy_cache(src, str(dst), checksum=True).copied == 1
    assert verify_cache(str(dst)).sound


def test_an_interrupted_copy_never_looks_complete_and_continues(src, tmp_path):
    dst = tmp_path / "dst.zarr"
    files = sorted(p for p in Path(src).rglob("*") if p.is_file() and p.relative_to(src).as_posix() != "zarr.json")
    for p in files[: len(files) // 2]:  # what a killed copy leaves: some objects, one of them cut short
        out = dst / p.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(p.read_bytes())
    out.write_bytes(out.read_bytes()[:-3])
    with pytest.raises(NotACacheError):
        open_cache(str(dst))
    rep = copy_cache(src, str(dst))
    assert rep.skipped == len(files) // 2 - 1 and rep.copied == rep.objects - rep.skipped
    assert verify_cache(str(dst)).sound


def test_copy_refuses_other_data_and_other_caches(src, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(NotACacheError, match="not part of"):
        copy_cache(src, str(other))
    assert (other / "notes.txt").read_text() == "keep"
    different = _views(str(tmp_path / "other.zarr"), IDS, seed=5)
    with pytest.raises(ConfigMismatchError, match="--overwrite"):
        copy_cache(src, different)
    copy_cache(src, different, overwrite=True)
    _same_parts(src, different)
    with pytest.raises(CacheError, match="also a source"):
        copy_cache(src, src)


def test_copy_cli(src, tmp_path, capsys):
    main(["copy", src, str(tmp_path / "c.zarr")])
    assert "opens as a cache" in capsys.readouterr().out
    main(["copy", src, str(tmp_path / "c.zarr"), "--json"])
    d = json.loads(capsys.readouterr().out)
    assert d["copied"] == 0 and d["skipped"] == d["objects"]


# ------------------------------------------------------------------------------------------------
# subset


def test_select_images():
    assert select_images(IDS, split="val") == [5, 6, 7]
    assert select_images(IDS, wanted=["val/b/b_001", "train/a/a_000", "val/b/b_001"]) == [0, 6]
    picks = select_images(IDS, fraction=0.5, seed=3)
    assert len(picks) == 4 and picks == sorted(picks) and picks == select_images(IDS, fraction=0.5, seed=3)
    with pytest.raises(SchemaMismatchError, match="start with: train, val"):
        select_images(IDS, split="test")
    with pytest.raises(SchemaMismatchError, match="'nope'"):
        select_images(IDS, wanted=["nope"])
    with pytest.raises(CacheError, match="exactly one"):
        select_images(IDS)
    with pytest.raises(CacheError, match="fraction"):
        select_images(IDS, fraction=1.5)


def test_subset_by_split(src, tmp_path):
    dst = str(tmp_path / "val.zarr")
    rep = subset_cache(src, dst, split="val", shard_images=2)
    r = open_cache(dst)
    s = r.schema
    assert r.image_ids == VAL and s.dataset.splits == ("val",)
    assert s.dataset.num_images == 3 and s.dataset.ids_sha256 == ids_digest(VAL)
    assert s.num_entries == 6 and s.shard_entries == 4 and s.num_shards == 2 and rep.shards == 2
    assert s.fidelity["sampled_entries"] == 6  # recomputed from the copied rows
    assert s.build["derived_from"] == {"operation": "subset", "source": src, "split": "val"}
    _same_parts(src, dst)
    assert verify_cache(dst).sound


def test_subset_by_ids_and_fraction(src, tmp_path):
    rep = subset_cache(src, str(tmp_path / "ids.zarr"), ids=["val/b/b_002", "train/a/a_001"])
    r = open_cache(str(tmp_path / "ids.zarr"))
    assert r.image_ids == ["train/a/a_001", "val/b/b_002"] and r.schema.dataset.splits == ("train", "val")
    assert rep.images == 2
    subset_cache(src, str(tmp_path / "half.zarr"), fraction=0.5, seed=1)
    assert open_cache(str(tmp_path / "half.zarr")).num_images == 4
    _same_parts(src, str(tmp_path / "half.zarr"))


def test_subset_resumes_and_refuses_corrupt_sources(src, tmp_path):
    dst = str(tmp_path / "v.zarr")
    subset_cache(src, dst, split="train", shard_images=2)
    again = subset_cache(src, dst, split="train", shard_images=2)
    assert again.resumed and again.shards_written == 0
    # a corrupt source entry is not copied into a new store
    import zarr

    g = zarr.open_group(src, mode="r+")
    sums = g[Arrays.ENTRY_CHECKSUM][...]
    sums[13] ^= 7
    g[Arrays.ENTRY_CHECKSUM][...] = sums
    with pytest.raises(CorruptEntryError, match=r"val/b/b_001.*skdcache verify"):
        subset_cache(src, str(tmp_path / "bad.zarr"), split="val")


def test_subset_of_an_unfinished_store_needs_its_entries(tmp_path):
    url = str(tmp_path / "p.zarr")
    make_synthetic_cache(url, synthetic_schema(num_images=4, shard_images=2), shards=[0], finalize=False)
    with pytest.raises(IncompleteCacheError):
        subset_cache(url, str(tmp_path / "s.zarr"), fraction=1.0)


def test_subset_cli(src, tmp_path, capsys):
    ids = tmp_path / "ids.txt"
    ids.write_text("# two images\ntrain/a/a_003\n\nval/b/b_000\n")
    main(["subset", src, str(tmp_path / "s.zarr"), "--ids", str(ids)])
    assert "2 images, 4 entries" in capsys.readouterr().out
    main(["subset", src, str(tmp_path / "j.zarr"), "--split", "val", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == len(open_cache(str(tmp_path / "j.zarr")).image_ids) > 0
    with pytest.raises(SystemExit) as ex:
        main(["subset", src, str(tmp_path / "t.zarr"), "--split", "val", "--fraction", "0.5"])
    assert ex.value.code == 1 and "exactly one of" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# merge


def test_merge_equals_one_build(tmp_path):
    """Parts built on two machines merge into the store one machine would have written."""
    whole = str(tmp_path / "whole.zarr")
    schema = synthetic_schema(mode="views", per_image=2, ids=IDS, splits=("train", "val"), shard_images=3)
    _, maps = make_synthetic_cache(whole, schema, ids=IDS, seed=0)
    # the same entries, split in two parts (different shard sizes, as separate builds choose)
    parts = []
    for name, ids, shard_images in (("p1", IDS[::2], 2), ("p2", IDS[1::2], 1)):
        url = str(tmp_path / f"{name}.zarr")
        s = synthetic_schema(mode="views", per_image=2, ids=ids, splits=("train", "val"), shard_images=shard_images)
        from cache_tools.store import prepare_cache
        from cache_tools.testing import write_entries

        r = open_cache(whole)
        keep = [r.image_index(i) for i in ids]
        from cache_tools.schema import View

        views = [View(j, *r.view(e)[1:]) for j, img in enumerate(keep) for e in r.entries_of_image(img)]
        writer, _ = prepare_cache(
            url,
            s,
            image_ids=ids,
            image_sizes=r.image_sizes[keep],
            views=views,
            grids=np.concatenate([r.entry_grid[list(r.entries_of_image(i))] for i in keep]),
        )
        sub = {n: maps[e] for n, e in enumerate(e for img in keep for e in r.entries_of_image(img))}
        import hashlib

        write_entries(writer, sub, [hashlib.sha256(i.encode()).digest() for i in ids])
        writer.finalize({"device": name, "seconds": 1.5})
        parts.append(url)
    merged = str(tmp_path / "merged.zarr")
    rep = merge_caches(merged, parts, shard_images=3)
    m = open_cache(merged)
    assert m.image_ids == IDS and m.schema.dataset.ids_sha256 == open_cache(whole).schema.dataset.ids_sha256
    assert m.schema.content_key() == open_cache(whole).schema.content_key()
    assert m.schema.build["seconds"] == 3.0 and m.schema.build["device"] == "p1, p2"
    assert rep.images == 8 and rep.entries == 16
    _same_parts(whole, merged)
    assert verify_cache(merged).sound


def test_merge_refuses_mismatches_and_duplicates(tmp_path):
    a = _views(str(tmp_path / "a.zarr"), TRAIN)
    b = _views(str(tmp_path / "b.zarr"), VAL)
    fp16 = str(tmp_path / "fp16.zarr")
    s = synthetic_schema(mode="views", per_image=2, ids=VAL, splits=("train", "val"), logits_codec="fp16")
    make_synthetic_cache(fp16, s, ids=VAL)
    with pytest.raises(ConfigMismatchError, match=r"logits\.codec: 'gap-u8' vs 'fp16'"):
        merge_caches(str(tmp_path / "m.zarr"), [a, fp16])
    dup = _views(str(tmp_path / "dup.zarr"), [TRAIN[2], *VAL[:1]])
    with pytest.raises(SchemaMismatchError, match="'train/a/a_002' is in both"):
        merge_caches(str(tmp_path / "m.zarr"), [a, dup])
    with pytest.raises(CacheError, match="at least two"):
        merge_caches(str(tmp_path / "m.zarr"), [a])
    with pytest.raises(CacheError, match="also a source"):
        merge_caches(a, [a, b])
    assert not os.path.exists(tmp_path / "m.zarr")
    main(["merge", str(tmp_path / "m.zarr"), a, b])
    assert open_cache(str(tmp_path / "m.zarr")).image_ids == IDS


def test_merge_cli_names_the_difference(tmp_path, capsys):
    a = _views(str(tmp_path / "a.zarr"), TRAIN)
    other = str(tmp_path / "o.zarr")
    make_synthetic_cache(other, synthetic_schema(mode="views", per_image=3, ids=VAL, splits=("train", "val")), ids=VAL)
    with pytest.raises(SystemExit) as ex:
        main(["merge", str(tmp_path / "m.zarr"), a, other])
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 1 and len(err.splitlines()) == 1
    assert "different configurations (entries_per_image: 2 vs 3)" in err
    shutil.rmtree(a)


# ------------------------------------------------------------------------------------------------
# destinations that overlap a source, foreign destinations, re-runs


@pytest.mark.parametrize(
    "where, match",
    [
        ("{src}/inner.zarr", "is inside the source"),
        ("{src}/logits/x.zarr", "is inside the source"),
        ("{src}/", "also a source"),
        ("{parent}", "is inside the destination"),
    ],
)
def test_copy_subset_merge_refuse_destinations_overlapping_a_source(src, tmp_path, where, match):
    b = _views(str(tmp_path / "b.zarr"), [f"test/c/c_{i:03d}" for i in range(2)])
    dst = where.format(src=src, parent=tmp_path)
    before = snapshot(tmp_path)
    for run in (
        lambda: copy_cache(src, dst),
        lambda: subset_cache(src, dst, split="val"),
        lambda: merge_caches(dst, [b, src]),
    ):
        with pytest.raises(CacheError, match=match):
            run()
    assert snapshot(tmp_path) == before


def test_urls_nesting_in_a_source_are_refused():
    url = "memory://skd-nest/src.zarr"
    make_synthetic_cache(url)
    for dst in (f"{url}/inner.zarr", "memory://skd-nest", "MEMORY://skd-nest/src.zarr/x"):
        with pytest.raises(CacheError, match="inside"):
            copy_cache(url, dst)
    # a sibling whose name starts with the source's is not inside it
    copy_cache(url, f"{url}-copy")
    assert open_cache(f"{url}-copy").schema == open_cache(url).schema


def test_copy_over_a_foreign_zarr_group_needs_overwrite(src, tmp_path):
    import zarr

    dst = tmp_path / "theirs.zarr"
    zarr.open_group(str(dst), mode="w", attributes={"owner": "someone else"})
    (dst / "notes.txt").write_text("keep")
    before = snapshot(dst)
    with pytest.raises(NotACacheError, match="pass --overwrite to delete everything"):
        copy_cache(src, str(dst))
    assert snapshot(dst) == before
    copy_cache(src, str(dst), overwrite=True)
    _same_parts(src, str(dst))
    assert not (dst / "notes.txt").exists()


def test_rerunning_a_finished_subset_or_merge_rewrites_nothing(src, tmp_path):
    dst = str(tmp_path / "v.zarr")
    subset_cache(src, dst, split="val")
    before = snapshot(dst)
    again = subset_cache(src, dst, split="val")
    assert again.resumed and again.shards_written == 0 and snapshot(dst) == before
    a = str(tmp_path / "a.zarr")
    subset_cache(src, a, split="train")
    merged = str(tmp_path / "m.zarr")
    merge_caches(merged, [a, dst])
    before = snapshot(merged)
    assert merge_caches(merged, [a, dst]).shards_written == 0 and snapshot(merged) == before
