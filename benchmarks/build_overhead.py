"""Does the write path hide behind the teacher? Build wall time / teacher-forward-only wall time.

    python benchmarks/build_overhead.py          # ~4 min on 2 CPU cores

Same images, same teacher, same thread count, side by side in one run: (1) the teacher's forward
passes alone on pre-decoded tensors, (2) a full ``build_cache`` (decode in DataLoader workers,
teacher, encode + checksum + fidelity + compress + write in background threads). The ratio is the
cost of everything that is not the teacher. Target: <= 1.05 with the official teacher (psp101);
the small teacher shows where the overhead becomes visible.

Two ratios are printed: *total* (wall time of the whole build call, including the one-off start-up:
store creation, spawning the decoding workers, building the teacher) and *steady* (from the first
teacher batch to the last shard written, against the forward passes of the same batches) — the
second is what a 3,000-image build sees.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import save

from cache_tools.datasets import open_dataset, write_sample_dataset
from pipeline.build import BuildConfig, build_cache
from pipeline.teachers import create_teacher
from pipeline.views import apply_view, sample_views


def forward_only(teacher: str, data: Path, mode: str, crop, views: int, batch: int) -> tuple[float, float]:
    """(all forward passes, all but the first batch) in seconds."""
    ds = open_dataset(data, splits="train")
    model = create_teacher(teacher, num_classes=19, random_weights=True).model
    inputs = []
    for i in range(len(ds)):
        img, _, _ = ds.load(i)
        x = torch.from_numpy(img).permute(2, 0, 1)
        if mode == "dense":
            inputs.append(x[None].float())
        else:
            for v in sample_views(0, [x.shape[1:]], views, crop):
                inputs.append(apply_view(x, None, v)[0][None])
    if mode == "views":
        inputs = [torch.cat(inputs[i : i + batch]) for i in range(0, len(inputs), batch)]
    times = []
    with torch.inference_mode():
        model(inputs[0][:1])  # warm-up
        for x in inputs:
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return sum(times), sum(times[1:])


def full_build(teacher: str, data: Path, out: Path, mode: str, crop, views: int, batch: int) -> tuple[float, float]:
    """(whole build call, first teacher batch done -> last shard written) in seconds."""
    cfg = BuildConfig(
        teacher=teacher,
        random_weights=True,
        data=str(data),
        out=str(out),
        mode=mode,
        crop=crop,
        views=views,
        batch_size=batch,
        loader_workers=2,
        writer_threads=2,
    )
    marks: list[float] = []
    t0 = time.perf_counter()
    build_cache(cfg, progress=lambda p: marks.append(time.perf_counter()))
    total = time.perf_counter() - t0
    return total, marks[-1] - marks[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--size", default="512x1024")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_sample_dataset(data, num_train=args.images, num_val=0, size=(h, w), seed=4)
        for teacher, mode, crop, views, batch in [
            ("psp101", "dense", (512, 512), 1, 1),
            ("psp101", "views", (512, 512), 2, 2),
            ("psp34_mini", "dense", (512, 512), 1, 1),
            ("psp34_mini", "views", (512, 512), 4, 8),
        ]:
            # alternate the two measurements so machine noise hits both alike
            fwd, build = [], []
            for rep in range(2):
                fwd.append(forward_only(teacher, data, mode, crop, views, batch))
                out = Path(tmp) / f"c{rep}.zarr"
                build.append(full_build(teacher, data, out, mode, crop, views, batch))
                shutil.rmtree(out)
            fwd_total, fwd_steady = (float(np.median([f[i] for f in fwd])) for i in (0, 1))
            build_total, build_steady = (float(np.median([b[i] for b in build])) for i in (0, 1))
            row = {
                "teacher": teacher,
                "mode": mode,
                "entries": args.images * (views if mode == "views" else 1),
                "forward_s": fwd_total,
                "build_s": build_total,
                "ratio_total": build_total / fwd_total,
                "ratio_steady": build_steady / fwd_steady,
            }
            rows.append(row)
            print(
                f"{teacher:11s} {mode:6s} {row['entries']:3d} entries  forward-only {fwd_total:7.1f} s  "
                f"build {build_total:7.1f} s  ratio total {row['ratio_total']:.3f}  steady {row['ratio_steady']:.3f}",
                flush=True,
            )
    path = save("build_overhead", {"size": [h, w], "rows": rows})
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    main()
