"""diff: two teachers' targets on the same images."""

from __future__ import annotations

import json

import pytest

from cache_tools.diff import diff_caches
from cache_tools.errors import SchemaMismatchError
from cache_tools.testing import make_synthetic_cache, synthetic_schema
from pipeline.cli import main
from tests.cache_tools.conftest import write_label_cache


def test_a_cache_against_itself(label_caches):
    rep = diff_caches(label_caches["dense"], label_caches["dense"])
    assert rep.argmax_agreement == 1.0 and rep.kl_t1_mean == 0.0 and rep.kl_t1_max == 0.0
    assert rep.pair_cos_diff_max == 0.0 and rep.entries == rep.entries_total == 6
    assert all(v == 1.0 for v in rep.class_agreement.values())


def test_two_teachers(label_caches, sample_root, tmp_path):
    other = str(tmp_path / "noisy.zarr")
    write_label_cache(other, sample_root, mode="dense", noise=2.5, seed=9, teacher="noisy-teacher", features="int8")
    rep = diff_caches(label_caches["dense"], other)
    assert (rep.teacher_a, rep.teacher_b) == ("label-teacher", "noisy-teacher")
    assert 0.5 < rep.argmax_agreement < 1.0 and rep.kl_t1_mean > 1e-3 and rep.kl_t1_max > rep.kl_t1_mean
    assert rep.pair_cos_diff_mean is not None and 0 < rep.pair_cos_diff_mean <= rep.pair_cos_diff_max
    assert len(rep.worst) == 5 and rep.worst[0]["kl_t1_mean"] >= rep.worst[-1]["kl_t1_mean"]
    assert "road" in rep.class_agreement
    some = diff_caches(label_caches["dense"], other, max_entries=2)
    assert some.entries == 2 and some.entries_total == 6


def test_views_need_identical_views(label_caches, sample_root, tmp_path):
    same = str(tmp_path / "v.zarr")
    write_label_cache(same, sample_root, mode="views", per_image=3, crop=(48, 64), seed=4, features=None)
    rep = diff_caches(label_caches["views"], same)
    assert rep.mode == "views" and rep.pair_cos_diff_mean is None and rep.entries == 18
    with pytest.raises(SchemaMismatchError, match="dense cache with a views cache"):
        diff_caches(label_caches["dense"], label_caches["views"])
    crops = str(tmp_path / "crop.zarr")
    write_label_cache(crops, sample_root, mode="views", per_image=3, crop=(40, 64))
    with pytest.raises(SchemaMismatchError, match="grid"):
        diff_caches(label_caches["views"], crops)


def test_other_images_are_refused(tmp_path):
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    make_synthetic_cache(a, synthetic_schema(num_images=3))
    ids = ["train/town/town_000000", "train/town/town_000001", "train/x/other"]
    make_synthetic_cache(b, synthetic_schema(ids=ids), ids=ids)
    with pytest.raises(SchemaMismatchError, match="'train/town/town_000002' is only in A"):
        diff_caches(a, b)


def test_diff_cli(label_caches, capsys):
    main(["diff", label_caches["dense"], label_caches["dense"]])
    out = capsys.readouterr().out
    assert "argmax agreement 100.00%" in out and "agreement per class" in out
    main(["diff", label_caches["views"], label_caches["views"], "--json", "--max-entries", "3"])
    d = json.loads(capsys.readouterr().out)
    assert d["entries"] == 3 and d["argmax_agreement"] == 1.0
