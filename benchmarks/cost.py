"""What does it cost to distil N students: one teacher pass + N cached runs vs N online runs.

    python benchmarks/cost.py            # ~25 min on 2 CPU cores

Measured: on the quality benchmark's data and teacher (psp34_mini -> psp18_mini, batch 8, crop
128x128, ``--iters`` each), the dense cache build once, then N = 5 students from the cache and
N = 5 students with the teacher online (seeds 0..4), interleaved. The table gives the cumulative
wall time for N = 1..5.

Extrapolated: the same model with per-step costs measured here for the official pair,
psp101 (teacher) -> psp18 (student) at 512x512, batch 8, 40,000 iterations, and the dense build
over Cityscapes' 2,975 training images at 1024x2048 (assumption: the ratio of teacher forward to
student step measured on this CPU carries over to a GPU, since both are dominated by the same
convolutions; the cache's loader overhead is the measured cached/student-only ratio).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

import torch
from common import OUT, cli, median_time, save

from pipeline.registry import create_model

DATA = OUT / "quality" / "data"
TEACHER = OUT / "quality" / "teacher" / "model.safetensors"


def per_step_costs(batch: int = 2) -> dict:
    """Seconds: psp18 train step per 512^2 crop, psp101 forward per 512^2 crop and per 1024x2048 image."""
    student = create_model("psp18", num_classes=19).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 3, 512, 512) * 255
    y = torch.randint(0, 19, (batch, 512, 512))

    def step():
        out = student(x)
        up = torch.nn.functional.interpolate(out.logits, size=(512, 512), mode="bilinear", align_corners=True)
        loss = torch.nn.functional.cross_entropy(up, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    s_step = median_time(step, repeat=3) / batch
    teacher = create_model("psp101", num_classes=19).eval()
    with torch.inference_mode():
        t_crop = median_time(lambda: teacher(x[:1]), repeat=3)
        t_full = median_time(lambda: teacher(torch.rand(1, 3, 1024, 2048) * 255), repeat=1, warmup=0)
    return {"student_step_per_crop": s_step, "teacher_forward_per_crop": t_crop, "teacher_forward_full_image": t_full}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--students", type=int, default=5)
    ap.add_argument("--iters", type=int, default=150)
    args = ap.parse_args()
    if not TEACHER.exists():
        raise SystemExit("run benchmarks/quality.py first (it trains the teacher this benchmark reuses)")
    tmp = OUT / "cost"
    tmp.mkdir(parents=True, exist_ok=True)
    cache = tmp / "dense.zarr"
    t0 = time.perf_counter()
    cli(
        "skdcache",
        "build",
        "--teacher",
        "psp34_mini",
        "--weights",
        str(TEACHER),
        "--data",
        str(DATA),
        "--out",
        str(cache),
        "--overwrite",
    )
    build_s = time.perf_counter() - t0
    common = [
        "--data",
        str(DATA),
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
        "--eval-split",
        "none",
        "--losses",
        "pixel,pair,holistic",
        "--pixel-mode",
        "kl",
        "--lambda-pi",
        "1",
    ]
    cached, online = [], []
    for seed in range(args.students):
        for kind, runs in (("cached", cached), ("online", online)):
            out = tmp / f"{kind}{seed}"
            if out.exists():
                shutil.rmtree(out)
            src = (
                ["--cache", str(cache)] if kind == "cached" else ["--teacher", "psp34_mini", "--weights", str(TEACHER)]
            )
            t = time.perf_counter()
            cli("skdstudent", "train", *common, *src, "--out", str(out), "--seed", str(seed))
            runs.append(time.perf_counter() - t)
            print(f"{kind} student {seed}: {runs[-1]:.1f} s", flush=True)
    print(
        f"\nmeasured, psp34_mini -> psp18_mini, {args.iters} iterations each, batch 8, 128x128 (wall time of the whole commands)"
    )
    print(f"{'N':>2s} {'cache: build + N':>18s} {'online: N':>10s} {'online / cache':>15s}")
    rows = []
    for n in range(1, args.students + 1):
        c = build_s + sum(cached[:n])
        o = sum(online[:n])
        rows.append({"n": n, "cached_s": c, "online_s": o})
        print(f"{n:2d} {c:16.1f} s {o:8.1f} s {o / c:15.2f}")

    costs = per_step_costs()
    train_speed = OUT / "train_speed.json"
    overhead = 1.0
    if train_speed.exists():
        step = json.loads(train_speed.read_text())["step"]
        overhead = step["cached KD (dense)"] / step["student only"]
    s, t, f = costs["student_step_per_crop"], costs["teacher_forward_per_crop"], costs["teacher_forward_full_image"]
    iters, batch, images = 40_000, 8, 2975
    cached_run = iters * batch * s * overhead
    online_run = iters * batch * (s + t)
    build = images * f
    print(
        f"\nextrapolated, psp101 -> psp18, 512x512, batch 8, 40k iterations: per crop student step {s:.2f} s, teacher forward "
        f"{t:.2f} s, teacher on a 1024x2048 image {f:.1f} s (this CPU); cache loader overhead x{overhead:.3f}"
    )
    print(f"{'N':>2s} {'cache (x one online run)':>25s} {'online':>8s} {'saving':>8s}")
    ext = []
    for n in range(1, args.students + 1):
        c = (build + n * cached_run) / online_run
        o = n * 1.0
        ext.append({"n": n, "cached_in_online_runs": c, "online_in_online_runs": o})
        print(f"{n:2d} {c:25.2f} {o:8.2f} {o / c:7.2f}x")
    path = save(
        "cost",
        {
            "iters": args.iters,
            "build_s": build_s,
            "cached_s": cached,
            "online_s": online,
            "rows": rows,
            "per_step": costs,
            "loader_overhead": overhead,
            "extrapolated": ext,
        },
    )
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    main()
