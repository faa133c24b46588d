"""Bad-input catalogue: damaged and forged cache stores.

A store is untrusted. Every case damages a copy of a small real store (or forges its metadata),
runs a command line in-process (``skdcache``: pipeline.cli.main, ``skdstudent``: student.cli.main)
and asserts the exit code, one ``error:`` line without a traceback, and that every file that
existed before (the store and the dataset) is byte-identical afterwards. Damage to a done entry's
data must stop training, never train on fill values; absurd numbers must be refused from the
numbers alone, quickly.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main as skdcache
from student.cli import main as skdstudent
from tests.cache_tools.conftest import write_label_cache
from tests.catalogue.conftest import snapshot
from tests.cli import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def pristine(sample_root, tmp_path_factory) -> Path:
    """A dense store of the sample dataset's train split: 6 images in one shard (every draw reads it)."""
    url = tmp_path_factory.mktemp("bad-stores") / "dense.zarr"
    write_label_cache(str(url), sample_root, mode="dense", shard_images=6)
    return url


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    """A fresh copy of the pristine store, to damage."""
    dst = tmp_path / "store.zarr"
    shutil.copytree(pristine, dst)
    return dst


def _checked(main: Callable, argv: list, capsys, watched: list[Path]) -> tuple[int, str]:
    """Run a command; assert every watched file is byte-identical afterwards; return (code, stderr)."""
    before = [snapshot(p) for p in watched]
    code, _, err = run_cli(main, [str(a) for a in argv], capsys)
    assert [snapshot(p) for p in watched] == before
    return code, err


def _train(sample_root: Path, store: Path, out: Path) -> list:
    return [
        "train", "--data", sample_root, "--out", out, "--student", "psp_tiny", "--iters", "2", "--batch-size", "2",
        "--crop", "64x64", "--workers", "0", "--cache", store, "--eval-split", "none",
    ]  # fmt: skip


def _root(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())


def _edit_schema(store: Path, **changes) -> None:
    """Rewrite keys of the root attribute (dotted paths for nested keys)."""
    doc = _root(store)
    attrs = doc["attributes"]["skd_cache"]
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = attrs
        for p in parents:
            node = node[p]
        node[leaf] = value
    (store / "zarr.json").write_text(json.dumps(doc))


def _rewrite_arrays(store: Path, fn: Callable[[str, dict], None]) -> None:
    """Apply ``fn(path, metadata)`` to every array's metadata, consolidated copy and own document alike."""
    doc = _root(store)
    for path, meta in doc["consolidated_metadata"]["metadata"].items():
        if meta["node_type"] != "array":
            continue
        fn(path, meta)
        own = store / path / "zarr.json"
        m = json.loads(own.read_text())
        fn(path, m)
        own.write_text(json.dumps(m))
    (store / "zarr.json").write_text(json.dumps(doc))


def _shard_object(store: Path, part: str = "logits/dq") -> Path:
    files = sorted(p for p in (store / part / "c").rglob("*") if p.is_file())
    assert len(files) == 1  # one shard
    return files[0]


# ------------------------------------------------------------------------------------------------
# damaged data of done entries: never trained on


def test_train_refuses_a_missing_shard_object(sample_root, store, tmp_path, capsys):
    _shard_object(store).unlink()
    code, err = _checked(skdstudent, _train(sample_root, store, tmp_path / "run"), capsys, [store, sample_root])
    assert_one_line_error(code, err, "is missing", "skdcache verify", "--checksum", "train/synthtown/")


