"""Bad-input catalogue: destinations and teacher outputs that must never cost the user data.

Every case runs the command line (in-process) and asserts the exit code, one ``error:`` line
without a traceback, and that every file that existed before is byte-identical afterwards. The
valid requests among them (a re-run on a complete cache, an interrupted creation of skd's own)
must work and, for the re-run, change nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec
import pytest
import zarr

from cache_tools import open_cache
from cache_tools.datasets import open_dataset
from cache_tools.errors import IncompleteCacheError
from cache_tools.store import CREATION_ATTR
from cache_tools.testing import make_synthetic_cache, synthetic_schema
from pipeline.cli import main
from tests.catalogue.conftest import snapshot
from tests.cli import assert_one_line_error, run_cli
from tests.s3 import S3Server, moto_s3

BUILD = ["build", "--teacher", "psp_tiny", "--random-weights", "--loader-workers", "0", "--shard-size", "2"]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    return run_cli(main, [str(a) for a in argv], capsys)


# ------------------------------------------------------------------------------------------------
# foreign destinations of `skdcache build`


def _plain_dir(p: Path) -> None:
    (p / "photos").mkdir(parents=True)
    (p / "photos" / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (p / "notes.txt").write_text("my notes")


def _a_file(p: Path) -> None:
    p.write_text("a file the user owns")


def _zarr_group_with_files(p: Path) -> None:
    g = zarr.open_group(str(p), mode="w", attributes={"owner": "me"})
    g.create_array("images/id", shape=(4,), dtype="uint8")[...] = 7  # a subset of skd's own paths
    (p / "README.md").write_text("my experiment")


def _zarr_array(p: Path) -> None:
    zarr.create_array(str(p), shape=(3,), dtype="float32")[...] = 1.5


def _broken_zarr_json(p: Path) -> None:
    p.mkdir()
    (p / "zarr.json").write_text("{ not json")


def _unfinished_skd_store_with_user_files(p: Path) -> None:
    g = zarr.create_group(str(p), zarr_format=3, attributes={CREATION_ATTR: {"created": "2026-01-01"}})
    g.create_array("images/id", shape=(6, 16), dtype="uint8")
    (p / "mine.csv").write_text("a,b\n1,2\n")


def _other_configuration(p: Path) -> None:
    make_synthetic_cache(str(p), synthetic_schema(num_images=2, shard_images=1))


@pytest.mark.parametrize(
    "make, overwrite, fragments",
    [
        (_plain_dir, False, ["not an skd cache; refusing", "notes.txt", "even with --overwrite"]),
        (_plain_dir, True, ["not an skd cache; refusing", "even with --overwrite"]),
        (_a_file, False, ["is a file, not an skd cache", "even with --overwrite"]),
        (_a_file, True, ["is a file, not an skd cache"]),
        (_zarr_group_with_files, False, ["holds a zarr group that is not an skd cache", "pass --overwrite"]),
        (_zarr_array, False, ["holds a zarr array that is not an skd cache", "pass --overwrite"]),
        (_broken_zarr_json, False, ["zarr.json that is not valid zarr metadata", "pass --overwrite"]),
        (_unfinished_skd_store_with_user_files, False, ["skd did not write (e.g. mine.csv)", "pass --overwrite"]),
        (_other_configuration, False, ["different configuration", "pass --overwrite"]),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_build_never_touches_a_foreign_destination(sample_root, tmp_path, capsys, make, overwrite, fragments):
    out = tmp_path / "dest"
    make(out)
    before = snapshot(out)
    code, _, err = _run([*BUILD, "--data", sample_root, "--out", out, *(["--overwrite"] if overwrite else [])], capsys)
    assert_one_line_error(code, err, *fragments)
    assert snapshot(out) == before


def test_build_with_out_holding_the_dataset_is_refused_even_with_overwrite(sample_root, capsys):
    before = snapshot(sample_root)
    code, _, err = _run([*BUILD, "--data", sample_root, "--out", sample_root.parent, "--overwrite"], capsys)
    assert_one_line_error(code, err, "holds the dataset", "choose another --out")
    assert snapshot(sample_root) == before


def test_an_interrupted_creation_of_skds_own_is_created_again(sample_root, tmp_path, capsys):
    out = tmp_path / "c.zarr"
    g = zarr.create_group(str(out), zarr_format=3, attributes={CREATION_ATTR: {"created": "2026-01-01"}})
    g.create_array("images/id", shape=(6, 16), dtype="uint8")
    code, _, err = _run([*BUILD, "--data", sample_root, "--out", out], capsys)
    assert code == 0, err
    assert open_cache(str(out)).schema.status == "complete"


def test_rerun_on_a_complete_cache_is_a_no_op(sample_root, tmp_path, capsys):
    out = tmp_path / "c.zarr"
    assert _run([*BUILD, "--data", sample_root, "--out", out], capsys)[0] == 0
    before = snapshot(out)
    code, stdout, err = _run([*BUILD, "--data", sample_root, "--out", out, "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["entries_written"] == 0 and summary["teacher_seconds"] == 0
    assert snapshot(out) == before  # provenance (build.seconds, completed) and every chunk untouched


# ------------------------------------------------------------------------------------------------
# a teacher whose outputs are not finite


@pytest.mark.parametrize(
    "factory, what",
    [("nan_logits", "logits"), ("inf_logits", "logits"), ("nan_features", "features"), ("inf_features", "features")],
)
def test_a_non_finite_teacher_is_refused_and_nothing_is_marked_complete(sample_root, tmp_path, capsys, factory, what):
    out = tmp_path / "n.zarr"
    data_before = snapshot(sample_root)
    first = open_dataset(sample_root).ids[0]
    argv = [*BUILD, "--data", sample_root, "--out", out]
    argv[2] = f"tests.catalogue.bad_teachers:{factory}"
    code, _, err = _run(argv, capsys)
    assert_one_line_error(code, err, f"teacher's {what} for image {first} hold")
    assert_one_line_error(code, err, "NaN or infinite", "--no-amp", "--weights")
    assert "RuntimeWarning" not in err
    with pytest.raises(IncompleteCacheError):
        open_cache(str(out))
    assert snapshot(sample_root) == data_before


# ------------------------------------------------------------------------------------------------
# copy / subset / merge into their own sources


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("caches")
    a, b = root / "a.zarr", root / "b.zarr"
    ids_a = [f"train/a/a_{i:03d}" for i in range(3)]
    ids_b = [f"val/b/b_{i:03d}" for i in range(2)]
    make_synthetic_cache(str(a), synthetic_schema(ids=ids_a), ids=ids_a)
    make_synthetic_cache(str(b), synthetic_schema(ids=ids_b, splits=("val",)), ids=ids_b)
    return a, b


def _args(a: Path, b: Path) -> Iterator[tuple[str, list, str]]:
    yield "copy-into-own-source", ["copy", a, a / "inner.zarr"], "is inside the source"
    yield "copy-into-own-array-folder", ["copy", a, a / "logits" / "x.zarr"], "is inside the source"
    yield "copy-onto-a-parent", ["copy", a, a.parent], "is inside the destination"
    yield "copy-onto-itself", ["copy", a, f"{a}/"], "also a source"
    yield "subset-into-own-source", ["subset", a, a / "sub.zarr", "--split", "train"], "is inside the source"
    yield "merge-into-a-source", ["merge", b / "m.zarr", a, b], "is inside the source"
    yield "merge-onto-a-parent", ["merge", a.parent, a, b], "is inside the destination"


@pytest.mark.parametrize("case", [name for name, _, _ in _args(Path("a"), Path("b"))])
def test_transfers_refuse_destinations_overlapping_a_source(caches, capsys, case):
    a, b = caches
    argv, fragment = next((argv, f) for name, argv, f in _args(a, b) if name == case)
    before = snapshot(a.parent)
    code, _, err = _run(argv, capsys)
    assert_one_line_error(code, err, fragment)
    assert snapshot(a.parent) == before


def test_copy_into_its_own_source_url_is_refused(capsys):
    url = "memory://skd-catalogue/src.zarr"
    make_synthetic_cache(url)
    code, _, err = _run(["copy", url, f"{url}/inner.zarr"], capsys)
    assert_one_line_error(code, err, "is inside the source")
    assert not fsspec.filesystem("memory").exists("skd-catalogue/src.zarr/inner.zarr")


@pytest.mark.parametrize(
    "make, command, fragments",
    [
        (_zarr_group_with_files, "copy", ["zarr store that is not an skd cache", "pass --overwrite"]),
        (_plain_dir, "copy", ["not part of", "never deletes"]),
        (_zarr_group_with_files, "subset", ["holds a zarr group that is not an skd cache", "pass --overwrite"]),
        (_plain_dir, "subset", ["not an skd cache; refusing", "even with --overwrite"]),
    ],
    ids=["copy-zarr-group", "copy-plain-dir", "subset-zarr-group", "subset-plain-dir"],
)
def test_transfers_never_touch_a_foreign_destination(caches, tmp_path, capsys, make, command, fragments):
    a, _ = caches
    out = tmp_path / "dest"
    make(out)
    before = snapshot(out)
    extra = ["--split", "train"] if command == "subset" else []
    code, _, err = _run([command, a, out, *extra], capsys)
    assert_one_line_error(code, err, *fragments)
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------------------
# S3


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with moto_s3(buckets=("catalogue",)) as server:
        yield server


def _objects(s3: S3Server, bucket: str) -> dict[str, bytes]:
    c = s3.client()
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: c.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


@pytest.mark.s3
@pytest.mark.parametrize(
    "overwrite", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["plain", "with-overwrite"]
)
def test_build_never_deletes_a_foreign_s3_group_without_overwrite(sample_root, s3, capsys, overwrite):
    put: Callable = s3.client().put_object
    prefix = f"foreign-{overwrite}"
    put(Bucket="catalogue", Key=f"{prefix}/zarr.json", Body=b'{"zarr_format": 3, "node_type": "group"}')
    put(Bucket="catalogue", Key=f"{prefix}/notes.txt", Body=b"mine")
    before = _objects(s3, "catalogue")
    opts = ["-S", f"endpoint_url={s3.endpoint}", "-S", "key=testing", "-S", "secret=testing"]
    argv = [*BUILD, "--data", sample_root, "--out", f"s3://catalogue/{prefix}", *opts]
    code, _, err = _run([*argv, *(["--overwrite"] if overwrite else [])], capsys)
    if not overwrite:
        assert_one_line_error(code, err, "holds a zarr group that is not an skd cache", "pass --overwrite")
        assert _objects(s3, "catalogue") == before
    else:  # forced: the group (and what lay beside it) is replaced by the cache
        assert code == 0, err
        after = _objects(s3, "catalogue")
        assert f"{prefix}/notes.txt" not in after and f"{prefix}/images/id/zarr.json" in after
