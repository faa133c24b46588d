"""preview: a PNG of entries, with and without the images; geometry helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cache_tools import open_cache
from cache_tools.datasets import CITYSCAPES_PALETTE
from cache_tools.errors import CacheError, SchemaMismatchError
from cache_tools.preview import _bilinear, _view_pixels, class_palette, render_preview, select_entries
from cache_tools.schema import View
from cache_tools.testing import make_synthetic_cache, synthetic_schema
from pipeline.cli import main


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_dense_with_images(label_caches, sample_root, tmp_path):
    out = tmp_path / "p.png"
    rep = render_preview(label_caches["dense"], out, indices=[2], dataset_root=sample_root)
    assert rep.with_images and rep.entries == [2] and not rep.warnings
    img = _png(out)
    assert img.shape[1] > 1000 and img.shape[0] > 300  # four panels side by side


def test_maps_alone_use_the_cityscapes_palette(label_caches, tmp_path):
    out = tmp_path / "p.png"
    render_preview(label_caches["dense"], out, indices=[0])
    img = _png(out).astype(int)
    for c in (0, 2, 10):  # road, building, sky: drawn in their exact colours
        assert np.all(img == CITYSCAPES_PALETTE[c], axis=-1).sum() > 500


def test_views_sheet_and_ids(label_caches, sample_root, tmp_path):
    r = open_cache(label_caches["views"])
    image_id = r.image_ids[1]
    rep = render_preview(label_caches["views"], tmp_path / "v.png", ids=[image_id], dataset_root=sample_root)
    assert rep.entries == [3, 4, 5] and rep.image_ids == [image_id] * 3
    rep = render_preview(label_caches["views"], tmp_path / "s.png", sheet=4)
    assert len(rep.entries) == 4 and not rep.with_images
    assert _png(tmp_path / "s.png").shape[0] > _png(tmp_path / "v.png").shape[0]


def test_a_changed_image_is_flagged(label_caches, sample_root, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sample_root, data)
    first = sorted((data / "leftImg8bit" / "train").rglob("*.png"))[0]
    arr = np.array(Image.open(first))
    arr[:4] = 0
    Image.fromarray(arr).save(first)
    rep = render_preview(label_caches["dense"], tmp_path / "p.png", indices=[0], dataset_root=data)
    assert rep.warnings and "differs from the one the cache was built from" in rep.warnings[0]


def test_a_cache_without_features_and_another_palette(tmp_path):
    url = str(tmp_path / "c.zarr")
    make_synthetic_cache(url, synthetic_schema(num_images=3, features_codec=None))
    rep = render_preview(url, tmp_path / "p.png", sheet=3)
    assert rep.entries == [0, 1, 2]
    pal = class_palette(open_cache(url).schema)
    assert pal.shape == (5, 3) and len({tuple(c) for c in pal}) == 5


def test_selection_errors(label_caches, tmp_path):
    r = open_cache(label_caches["dense"])
    assert select_entries(r) == [0]
    assert select_entries(r, indices=[-1, 5]) == [5]
    with pytest.raises(CacheError, match="out of range"):
        select_entries(r, indices=[6])
    with pytest.raises(SchemaMismatchError, match="not in the cache"):
        select_entries(r, ids=["train/nowhere/x"])
    with pytest.raises(CacheError, match="at most 16"):
        select_entries(open_cache(label_caches["views"]), sheet=17)
    with pytest.raises(CacheError, match="does not exist"):
        render_preview(label_caches["dense"], tmp_path / "no" / "p.png")


def test_bilinear_is_align_corners():
    m = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    up = _bilinear(m, 3, 5)
    np.testing.assert_allclose(up[0, 0], [0, 0.5, 1, 1.5, 2])
    np.testing.assert_allclose(up[0, :, 0], [0, 1.5, 3])
    assert up[0, -1, -1] == 5


def test_view_pixels_crop_pad_flip():
    img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    v = View(0, 1.0, (4, 6), (2, 3, 3, 4), True)
    crop = _view_pixels(img, v)
    assert crop.shape == (3, 4, 3) and np.isnan(crop[2]).all() and np.isnan(crop[:, 0]).all()
    np.testing.assert_array_equal(crop[:2, 1:], img[2:4, 3:6][:, ::-1])


def test_preview_cli(label_caches, sample_root, tmp_path, capsys):
    main(["preview", label_caches["views"], "-o", str(tmp_path / "a.png"), "--index", "0", "--index", "4"])
    assert "2 entries (maps only; pass --dataset" in capsys.readouterr().out
    main(
        [
            "preview",
            label_caches["dense"],
            "-o",
            str(tmp_path / "b.png"),
            "--sheet",
            "2",
            "--dataset",
            str(sample_root),
            "--json",
        ]
    )
    d = json.loads(capsys.readouterr().out)
    assert d["with_images"] and len(d["entries"]) == 2
    with pytest.raises(SystemExit) as ex:
        main(["preview", label_caches["dense"], "-o", str(tmp_path / "c.png"), "--id", "train/../../etc/passwd"])
    assert ex.value.code == 1 and "not in the cache" in capsys.readouterr().err
