"""kd, cwd, dist and ifvd train from a dense cache, a views cache and the online teacher; a cache that cannot serve one is refused."""

from __future__ import annotations

import json

import pytest
import torch

from cache_tools.errors import ConfigError
from pipeline.build import BuildConfig, build_cache
from pipeline.registry import create_model
from pipeline.weights import save_weights
from student.cli import main as skdstudent
from student.losses import TargetNeed
from student.train import ALL_LOSSES, METHOD_NAMES, NEEDS, TrainConfig, train
from tests.cli import assert_one_line_error, run_cli
from tests.student.helpers import tiny_config


@pytest.fixture(scope="module")
def stores(sample_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("method-caches")
    common = dict(teacher="psp_tiny", random_weights=True, data=str(sample_root), loader_workers=0, shard_images=3)
    build_cache(BuildConfig(out=str(root / "dense.zarr"), dense_flip=True, features_block=(1, 1), **common))
    build_cache(
        BuildConfig(out=str(root / "views.zarr"), mode="views", views=2, crop=(64, 64), features_block=(1, 1), **common)
    )
    build_cache(BuildConfig(out=str(root / "cells.zarr"), **common))  # the default pooled cells
    build_cache(BuildConfig(out=str(root / "nofeat.zarr"), features=False, **common))
    teacher = root / "teacher.safetensors"
    save_weights(create_model("psp_tiny", num_classes=19), teacher, {"model_name": "psp_tiny", "num_classes": 19})
    return root


def _cfg(sample_root, out, **kw) -> TrainConfig:
    return tiny_config(sample_root, out, **kw)


def _source(stores, name: str) -> dict:
    if name == "online":
        return {"teacher": "psp_tiny", "weights": str(stores / "teacher.safetensors")}
    return {"cache": str(stores / f"{name}.zarr")}


@pytest.mark.parametrize("source", ["dense", "views", "online"])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_each_method_trains_from_every_source(sample_root, stores, tmp_path, source, method):
    result = train(_cfg(sample_root, tmp_path / "run", losses=(method,), **_source(stores, source)))
    assert result.steps == 2
    assert set(result.last) >= {"task", method} and not {"pixel", "pair", "adv"} & set(result.last)
    assert torch.isfinite(torch.tensor([result.last["task"], result.last[method]])).all()
    assert result.last[method] > 0  # a random student differs from the teacher
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and all(method in x for x in lines)


def test_every_loss_together_from_a_dense_cache(sample_root, stores, tmp_path):
    result = train(_cfg(sample_root, tmp_path / "run", losses=ALL_LOSSES, cache=str(stores / "dense.zarr")))
    for key in (*ALL_LOSSES[:2], "adv", "critic", *METHOD_NAMES):
        assert torch.isfinite(torch.tensor(result.last[key])), key


def test_the_weights_scale_their_terms(sample_root, stores, tmp_path):
    """Same seed and data: the first step's term is exactly proportional to its --lambda-*."""
    src = _source(stores, "dense")
    first = {}
    for lam in (1.0, 2.5):
        cfg = _cfg(sample_root, tmp_path / f"run{lam}", losses=("dist",), iters=1, lambda_dist=lam, **src)
        first[lam] = train(cfg).last["dist"]
    assert first[2.5] == pytest.approx(2.5 * first[1.0], rel=1e-5)


def test_what_each_loss_needs_is_declared():
    assert {NEEDS[m] for m in ("pixel", "holistic", "kd", "cwd", "dist")} == {TargetNeed.LOGITS}
    assert NEEDS["pair"] is TargetNeed.NODES and NEEDS["ifvd"] is TargetNeed.FULL_FEATURE


def _argv(sample_root, out, *extra):
    return [
        "train", "--data", str(sample_root), "--out", str(out), "--student", "psp_tiny", "--iters", "1",
        "--batch-size", "2", "--crop", "64x64", "--workers", "0", "--eval-split", "none", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("store", "losses", "fragments"),
    [
        (
            "cells",
            "ifvd",
            ["--losses ifvd needs the teacher's full feature map", "8x8 max cells", "--features-block 1x1"],
        ),
        ("nofeat", "kd,ifvd", ["--losses ifvd", "no features", "--no-features", "--features-block 1x1"]),
        ("nofeat", "pair", ["--losses pair needs teacher features (feature cells)", "built with --no-features"]),
    ],
)
def test_a_loss_the_cache_cannot_serve_is_refused_in_one_line(
    sample_root, stores, tmp_path, capsys, store, losses, fragments
):
    argv = _argv(sample_root, tmp_path / "run", "--cache", str(stores / f"{store}.zarr"), "--losses", losses)
    code, _, err = run_cli(skdstudent, argv, capsys)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "run" / "config.json").exists()


def test_logit_methods_are_served_by_any_cache(sample_root, stores, tmp_path, capsys):
    argv = _argv(sample_root, tmp_path / "run", "--cache", str(stores / "nofeat.zarr"), "--losses", "kd,cwd,dist")
    argv += ["--kd-temperature", "2", "--cwd-temperature", "1", "--dist-beta", "2", "--dist-gamma", "0.5", "--json"]
    code, out, err = run_cli(skdstudent, argv, capsys)
    assert code == 0, err
    assert json.loads(out)["steps"] == 1


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--losses", "kd,fitnet"], "unknown loss 'fitnet'"),
        (["--kd-temperature", "0"], "--kd-temperature"),
        (["--lambda-ifvd", "-1"], "--lambda-ifvd"),
        (["--labelled-share", "1.5"], "--labelled-share"),
    ],
)
def test_bad_method_flags_are_one_line(sample_root, tmp_path, capsys, extra, fragment):
    code, _, err = run_cli(skdstudent, _argv(sample_root, tmp_path / "run", "--losses", "none", *extra), capsys)
    assert_one_line_error(code, err, fragment)


def test_a_method_without_teacher_targets_is_refused(sample_root, tmp_path):
    with pytest.raises(ConfigError, match="--losses cwd needs teacher targets"):
        _cfg(sample_root, tmp_path / "run", losses=("cwd",))
