"""Does the cache cost accuracy, and does distillation help here? mean +- std mIoU over seeds.

    python benchmarks/quality.py [--seeds 0,1,2]      # ~45 min on 2 CPU cores

On the sample benchmark (the demo's data: 160 train / 40 val procedural scenes at 128x256), one
teacher (psp34_mini, task loss only, 1500 iterations) and the same student recipe (psp18_mini,
300 iterations, batch 8, crop 128x128, lr 0.02) for every row, with several seeds:

* student alone (task loss only);
* KD from a dense cache (one teacher pass per image, targets replayed on the student's crops);
* KD from a views cache (8 exact views per image, replayed);
* KD with the teacher online (the A/B reference);
* the official weights (pixel-wise soft CE summed over the batch with lambda 10 = 80 per pixel)
  from the dense cache, to show what they do to a from-scratch student trained for minutes.

The KD rows use all three losses with the official pair-wise and holistic weights and the
per-pixel pixel-wise weight 1 (``--pixel-mode kl --lambda-pi 1``, CIRKD's formulation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import OUT, cli, save

DATA = OUT / "quality" / "data"
TEACHER = OUT / "quality" / "teacher"


def prepare() -> tuple[Path, Path, Path]:
    if not DATA.exists():
        cli(
            "skdcache",
            "sample-data",
            str(DATA),
            "--num-images",
            "160",
            "--num-val",
            "40",
            "--size",
            "128x256",
            "--seed",
            "0",
        )
    weights = TEACHER / "model.safetensors"
    if not weights.exists():
        cli(
            "skdstudent",
            "train",
            "--data",
            str(DATA),
            "--out",
            str(TEACHER),
            "--student",
            "psp34_mini",
            "--losses",
            "none",
            "--iters",
            "1500",
            "--batch-size",
            "8",
            "--crop",
            "128x128",
            "--lr",
            "0.02",
        )
    dense, views = OUT / "quality" / "dense.zarr", OUT / "quality" / "views.zarr"
    common = ["--teacher", "psp34_mini", "--weights", str(weights), "--data", str(DATA)]
    if not dense.exists():
        cli("skdcache", "build", *common, "--out", str(dense))
    if not views.exists():
        cli("skdcache", "build", *common, "--out", str(views), "--mode", "views", "--views", "8", "--crop", "128x128")
    return weights, dense, views


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    weights, dense, views = prepare()
    teacher_miou = json.loads((TEACHER / "eval.json").read_text())["miou"]
    kd = ["--losses", "pixel,pair,holistic", "--pixel-mode", "kl", "--lambda-pi", "1"]
    settings = {
        "student alone": ["--losses", "none"],
        "KD, dense cache": ["--cache", str(dense), *kd],
        "KD, views cache": ["--cache", str(views), *kd],
        "KD, online teacher": ["--teacher", "psp34_mini", "--weights", str(weights), *kd],
        "KD, dense cache, official weights": ["--cache", str(dense), "--losses", "pixel,pair,holistic"],
    }
    runs = OUT / "quality" / "runs"
    results: dict[str, list[float]] = {name: [] for name in settings}
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    for seed in seeds:  # seeds outermost: an interrupted run still has every setting for the first seeds
        for name, extra in settings.items():
            out = runs / f"{name.replace(' ', '_').replace(',', '')}_seed{seed}"
            if (out / "eval.json").exists():
                miou = json.loads((out / "eval.json").read_text())["miou"]
                secs = float("nan")
            else:
                r = cli(
                    "skdstudent",
                    "train",
                    "--data",
                    str(DATA),
                    "--out",
                    str(out),
                    "--student",
                    "psp18_mini",
                    "--iters",
                    str(args.iters),
                    "--batch-size",
                    "8",
                    "--crop",
                    "128x128",
                    "--lr",
                    "0.02",
                    "--seed",
                    str(seed),
                    *extra,
                )
                miou, secs = r["miou"], r["seconds"]
            results[name].append(miou)
            seconds[name].append(secs)
            print(f"seed {seed}  {name:36s} mIoU {100 * miou:6.2f}", flush=True)
    print(f"\nteacher psp34_mini: {100 * teacher_miou:.2f} mIoU (one run)")
    print(f"{'setting':36s} {'mIoU mean':>10s} {'std':>6s}  per seed")
    for name, vals in results.items():
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        print(
            f"{name:36s} {100 * statistics.mean(vals):10.2f} {100 * std:6.2f}  "
            + " ".join(f"{100 * v:.2f}" for v in vals)
        )
    path = save(
        "quality",
        {
            "seeds": seeds,
            "iters": args.iters,
            "teacher_miou": teacher_miou,
            "miou": results,
            "seconds": seconds,
            "wall_s": time.perf_counter() - t0,
        },
    )
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    main()
