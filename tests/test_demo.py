"""The README's main command: the shipped teacher is verified, the noise is computed from the runs,
and at smoke size every step runs and the table, summary.json and the chart are written."""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from cache_tools.errors import WeightsError
from pipeline.demo import PRESETS, _data_args, _noise, report_lines, t_quantile, teacher_asset


def test_t_quantile_is_students_t():
    normal = statistics.NormalDist().inv_cdf(0.975)
    values = [t_quantile(0.975, df) for df in (1, 2, 3, 5, 30, 2000)]
    assert values == sorted(values, reverse=True)  # heavier tails with fewer degrees of freedom
    assert math.isclose(values[-1], normal, rel_tol=1e-3)
    assert math.isclose(t_quantile(0.75, 1), 1.0, rel_tol=1e-5)  # Cauchy: tan(pi/4)
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9):
        assert math.isclose(t_quantile(0.975, df), stats.t.ppf(0.975, df), rel_tol=1e-5)


def _asset(tmp_path: Path, **overrides) -> tuple[Path, object]:
    import torch
    from safetensors.torch import save_file

    preset = replace(PRESETS["full"], teacher_asset="t")
    save_file({"w": torch.arange(6, dtype=torch.float16)}, str(tmp_path / "t.safetensors"))
    prov = {
        "sha256": hashlib.sha256((tmp_path / "t.safetensors").read_bytes()).hexdigest(),
        "architecture": preset.teacher,
        "data": _data_args(preset),
        "train_command": "skdstudent train ...",
    } | overrides
    (tmp_path / "t.json").write_text(json.dumps(prov))
    return tmp_path, preset


def test_teacher_asset_is_verified_before_use(tmp_path):
    assets, preset = _asset(tmp_path)
    weights, prov = teacher_asset(preset, assets)
    assert weights == assets / "t.safetensors" and prov["architecture"] == preset.teacher
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1  # one flipped bit in the last weight
    weights.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match=r"sha256 .* damaged or not the one trained"):
        teacher_asset(preset, assets)
    weights.unlink()
    with pytest.raises(WeightsError, match="missing; reinstall skd, or recreate them"):
        teacher_asset(preset, assets)


@pytest.mark.parametrize("overrides", [{"architecture": "psp18_mini"}, {"data": {"num_images": 8}}])
def test_teacher_asset_for_other_model_or_data_is_refused(tmp_path, overrides):
    assets, preset = _asset(tmp_path, **overrides)
    with pytest.raises(WeightsError, match=r"was trained as .* the demo needs"):
        teacher_asset(preset, assets)


def test_shipped_teacher_matches_its_provenance_and_loads_without_pickle():
    from pipeline.registry import create_model
    from pipeline.weights import load_weights

    preset = PRESETS["full"]
    weights, prov = teacher_asset(preset)
    assert weights.stat().st_size == prov["bytes"] < 5_000_000
    assert prov["train_command"] in prov["commands"] and "--seed" in prov["train_command"]
    model = create_model(preset.teacher, num_classes=prov["num_classes"])
    report = load_weights(model, weights)  # strict: every key fits
    assert report.converted_from == "safetensors" and not report.missing


def _row(name, source, seeds, mious):
    return {"name": name, "source": source, "seeds": seeds, "miou_per_seed": mious}


def test_noise_is_paired_by_seed():
    rows = [
        _row("no KD", "none", [0, 1, 2], [0.30, 0.28, 0.33]),
        _row("KD from the cache", "cache", [0, 1, 2], [0.34, 0.31, 0.36]),
        _row("KD online", "online", [0], [0.35]),
    ]
    noise = _noise(rows)
    assert noise["none_std"] == statistics.stdev([0.30, 0.28, 0.33])
    cache, online, cache_vs_online = noise["differences"]
    per_seed = [a - b for a, b in zip(rows[1]["miou_per_seed"], rows[0]["miou_per_seed"], strict=True)]
    assert cache["per_seed"] == per_seed and cache["mean"] == statistics.mean(per_seed)
    half = t_quantile(0.975, 2) * statistics.stdev(per_seed) / math.sqrt(3)
    assert cache["ci95"] == pytest.approx([cache["mean"] - half, cache["mean"] + half])
    assert cache["beyond_noise"] == (cache["ci95"][0] > 0)
    assert online["seeds"] == [0] and online["ci95"] is None and online["mean"] == 0.35 - 0.30
    assert cache_vs_online["vs"] == "KD online" and cache_vs_online["seeds"] == [0]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_demo_smoke(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "demo", "--out", str(out), "--preset", "smoke"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    preset = PRESETS["smoke"]
    rows = summary["rows"]
    assert [(r["name"], r["source"]) for r in rows] == [
        ("no KD", "none"),
        ("KD from the cache", "cache"),
        ("KD online", "online"),
    ]
    assert [r["losses"] for r in rows] == ["none", "pixel,pair,holistic", "pixel,pair,holistic"]
    assert [r["seeds"] for r in rows] == [list(preset.seeds), list(preset.seeds), list(preset.online_seeds)]
    for r in rows:  # every number comes from a run's own eval.json
        evals = [json.loads((Path(d) / "eval.json").read_text())["miou"] for d in r["run_dirs"]]
        assert r["miou_per_seed"] == evals and r["mean"] == statistics.mean(evals)
    assert summary["noise"] == json.loads(json.dumps(_noise(rows)))
    assert summary["teacher"]["source"] == "trained here" and 0 <= summary["teacher"]["miou"] <= 1
    assert any("--cache" in c for c in summary["commands"]) and any("--teacher" in c for c in summary["commands"])
    printed = " ".join((proc.stdout + proc.stderr).split())  # the console may wrap long lines
    for line in report_lines(summary):  # the printed table is the summary's
        assert " ".join(line.split()) in printed
    assert (out / "summary.png").stat().st_size > 10_000
    # the demo refuses to write into a non-empty directory
    again = subprocess.run(
        [sys.executable, "-m", "pipeline", "demo", "--out", str(out)], capture_output=True, text=True
    )
    assert again.returncode == 1 and "is not empty" in again.stderr and again.stderr.count("\n") <= 2
