"""Shared pieces of the benchmarks: machine description, timing helpers, the benchmark teacher.

The benchmarks print tables of ratios measured side by side in one run (these machines are noisy)
and write their raw numbers as JSON under ``benchmarks/out/``; ``docs/benchmarks.md`` quotes them
with the command that produced each table.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
    }


def median_time(fn, repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def save(name: str, payload: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str))
    return path


def cli(*args: str, check: bool = True) -> dict:
    """Run skdcache/skdstudent with --json in a subprocess and return its JSON."""
    module = {"skdcache": "pipeline", "skdstudent": "student"}[args[0]]
    proc = subprocess.run([sys.executable, "-m", module, *args[1:], "--json"], stdout=subprocess.PIPE, text=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}")
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def benchmark_teacher(force: bool = False) -> tuple[Path, Path]:
    """A psp34_mini teacher trained on the sample dataset rendered at 512x1024 (256x256 crops).

    Trained once and reused: run at 1024x2048 its objects are twice the size of the training
    renders, inside the 0.7-2.1 scale augmentation, so its logits have the statistics of a trained
    teacher at the Cityscapes grid (129x257). Returns (weights, data root).
    """
    root = OUT / "teacher"
    data = root / "data-512x1024"
    weights = root / "run" / "model.safetensors"
    if weights.exists() and not force:
        return weights, data
    if not data.exists():
        cli(
            "skdcache",
            "sample-data",
            str(data),
            "--num-images",
            "200",
            "--num-val",
            "20",
            "--size",
            "512x1024",
            "--seed",
            "11",
        )
    cli(
        "skdstudent",
        "train",
        "--data",
        str(data),
        "--out",
        str(root / "run"),
        "--student",
        "psp34_mini",
        "--losses",
        "none",
        "--iters",
        "600",
        "--batch-size",
        "8",
        "--crop",
        "256x256",
        "--lr",
        "0.02",
        "--eval-split",
        "none",
    )
    return weights, data
