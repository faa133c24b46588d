"""verify: every entry decodes and matches its checksum; problems reported by image id."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr
from PIL import Image

from cache_tools.errors import CacheNotFoundError
from cache_tools.schema import Arrays
from cache_tools.testing import make_synthetic_cache, synthetic_schema
from cache_tools.verify import VerifyReport, verify_cache
from pipeline.cli import main

IDS = [f"train/town/town_{i:06d}" for i in range(6)]


@pytest.fixture
def store(tmp_path) -> Path:
    """A complete dense cache: 6 images, shards of 2."""
    url = tmp_path / "c.zarr"
    make_synthetic_cache(str(url), synthetic_schema(num_images=6, shard_images=2))
    return url


def _shard_file(store: Path, part: str, shard: int) -> Path:
    arr = zarr.open_array(str(store / part), mode="r")
    return store / part / arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))


def test_a_sound_cache(store):
    seen = []
    report = verify_cache(str(store), progress=lambda *a: seen.append(a))
    assert report.sound and report.entries_ok == 6 and not report.problems
    assert report.summary().startswith("sound: 6 entries of 6 images")
    assert seen[-1][:2] == (6, 6) and seen[-1][2] == report.bytes_read > 0
    assert report.to_dict()["sound"] is True


def test_views_store_and_other_schedulers(tmp_path):
    url = str(tmp_path / "v.zarr")
    make_synthetic_cache(url, synthetic_schema(mode="views", per_image=3, num_images=4, shard_images=2))
    for scheduler in ("threads", "sync"):
        report = verify_cache(url, scheduler=scheduler, workers=1)
        assert report.sound and report.num_entries == 12 and report.num_shards == 2


def test_missing_entries_of_an_unfinished_build(tmp_path):
    url = str(tmp_path / "c.zarr")
    make_synthetic_cache(url, synthetic_schema(num_images=6, shard_images=2), shards=[0, 2], finalize=False)
    report = verify_cache(url)
    assert not report.sound and report.status == "building"
    assert report.missing == IDS[2:4] and not report.partial and not report.corrupt
    assert report.entries_ok == 4
    assert "2 missing (train/town/town_000002, train/town/town_000003)" in report.summary()


def test_a_finished_but_unfinalised_store_is_not_sound(tmp_path):
    url = str(tmp_path / "c.zarr")
    make_synthetic_cache(url, synthetic_schema(num_images=2, shard_images=2), finalize=False)
    report = verify_cache(url)
    assert report.entries_ok == 2 and not report.sound
    assert "not finalised" in report.summary()


def test_a_missing_shard_object_is_partial(store):
    _shard_file(store, "logits/top", 1).unlink()
    report = verify_cache(str(store))
    assert report.partial == IDS[2:4] and not report.corrupt and not report.missing
    assert "logits/top/c/1/0/0 is missing" in report.problems[0].reason


def test_a_missing_inner_chunk_is_partial(store):
    """The shard exists, but its index says entry 3's chunk was never written."""
    f = _shard_file(store, "logits/dq", 1)
    data = bytearray(f.read_bytes())
    n = 2  # entries per shard
    index = np.frombuffer(bytes(data[-(16 * n + 4) : -4]), dtype="<u8").reshape(n, 2).copy()
    index[1] = 2**64 - 1
    raw = index.tobytes()
    data[-(16 * n + 4) :] = raw + google_crc32c.value(raw).to_bytes(4, "little")
    f.write_bytes(bytes(data))
    report = verify_cache(str(store))
    assert report.partial == [IDS[3]] and report.corrupt == []
    assert "chunk of logits/dq is missing from the shard" in report.problems[0].reason


def test_flipped_bytes_are_corrupt(store):
    f = _shard_file(store, "logits/dq", 2)
    data = bytearray(f.read_bytes())
    data[20:30] = bytes(b ^ 0xFF for b in data[20:30])
    f.write_bytes(bytes(data))
    report = verify_cache(str(store))
    assert report.corrupt == [IDS[4]] and report.entries_ok == 5
    assert "does not decode" in report.problems[0].reason


def test_a_truncated_shard_is_corrupt(store):
    f = _shard_file(store, "features/data", 0)
    f.write_bytes(f.read_bytes()[:-7])
    report = verify_cache(str(store))
    assert report.corrupt == IDS[:2]
    assert "features/data" in report.problems[0].reason


