"""Format compatibility: the checked-in version-1 stores keep opening with exactly the same values.

The fixtures under ``tests/fixtures/cache_v1/`` were written once by ``tests/fixtures/make_fixtures.py``
and are never rewritten; tests copy them before changing anything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cache_tools import FORMAT_VERSION, open_cache
from cache_tools.errors import FormatVersionError
from cache_tools.inspect import describe_cache
from cache_tools.schema import ROOT_ATTR
from cache_tools.verify import verify_cache

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cache_v1"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


def test_the_fixture_is_of_the_current_version():
    assert {d["format_version"] for d in EXPECTED.values()} == {FORMAT_VERSION}


@pytest.mark.parametrize("name", ["dense", "views", "dense_delta2d"])
def test_v1_fixture_decodes_exactly(name):
    want = EXPECTED[name]
    r = open_cache(FIXTURES / f"{name}.zarr")
    s = r.schema
    assert (s.format_version, s.mode, s.status) == (want["format_version"], want["mode"], want["status"])
    assert (s.logits.codec, s.features.codec) == (want["logits_codec"], want["features_codec"])
    assert s.dataset.ids_sha256 == want["ids_sha256"]
    assert r.image_ids == want["image_ids"]
    assert [int(c) for c in r.checksums()] == want["checksums"]
    assert s.fidelity == pytest.approx(want["fidelity"], rel=1e-6)
    assert r.num_entries == len(want["entries"])
    for e, exp in enumerate(want["entries"]):
        entry = r.read_entry(e, check=True)
        v = entry.view
        assert entry.image_id == exp["image_id"]
        assert [v.scale, list(v.resized), list(v.box), v.flip] == exp["view"]
        assert list(entry.grid) == exp["grid"]
        assert np.bincount(entry.logits.argmax(0).ravel(), minlength=4).tolist() == exp["logits_argmax_hist"]
        assert float(entry.logits.astype(np.float64).sum()) == pytest.approx(exp["logits_sum"], rel=1e-6, abs=1e-4)
        assert list(entry.feature.shape) == exp["feature_shape"]
        assert float(entry.feature.astype(np.float64).sum()) == pytest.approx(exp["feature_sum"], rel=1e-6, abs=1e-4)


@pytest.mark.parametrize("name", ["dense", "views", "dense_delta2d"])
def test_v1_fixture_passes_the_team_tools(name):
    url = str(FIXTURES / f"{name}.zarr")
    assert verify_cache(url).sound
    d = describe_cache(url)
    assert d["format_version"] == 1 and d["images"] == 3 and d["bytes_total"] > 0


def _bump_version(store: Path, version: int) -> None:
    """Change format_version in the root attributes (and in nothing else: consolidated metadata keeps
    only the children's documents)."""
    doc_path = store / "zarr.json"
    doc = json.loads(doc_path.read_text())
    doc["attributes"][ROOT_ATTR]["format_version"] = version
    doc_path.write_text(json.dumps(doc))


def test_a_future_version_fails_naming_both_versions(tmp_path):
    store = tmp_path / "future.zarr"
    shutil.copytree(FIXTURES / "dense.zarr", store)
    _bump_version(store, FORMAT_VERSION + 1)
    with pytest.raises(FormatVersionError) as info:
        open_cache(store)
    msg = str(info.value)
    assert f"format version {FORMAT_VERSION + 1}" in msg and f"format version {FORMAT_VERSION})" in msg
    assert "upgrade skd" in msg


def test_a_future_version_is_one_line_in_the_cli(tmp_path, capsys):
    from pipeline.cli import main

    store = tmp_path / "future.zarr"
    shutil.copytree(FIXTURES / "views.zarr", store)
    _bump_version(store, 7)
    for cmd in (["info", str(store)], ["verify", str(store)]):
        with pytest.raises(SystemExit) as ex:
            main(cmd)
        assert ex.value.code == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "version 7" in err and f"version {FORMAT_VERSION}" in err
