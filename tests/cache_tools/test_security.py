"""A shared store is untrusted input: what a reader refuses, and ids that must not escape the dataset.

Every path is checked through the library and through the CLI (one line, exit 1, no traceback).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from cache_tools import open_cache
from cache_tools.datasets import SegDataset, fingerprint
from cache_tools.errors import DatasetError, NotACacheError, SchemaError, UnsafeCacheError
from cache_tools.preview import render_preview
from cache_tools.schema import ROOT_ATTR, Arrays
from cache_tools.testing import make_synthetic_cache, synthetic_schema
from cache_tools.verify import verify_cache
from pipeline.cli import main


@pytest.fixture
def store(tmp_path) -> Path:
    url = tmp_path / "c.zarr"
    make_synthetic_cache(str(url), synthetic_schema(num_images=4, shard_images=2))
    return url


def _edit_array(store: Path, path: str, change: Callable[[dict], None], *, consolidated: bool = True) -> None:
    """Change an array's metadata document (and, by default, its consolidated copy in the root)."""
    doc_path = store / path / "zarr.json"
    doc = json.loads(doc_path.read_text())
    change(doc)
    doc_path.write_text(json.dumps(doc))
    root = json.loads((store / "zarr.json").read_text())
    if consolidated:
        change(root["consolidated_metadata"]["metadata"][path])
    else:
        root.pop("consolidated_metadata")
    (store / "zarr.json").write_text(json.dumps(root))


def _edit_attrs(store: Path, change: Callable[[dict], None]) -> None:
    root = json.loads((store / "zarr.json").read_text())
    change(root["attributes"][ROOT_ATTR])
    (store / "zarr.json").write_text(json.dumps(root))


def _cli_refuses(argv: list[str], capsys, *needles: str) -> None:
    with pytest.raises(SystemExit) as ex:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def _inner_codec(name: str) -> Callable[[dict], None]:
    def change(doc: dict) -> None:
        doc["codecs"][0]["configuration"]["codecs"][1] = {"name": name}

    return change


# ------------------------------------------------------------------------------------------------
# metadata


@pytest.mark.parametrize("consolidated", [True, False], ids=["consolidated", "per-array"])
@pytest.mark.parametrize("codec", ["numcodecs.pickle", "com.example.exec", "numcodecs.zlib"])
def test_codecs_outside_the_allow_list_are_refused_before_zarr_sees_them(store, capsys, codec, consolidated):
    _edit_array(store, "logits/dq", _inner_codec(codec), consolidated=consolidated)
    with pytest.raises(UnsafeCacheError, match=rf"logits/dq uses codec\(s\) {codec} outside the allowed set"):
        open_cache(str(store))
    for cmd in ("info", "verify"):
        _cli_refuses([cmd, str(store)], capsys, "refusing to decode it")


def test_an_index_codec_outside_the_allow_list_is_refused(store):
    def change(doc: dict) -> None:
        doc["codecs"][0]["configuration"]["index_codecs"][1] = {"name": "numcodecs.pickle"}

    _edit_array(store, "features/data", change)
    with pytest.raises(UnsafeCacheError, match=r"numcodecs\.pickle"):
        open_cache(str(store))


@pytest.mark.parametrize("dtype", ["string", "object", "variable_length_utf8", "|O"])
def test_non_numeric_dtypes_are_refused(store, capsys, dtype):
    _edit_array(store, "entries/checksum", lambda d: d.__setitem__("data_type", dtype))
    with pytest.raises(UnsafeCacheError, match="only plain numeric arrays"):
        open_cache(str(store))
    _cli_refuses(["preview", str(store), "-o", str(store.parent / "p.png")], capsys, "plain numeric")


def test_storage_transformers_are_refused(store):
    _edit_array(store, "logits/top", lambda d: d.__setitem__("storage_transformers", [{"name": "x"}]))
    with pytest.raises(UnsafeCacheError, match="storage transformers"):
        open_cache(str(store))


def test_an_extra_array_with_an_unsafe_codec_is_refused(store):
    """Not only the arrays the schema names: anything in the store is checked."""
    g = zarr.open_group(str(store), mode="r+")
    g.create_array("extra", shape=(2,), dtype="uint8")
    zarr.consolidate_metadata(str(store))
    _edit_array(store, "extra", lambda d: d.__setitem__("codecs", [{"name": "bytes"}, {"name": "numcodecs.pickle"}]))
    with pytest.raises(UnsafeCacheError, match="extra uses codec"):
        open_cache(str(store))


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a["logits"].update(codec="pickle"), UnsafeCacheError, "knows only"),
        (lambda a: a["features"].update(pool="eval"), UnsafeCacheError, "knows only max, avg"),
        (lambda a: a.update(mode="__import__('os')"), UnsafeCacheError, "knows only dense, views"),
        (lambda a: a["teacher"].update(weights_sha256="../../x"), SchemaError, "64 hex"),
        (lambda a: a["build"].update(hook={"a": {"b": {"c": {"d": {"e": {}}}}}}), SchemaError, "nested too deeply"),
        (lambda a: a.update(num_entries=10**12), SchemaError, "num_entries"),
        (lambda a: a.pop("format"), SchemaError, "does not describe"),
    ],
    ids=["logits-codec", "pool", "mode", "weights-sha", "deep-nesting", "huge-count", "no-format"],
)
def test_tampered_attributes_are_refused(store, capsys, change, error, match):
    _edit_attrs(store, change)
    with pytest.raises(error, match=match):
        open_cache(str(store))
    _cli_refuses(["info", str(store)], capsys)


