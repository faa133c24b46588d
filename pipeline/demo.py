"""``skdcache demo``: one teacher pass serving several students, end to end, on the sample dataset.

Every step is the public CLI, run in a subprocess exactly as a user would type it (the commands are
printed), and every number in the final table comes from those runs' JSON output:

1. ``skdcache sample-data``  — procedural street scenes in the Cityscapes layout;
2. ``skdstudent train --losses none`` — a small teacher (task loss only);
3. ``skdcache build`` — the teacher runs once; its targets go to a Zarr cache;
4. ``skdstudent train --cache`` — students: no KD, +pixel, +pixel+pair, +pixel+pair+holistic;
5. a table (mIoU, train time, cache bytes per image) and ``summary.png`` (the same, plus curves).

The students use the official pair-wise and holistic weights and a per-pixel pixel-wise weight of 1
(``--pixel-mode kl --lambda-pi 1``). The official pixel-wise term (soft CE summed over the batch,
lambda 10: 80 per pixel at batch 8) is tuned for 40k iterations from ImageNet weights; on a student
trained from scratch for a few minutes it overwhelms the task loss (docs/benchmarks.md measures it).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cache_tools.errors import ConfigError, SkdError

__all__ = ["DemoPreset", "PRESETS", "run_demo"]


@dataclass(frozen=True)
class DemoPreset:
    train_images: int
    val_images: int
    size: str
    crop: str
    teacher: str
    teacher_iters: int
    student: str
    student_iters: int
    batch_size: int
    lr: float
    seed: int = 0


PRESETS = {
    # ~10 minutes on 2 CPU cores
    "full": DemoPreset(160, 40, "128x256", "128x128", "psp34_mini", 600, "psp18_mini", 300, 8, 0.02),
    # a minute: exercises every step (used by the tests)
    "smoke": DemoPreset(8, 4, "64x128", "64x64", "psp_tiny", 4, "psp_tiny", 3, 2, 0.01),
}

STUDENTS = (
    ("no KD", "none"),
    ("+pixel", "pixel"),
    ("+pixel+pair", "pixel,pair"),
    ("+pixel+pair+holistic", "pixel,pair,holistic"),
)
#: pixel-wise weight per pixel (see the module docstring)
KD_FLAGS = ("--pixel-mode", "kl", "--lambda-pi", "1")


def _run(step: str, args: list[str], log) -> dict:
    log(f"\n[bold cyan]{step}[/]\n  $ {' '.join(shlex.quote(a) for a in args)}")
    cmd = [sys.executable, "-m", args[0].replace("skdcache", "pipeline").replace("skdstudent", "student"), *args[1:]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SkdError(f"demo step failed ({step}): `{' '.join(args)}` exited with {proc.returncode}")
    try:
        out = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        out = {}
    out["_wall"] = time.perf_counter() - t0
    return out


def _curve(run_dir: Path) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "task" in rec:
                steps.append(rec["step"])
                losses.append(rec["task"])
    return steps, losses


def _chart(path: Path, rows: list[dict], curves: dict[str, tuple[list[int], list[float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = [r["run"] for r in rows]
    miou = [100 * r["miou"] for r in rows]
    colors = ["#444444"] + ["#1f77b4"] * (len(rows) - 1)
    ax = axes[0]
    bars = ax.bar(range(len(rows)), miou, color=colors)
    for b, v in zip(bars, miou, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.3, f"{v:.1f}", ha="center", fontsize=9)
    ax.set_xticks(range(len(rows)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("val mIoU (%)")
    ax.set_title("accuracy")
    ax.set_ylim(0, max(miou) * 1.15)
    ax = axes[1]
    secs = [r["train_seconds"] for r in rows]
    ax.bar(range(len(rows)), secs, color=colors)
    ax.set_xticks(range(len(rows)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("training wall time (s)")
    ax.set_title("cost (the cache build is counted once, in the teacher row)")
    ax = axes[2]
    for name, (steps, losses) in curves.items():
        if steps:
            ax.plot(steps, losses, label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("task loss (CE + 0.4 aux)")
    ax.set_title("training curves")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out: str | Path, preset: str = "full", log=print) -> dict:
    """Run the whole demo into ``out``; returns the table rows and paths."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown demo preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; the demo writes a fresh directory (choose another --out)")
    out.mkdir(parents=True, exist_ok=True)
    data, cache, teacher_dir = out / "data", out / "cache.zarr", out / "teacher"
    common = ["--batch-size", str(p.batch_size), "--crop", p.crop, "--lr", str(p.lr), "--seed", str(p.seed), "--json"]
    t_start = time.perf_counter()

    _run(
        "1/5 sample dataset",
        [
            "skdcache",
            "sample-data",
            str(data),
            "--num-images",
            str(p.train_images),
            "--num-val",
            str(p.val_images),
            "--size",
            p.size,
            "--seed",
            str(p.seed),
        ],
        log,
    )
    teacher = _run(
        f"2/5 teacher {p.teacher} (task loss only)",
        [
            "skdstudent",
            "train",
            "--data",
            str(data),
            "--out",
            str(teacher_dir),
            "--student",
            p.teacher,
            "--losses",
            "none",
            "--iters",
            str(p.teacher_iters),
            *common,
        ],
        log,
    )
    build = _run(
        "3/5 one teacher pass -> cache",
        [
            "skdcache",
            "build",
            "--teacher",
            p.teacher,
            "--weights",
            str(teacher_dir / "model.safetensors"),
            "--data",
            str(data),
            "--out",
            str(cache),
            "--json",
        ],
        log,
    )
    info = _run("   cache summary", ["skdcache", "info", str(cache), "--json"], log)
    rows = [
        {
            "run": f"teacher {p.teacher}",
            "losses": "task only",
            "miou": teacher["miou"],
            "train_seconds": teacher["seconds"] + build["seconds"],
            "cache_bytes_per_image": None,
        }
    ]
    curves = {f"teacher {p.teacher}": _curve(teacher_dir)}
    for i, (name, losses) in enumerate(STUDENTS):
        run_dir = out / "students" / name.strip("+").replace("+", "_").replace(" ", "_")
        args = [
            "skdstudent",
            "train",
            "--data",
            str(data),
            "--out",
            str(run_dir),
            "--student",
            p.student,
            "--losses",
            losses,
            "--iters",
            str(p.student_iters),
            *common,
        ]
        if losses != "none":
            args[4:4] = ["--cache", str(cache)]
            args += KD_FLAGS
        result = _run(f"4/5 student {i + 1}/{len(STUDENTS)}: {p.student} {name}", args, log)
        rows.append(
            {
                "run": f"{p.student} {name}",
                "losses": losses,
                "miou": result["miou"],
                "train_seconds": result["seconds"],
                "cache_bytes_per_image": info["bytes_per_image"] if losses != "none" else None,
            }
        )
        curves[f"{p.student} {name}"] = _curve(run_dir)
    chart = out / "summary.png"
    _chart(chart, rows, curves)
    summary = {
        "preset": preset,
        "rows": rows,
        "cache": str(cache),
        "cache_bytes_per_image": info["bytes_per_image"],
        "cache_fidelity": info["fidelity"],
        "build_seconds": build["seconds"],
        "chart": str(chart),
        "total_seconds": time.perf_counter() - t_start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
