"""benchmarks/dense_agreement.py on a tiny teacher: exact where the geometry is exact, finite elsewhere,
and its dense replay is what SegTrainData reads from a real dense store."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_tools.datasets import open_dataset, write_sample_dataset
from pipeline.teachers import create_teacher
from pipeline.views import resized_size

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    import importlib
    import sys

    sys.path.insert(0, str(BENCH))  # benchmarks import their siblings as `common`
    try:
        yield importlib.import_module("dense_agreement")
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("dense_agreement")
    write_sample_dataset(root, num_train=2, num_val=1, size=(64, 128), seed=5)
    return str(root)


@pytest.fixture(scope="module")
def setup(data):
    ds = open_dataset(data, splits=("train",))
    images = [torch.from_numpy(np.ascontiguousarray(ds.load(i)[0])).permute(2, 0, 1) for i in range(len(ds))]
    return create_teacher("psp_tiny", random_weights=True).model, images


def _exact(bench):
    """Lossless codecs and 1x1 cells: replay differs from the online teacher only by its geometry."""
    return bench.Store(logits_codec="fp32", features_codec="fp32", block=(1, 1))


def test_whole_image_at_scale_one_replays_the_online_teacher(bench, setup):
    model, images = setup
    res = bench.measure(model, images, (64, 128), crop_scales=(1.0,), multi=(1.0,), flip=False, store=_exact(bench))
    for option in bench.OPTIONS:
        row = res["per_scale"]["1.0"][option]
        assert row["agreement_pct"] == 100.0 and row["nodes"] == 2 * 9 * 17
        assert row["kl_t1_mean"] < 1e-9 and row["pair_cos_err_max"] < 1e-5
    # with the store's default lossy codecs: still the same argmax, a tiny KL
    lossy = bench.measure(model, images, (64, 128), crop_scales=(1.0,), multi=(1.0,), flip=False)
    row = lossy["per_scale"]["1.0"]["dense@1.0"]
    assert row["agreement_pct"] == 100.0 and 0 < row["kl_t1_mean"] < 1e-3


def test_nearest_of_s_holding_the_crop_scale_is_the_online_teacher(bench, setup):
    model, images = setup
    crop = resized_size(64, 128, 1.5)  # the whole resized image
    res = bench.measure(model, images, crop, crop_scales=(1.5,), multi=(1.0, 1.5), flip=False, store=_exact(bench))
    row = res["per_scale"]["1.5"]
    assert row["nearest"]["agreement_pct"] == 100.0 and row["nearest"]["kl_t1_mean"] < 1e-9
    assert row["nearest"]["pair_cos_err_max"] < 1e-5
    assert row["interp"] == row["nearest"]  # 1.5 is stored: the blend has weight 0 on the other map
    assert row["dense+flip"] == row["dense@1.0"]  # no mirrored view: the mirrored map is never read
    assert row["dense@1.0"]["kl_t1_mean"] > 1e-4  # resampling the scale-1 map is not exact
    cost = res["cost"]
    assert cost["dense@1.0"]["storage_x"] == 1.0 and cost["nearest"]["storage_x"] > 2.0
    assert cost["nearest"]["teacher_pixels_x"] == pytest.approx(1 + (96 * 192) / (64 * 128))


def test_random_crops_give_finite_metrics_and_the_costs_of_s(bench, setup):
    model, images = setup
    res = bench.measure(model, images, (48, 48), crop_scales=(0.7, 1.3, 2.1), crops_per_scale=2, seed=1)
    assert set(res["per_scale"]) == {"0.7", "1.3", "2.1"}
    for row in [*res["per_scale"].values(), res["all"]]:
        for option in bench.OPTIONS:
            m = row[option]
            assert all(math.isfinite(m[k]) for k in ("agreement_pct", "kl_t1_mean", "pair_cos_err_max"))
            assert 0 <= m["agreement_pct"] <= 100 and m["kl_t1_mean"] >= 0 and m["nodes"] > 0
    assert res["all"]["nearest"]["crops"] == 2 * 3 * 2
    assert res["cost"]["dense+flip"]["storage_x"] == 2.0 == res["cost"]["dense+flip"]["teacher_pixels_x"]
    pixels = sum(resized_size(64, 128, s)[0] * resized_size(64, 128, s)[1] for s in bench.DEFAULT_S)
    assert res["cost"]["interp"]["teacher_pixels_x"] == pytest.approx(pixels / (64 * 128))
    assert bench.nearest(bench.DEFAULT_S, 1.25) == 1.5 and bench.nearest(bench.DEFAULT_S, 0.7) == 0.75
    assert bench.bracket(bench.DEFAULT_S, 1.2) == pytest.approx((1.0, 1.5, 0.4))
    assert res["S_off_lattice"] == [] and bench.off_lattice((128, 256), (0.75, 0.85, 2.0, 2.1)) == [0.85, 2.1]


@pytest.mark.parametrize("dense_flip", [False, True])
def test_replay_is_what_training_reads_from_a_built_dense_store(bench, data, tmp_path, dense_flip):
    got = bench.cross_check(data, "psp_tiny", None, (48, 48), tmp_path, draws=6, dense_flip=dense_flip)
    assert got["draws"] == 6 and 0 < got["mirrored"] < 6  # both kinds of view were compared
    assert got["logits_max_abs_diff"] == 0.0 and got["nodes_max_abs_diff"] == 0.0


def test_fitted_head_stand_in_is_a_fitted_classifier_on_the_teachers_own_features(bench, data):
    ds = open_dataset(data, splits=("train",))
    loaded = [ds.load(i) for i in range(len(ds))]
    images = [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1) for im, _, _ in loaded]
    labels = [torch.from_numpy(np.ascontiguousarray(lab)) for _, lab, _ in loaded]
    model, accuracy = bench.fitted_head("psp_tiny", images, labels, (48, 48), crops_per_image=3, steps=20)
    assert not model.training
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(int(m.num_batches_tracked) == 1 and torch.isfinite(m.running_var).all() for m in bns)
    # the folded standardisation: the model's own logits give the accuracy the fit reports
    rng = np.random.default_rng(1)  # the same crops fitted_head draws
    right = total = 0
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        for _ in range(3):
            x, y = bench.apply_view(image, label, bench.sample_view(rng, i, tuple(image.shape[-2:]), (48, 48)))
            logits, _ = bench.run_teacher(model, x[None], torch.device("cpu"))
            y = torch.nn.functional.interpolate(y[None, None].float(), size=logits.shape[-2:], mode="nearest")[0, 0]
            keep = y != 255
            right += int(logits[0].argmax(0)[keep].eq(y[keep].long()).sum())
            total += int(keep.sum())
    assert accuracy == pytest.approx(100.0 * right / total, abs=0.5)
    assert accuracy > 100.0 / 19


def test_bad_teacher_choices_are_one_line_before_anything_is_written(bench, tmp_path):
    with pytest.raises(SystemExit, match="needs --weights"):
        bench.main(["--preset", "psp101"])
    with pytest.raises(SystemExit, match="--fit-images 2 or more"):
        bench.main(["--weights", "fitted-head", "--fit-images", "1", "--data", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()
