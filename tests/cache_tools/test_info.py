"""info: what a cache holds, for people and for scripts; one-line errors for bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from cache_tools.inspect import describe_cache
from cache_tools.testing import make_synthetic_cache, synthetic_schema
from pipeline.cli import main


def test_describe_a_views_cache(label_caches):
    d = describe_cache(label_caches["views"])
    assert d["format"] == "skd-cache" and d["format_version"] == 1 and d["status"] == "complete"
    assert d["mode"] == "views" and d["entries_per_image"] == 3 and d["views"]["crop"] == [48, 64]
    assert d["teacher"]["name"] == "label-teacher" and d["teacher"]["normalization"]["order"] == "RGB"
    assert d["dataset"]["name"] == "cityscapes" and d["images"] == 6 and d["classes"] == 19
    assert d["dataset"]["splits"] == ["train"] and d["dataset"]["class_names"][0] == "road"
    arrays = {a["path"]: a for a in d["arrays"]}
    q = arrays["logits/dq"]
    assert q["dtype"] == "uint8" and q["shape"] == [18, 19, 7, 9] and q["shards"] == [6, 19, 7, 9]
    assert q["codecs"] == ["sharding_indexed", "bytes", "zstd(level=1)"] and q["bytes"] > 0
    assert d["bytes_per_image"] == pytest.approx(3 * d["bytes_per_entry"])
    assert d["bytes_per_entry"] == pytest.approx(d["bytes_logits_per_entry"] + d["bytes_features_per_entry"])
    assert d["fidelity"]["sampled_entries"] == 18 and d["tool_version"] and d["created"] and d["completed"]


def test_info_text_and_json(label_caches, capsys):
    main(["info", label_caches["dense"]])
    out = capsys.readouterr().out
    for text in (
        "format v1",
        "mode dense",
        "teacher label-teacher",
        "dataset cityscapes",
        "19 classes (road, sidewalk",
        "logits: codec gap-u8",
        "logits/dq",
        "per image",
        "fidelity on 6 entries",
        "built by skd",
    ):
        assert text in out, text
    main(["info", label_caches["dense"], "--json"])
    d = json.loads(capsys.readouterr().out)
    assert d["mode"] == "dense" and d["bytes_total"] > d["bytes_targets"] > 0


def test_info_of_an_unfinished_build(tmp_path, capsys):
    url = str(tmp_path / "c.zarr")
    make_synthetic_cache(url, synthetic_schema(num_images=4, shard_images=2), shards=[1], finalize=False)
    d = describe_cache(url)
    assert d["status"] == "building" and d["entries_done"] == 2 and d["completed"] is None
    main(["info", url])
    assert "(2 written)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "nothing exists there"),
        (lambda p: (p.mkdir(), (p / "x.txt").write_text("hello")), "is not an skd cache"),
        (lambda p: __import__("zarr").open_group(str(p), mode="w"), "not an skd cache"),
    ],
    ids=["missing", "a-folder", "a-plain-zarr-group"],
)
def test_bad_input_is_one_line(tmp_path, capsys, make, message):
    target = tmp_path / "target"
    make(target)
    for cmd in ("info", "verify", "preview"):
        argv = [cmd, str(target)] + (["-o", str(tmp_path / "x.png")] if cmd == "preview" else [])
        with pytest.raises(SystemExit) as ex:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert ex.value.code == 1 and len(err.splitlines()) == 1 and message in err, (cmd, err)


def test_a_truncated_chunk_is_one_line(tmp_path, capsys):
    url = tmp_path / "c.zarr"
    make_synthetic_cache(str(url))
    table = url / "images" / "id" / "c" / "0" / "0"
    table.write_bytes(table.read_bytes()[:5])
    with pytest.raises(SystemExit) as ex:
        main(["info", str(url)])
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 1 and len(err.splitlines()) == 1 and "images/id" in err


def test_info_on_a_copy_without_consolidated_metadata(tmp_path):
    url = tmp_path / "c.zarr"
    make_synthetic_cache(str(url))
    doc = json.loads((url / "zarr.json").read_text())
    doc.pop("consolidated_metadata", None)
    (url / "zarr.json").write_text(json.dumps(doc))
    assert describe_cache(str(url))["entries"] == 6
    shutil.rmtree(url)