def test_attributes_that_disagree_with_the_arrays_are_refused(store):
    _edit_attrs(store, lambda a: a["logits"].update(grid=[9, 18]))
    with pytest.raises(SchemaError, match=r"array logits/dq is .* the schema implies"):
        open_cache(str(store))


@pytest.mark.parametrize(
    "table, values, match",
    [
        (Arrays.ENTRY_GRID, lambda v: v.__setitem__((0, 0), 50), "entries/grid"),
        (Arrays.ENTRY_GRID, lambda v: v.__setitem__((1, 1), 0), "entries/grid"),
        (Arrays.ENTRY_BOX, lambda v: v.__setitem__((2, 0), -5), "entries/box"),
        (Arrays.ENTRY_BOX, lambda v: v.__setitem__((2, 2), 0), "empty crop"),
        (Arrays.ENTRY_RESIZED, lambda v: v.__setitem__((0, 0), 10**9), "entries/resized"),
        (Arrays.IMAGE_SIZE, lambda v: v.__setitem__((0, 1), 0), "images/size"),
        (Arrays.ENTRY_SCALE, lambda v: v.__setitem__(1, np.nan), "entries/scale"),
        (Arrays.ENTRY_IMAGE, lambda v: v.__setitem__(3, 99), "entries/image"),
    ],
)
def test_tables_with_impossible_geometry_are_refused(store, table, values, match):
    g = zarr.open_group(str(store), mode="r+")
    v = g[table][...]
    values(v)
    g[table][...] = v
    with pytest.raises(SchemaError, match=match):
        open_cache(str(store))


def test_a_corrupt_metadata_document_is_not_a_cache(store):
    (store / "zarr.json").write_text("{not json")
    with pytest.raises(NotACacheError, match="not a JSON object"):
        open_cache(str(store))


# ------------------------------------------------------------------------------------------------
# image ids from the store never name files outside the dataset


UNSAFE = ["../../etc/passwd", "/etc/passwd", "train/../../../secret", "train\\town\\x", "train/town/\x00x", "C:/x"]


@pytest.fixture
def unsafe_cache(sample_root, tmp_path) -> tuple[str, list[str]]:
    """A cache whose ids are the dataset's first two images and a list of hostile ids."""
    from cache_tools.datasets import open_dataset

    ds = open_dataset(sample_root)
    ids = ds.ids[:2] + UNSAFE
    shas = [bytes.fromhex(fingerprint(ds.read_image_bytes(i))) for i in ds.ids[:2]] + [bytes(32)] * len(UNSAFE)
    url = str(tmp_path / "hostile.zarr")
    make_synthetic_cache(url, synthetic_schema(ids=ids, shard_images=2), ids=ids, image_sha256=shas)
    return url, ids


def test_verify_reports_unsafe_ids_and_never_reads_them(unsafe_cache, sample_root, monkeypatch):
    url, ids = unsafe_cache
    read = []
    original = SegDataset.read_image_bytes
    monkeypatch.setattr(SegDataset, "read_image_bytes", lambda self, i: read.append(i) or original(self, i))
    report = verify_cache(url, dataset_root=str(sample_root))
    assert sorted(report.unsafe_id) == sorted(UNSAFE)
    assert all(p.kind == "unsafe_id" for p in report.problems) and not report.sound
    assert read == ids[:2] and report.images_checked == 2
    assert report.entries_ok == len(ids)  # the teacher data itself is intact


def test_preview_refuses_unsafe_ids(unsafe_cache, sample_root, tmp_path, capsys):
    url, _ = unsafe_cache
    with pytest.raises(DatasetError, match="path component"):
        render_preview(url, tmp_path / "p.png", ids=["../../etc/passwd"], dataset_root=sample_root)
    with pytest.raises(DatasetError, match="absolute path"):
        render_preview(url, tmp_path / "p.png", indices=[3], dataset_root=sample_root)
    _cli_refuses(
        ["preview", url, "--id", "train/../../../secret", "--dataset", str(sample_root), "-o", str(tmp_path / "p.png")],
        capsys,
        "'.' or '..' path component",
    )
    # without the dataset nothing is resolved: the maps alone are drawn
    assert render_preview(url, tmp_path / "maps.png", ids=["../../etc/passwd"]).entries == [2]
    assert not (tmp_path / "p.png").exists()


def test_copies_keep_hostile_ids_as_data(unsafe_cache, tmp_path):
    """copy/subset treat ids as data: nothing is ever created from an id."""
    from cache_tools.transfer import copy_cache, subset_cache

    url, ids = unsafe_cache
    copy_cache(url, str(tmp_path / "copy.zarr"))
    subset_cache(url, str(tmp_path / "sub.zarr"), ids=ids[2:4])
    created = {p.name for p in tmp_path.rglob("*")}
    assert "passwd" not in created and "secret" not in created
    assert open_cache(str(tmp_path / "sub.zarr")).image_ids == ids[2:4]
    shutil.rmtree(tmp_path / "copy.zarr")