def test_train_refuses_a_bit_flipped_chunk(sample_root, store, tmp_path, capsys):
    obj = _shard_object(store)
    data = bytearray(obj.read_bytes())
    data[len(data) // 3] ^= 0x10  # inside a zstd frame: its checksum fails
    obj.write_bytes(bytes(data))
    code, err = _checked(skdstudent, _train(sample_root, store, tmp_path / "run"), capsys, [store, sample_root])
    assert_one_line_error(code, err, "is damaged", "skdcache verify")


def test_train_refuses_entries_that_do_not_match_the_checksum_table(sample_root, store, tmp_path, capsys):
    import zarr

    table = zarr.open_array(str(store / "entries" / "checksum"), mode="r+")
    table[...] = table[...] ^ np.uint64(1)  # a well-formed table that disagrees with the data
    code, err = _checked(skdstudent, _train(sample_root, store, tmp_path / "run"), capsys, [store, sample_root])
    assert_one_line_error(code, err, "does not match its build-time checksum", "skdcache verify")


def test_preview_refuses_a_missing_shard_object(store, tmp_path, capsys):
    _shard_object(store, "features/data").unlink()
    argv = ["preview", store, "--out", tmp_path / "p.png", "--index", "0"]
    code, err = _checked(skdcache, argv, capsys, [store])
    assert_one_line_error(code, err, "entry 0", "is missing", "skdcache verify")


def test_verify_reports_a_missing_shard_object(store, capsys):
    _shard_object(store).unlink()
    before = snapshot(store)
    code, out, _ = run_cli(skdcache, ["verify", str(store), "--json"], capsys)
    report = json.loads(out)
    assert code == 1 and not report["sound"] and len(report["partial"]) == 6
    assert snapshot(store) == before


# ------------------------------------------------------------------------------------------------
# forged metadata: refused from the numbers alone


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"logits.grid": [100000, 100000]}, "logits.grid"),
        ({"shard_entries": 1 << 20}, "shard_entries"),
        ({"teacher.num_classes": 1_000_000}, "num_classes"),
        ({"num_entries": -5}, "num_entries"),
        ({"shard_entries": 0}, "shard_entries"),
        ({"id_bytes": 1 << 20}, "id_bytes"),
        ({"dataset.num_images": 1 << 30, "num_entries": 1 << 30}, "num_images"),
        (
            {
                "features.grid": [8193, 8193],
                "features.block": [1, 1],
                "features.channels": 65536,
                "features.stored_channels": 65536,
            },
            "one entry would take",
        ),
    ],
    ids=[
        "huge-canvas",
        "huge-shard",
        "huge-class-count",
        "negative-entries",
        "zero-shard",
        "huge-id-width",
        "2^30-images",
        "huge-entry",
    ],
)
def test_absurd_numbers_are_refused(store, capsys, changes, fragment):
    _edit_schema(store, **changes)
    code, err = _checked(skdcache, ["info", store], capsys, [store])
    assert_one_line_error(code, err, fragment)


def test_a_tiny_store_claiming_2_20_images_is_refused_quickly(store, capsys):
    """Every number consistent (arrays, chunks), but the objects are not there: one listing refuses it."""
    n = 1 << 20
    _edit_schema(store, **{"dataset.num_images": n, "num_entries": n})

    def grow(path: str, meta: dict) -> None:
        if path in ("features/pca_basis", "features/pca_mean"):
            return
        meta["shape"][0] = n
        if path in ("images/id", "images/size"):
            meta["chunk_grid"]["configuration"]["chunk_shape"][0] = 4096

    _rewrite_arrays(store, grow)
    code, err = _checked(skdcache, ["info", store], capsys, [store])
    assert_one_line_error(code, err, "claims 1048576 entries", "entries/grid")


def test_a_truncated_store_is_refused(sample_root, tmp_path, capsys):
    # six images in three shards of two, then all but the first entries/grid object lost
    small = tmp_path / "three.zarr"
    write_label_cache(str(small), sample_root, mode="dense", shard_images=2)
    for p in sorted((small / "entries" / "grid" / "c").iterdir())[1:]:
        shutil.rmtree(p)
    code, err = _checked(skdcache, ["info", small], capsys, [small])
    assert_one_line_error(code, err, "holds 1 of the 3 objects", "entries/grid")


def test_altered_chunking_is_refused(store, capsys):
    def one_per_chunk(path: str, meta: dict) -> None:
        if path == "entries/done":
            meta["chunk_grid"]["configuration"]["chunk_shape"] = [1]

    _rewrite_arrays(store, one_per_chunk)
    code, err = _checked(skdcache, ["info", store], capsys, [store])
    assert_one_line_error(code, err, "entries/done", "chunks/shards")


def test_a_missing_array_document_is_refused(store, capsys):
    doc = _root(store)
    del doc["consolidated_metadata"]  # a copy that dropped the consolidated metadata ...
    (store / "zarr.json").write_text(json.dumps(doc))
    (store / "logits" / "top" / "zarr.json").unlink()  # ... and lost one array's document
    code, err = _checked(skdcache, ["info", store], capsys, [store])
    assert_one_line_error(code, err, "logits/top", "missing")


def test_an_oversized_metadata_document_is_refused(store, capsys):
    doc = _root(store)
    doc["attributes"]["padding"] = "x" * (17 * 2**20)
    (store / "zarr.json").write_text(json.dumps(doc))
    code, err = _checked(skdcache, ["info", store], capsys, [store])
    assert_one_line_error(code, err, "zarr.json", "16 MiB")