def test_a_checksum_mismatch_is_corrupt(store):
    g = zarr.open_group(str(store), mode="r+")
    sums = g[Arrays.ENTRY_CHECKSUM][...]
    sums[5] ^= 1
    g[Arrays.ENTRY_CHECKSUM][...] = sums
    report = verify_cache(str(store))
    assert report.corrupt == [IDS[5]]
    assert "do not match the checksum" in report.problems[0].reason


def test_dataset_fingerprints(label_caches, sample_root, tmp_path):
    report = verify_cache(label_caches["dense"], dataset_root=str(sample_root))
    assert report.sound and report.images_checked == 6 and report.dataset_extra == 0
    # a changed image file and a removed one are reported by id
    data = tmp_path / "data"
    shutil.copytree(sample_root, data)
    files = sorted((data / "leftImg8bit" / "train").rglob("*.png"))
    img = np.array(Image.open(files[1]))
    img[0, 0] ^= 1
    Image.fromarray(img).save(files[1])
    files[4].unlink()
    report = verify_cache(label_caches["dense"], dataset_root=str(data))
    assert not report.sound and report.entries_ok == 6
    assert len(report.fingerprint) == 1 and files[1].name.startswith(report.fingerprint[0].rsplit("/", 1)[1])
    assert len(report.not_in_dataset) == 1 and files[4].name.startswith(report.not_in_dataset[0].rsplit("/", 1)[1])
    assert report.images_checked == 5


def test_cli_exit_codes_and_json(store, capsys):
    main(["verify", str(store)])  # a sound cache: returns (exit status 0)
    out = capsys.readouterr()
    assert "sound: 6 entries" in out.out and "checked 6 entries" in out.out
    _shard_file(store, "logits/dq", 0).unlink()
    with pytest.raises(SystemExit) as ex:
        main(["verify", str(store)])
    assert ex.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("NOT sound: 2 partial (train/town/town_000000, train/town/town_000001)")
    with pytest.raises(SystemExit) as ex:
        main(["verify", str(store), "--json"])
    assert ex.value.code == 1
    d = json.loads(capsys.readouterr().out)
    assert d["sound"] is False and d["partial"] == IDS[:2] and d["problems"][0]["kind"] == "partial"


def test_a_missing_url_is_an_error(tmp_path):
    with pytest.raises(CacheNotFoundError):
        verify_cache(str(tmp_path / "nothing.zarr"))


def test_report_summary_lists_kinds():
    r = VerifyReport(url="x", status="complete", mode="dense", num_images=5, num_entries=5, num_shards=1)
    r.corrupt = ["a", "b", "c", "d"]
    assert r.summary().startswith("NOT sound: 4 corrupt (a, b, c, … (+1))")


def test_all_zero_features_are_sound(tmp_path, monkeypatch):
    """All-zero chunks are written: verify never takes zeros for missing data."""
    import cache_tools.testing as testing

    maps = testing.synthetic_maps
    monkeypatch.setattr(testing, "synthetic_maps", lambda *a: (maps(*a)[0], np.zeros_like(maps(*a)[1])))
    url = tmp_path / "z.zarr"
    make_synthetic_cache(str(url))
    report = verify_cache(str(url))
    assert report.sound and report.entries_ok == 6, report.summary()


def test_a_missing_chunk_whose_checksum_proves_it_was_zeros_is_sound(tmp_path, monkeypatch):
    """A store written before all-zero chunks were kept: the checksum tells zeros from lost data."""
    import cache_tools.testing as testing

    maps = testing.synthetic_maps
    monkeypatch.setattr(testing, "synthetic_maps", lambda *a: (maps(*a)[0], np.zeros_like(maps(*a)[1])))
    url = tmp_path / "z.zarr"
    make_synthetic_cache(str(url))
    _shard_file(url, "features/data", 1).unlink()  # how such a writer left an all-zero shard
    assert verify_cache(str(url)).sound
    _shard_file(url, "logits/dq", 1).unlink()  # real data lost
    report = verify_cache(str(url))
    assert report.partial == IDS[2:4] and "logits/dq/c/1/0/0/0 is missing" in report.problems[0].reason
