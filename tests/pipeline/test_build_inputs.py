"""Image checks of ``skdcache build``: refused before the store exists, skipped with --skip-unreadable,
and a bad image found by a loader worker stops the build in one line (no worker traceback)."""

from __future__ import annotations

import shutil

import numpy as np
from PIL import Image

from cache_tools import open_cache
from pipeline.cli import main
from tests.cli import assert_one_line_error, run_cli


def _copy(sample_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(sample_root, root)
    images = sorted((root / "leftImg8bit" / "train").rglob("*.png"))
    return root, images


def _build(root, out, capsys, *extra):
    argv = ["build", "--teacher", "psp_tiny", "--random-weights", "--data", str(root), "--out", str(out)]
    return run_cli(main, [*argv, "--no-features", *extra], capsys)


def test_a_16_bit_image_is_refused_before_the_store_is_created(sample_root, tmp_path, capsys):
    root, images = _copy(sample_root, tmp_path)
    h, w = np.asarray(Image.open(images[3])).shape[:2]
    Image.fromarray(np.full((h, w), 40000, dtype=np.uint16)).save(images[3])  # mode I;16
    out = tmp_path / "c.zarr"
    code, _, err = _build(root, out, capsys, "--loader-workers", "0")
    assert_one_line_error(code, err, images[3].name, "16-bit", "convert it to 8-bit")
    assert not out.exists()


def test_a_corrupt_image_in_a_worker_is_one_line_and_skip_unreadable_skips_it(sample_root, tmp_path, capsys):
    root, images = _copy(sample_root, tmp_path)
    data = images[2].read_bytes()
    images[2].write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not
    out = tmp_path / "c.zarr"
    code, _, err = _build(root, out, capsys, "--loader-workers", "2")
    assert_one_line_error(code, err, images[2].name)
    assert "DataLoader worker" not in err
    code, _, err = _build(root, tmp_path / "d.zarr", capsys, "--loader-workers", "0", "--skip-unreadable")
    assert code == 0, err
    assert images[2].name in err and open_cache(str(tmp_path / "d.zarr")).schema.num_images == len(images) - 1
