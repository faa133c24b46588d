"""Teacher precision: time per image and error against fp32, for each precision this machine runs.

    python benchmarks/precision.py       # CPU: psp34_mini at 256x512, 2 images, ~2-3 min on 2 cores
    python benchmarks/precision.py --teacher psp101 --size 1024x2048     # a GPU: fp32/tf32/fp16/bf16

The teacher has seeded random weights with its BatchNorm statistics set from the benchmark images
(as benchmarks/codecs.py does), so activations have the scale a trained network's BN gives them;
the images are sample scenes rendered at ``--size``. Each precision runs through
:func:`pipeline.inference.run_teacher` (what the build runs) and is compared with the fp32 forward of
the same image: KL(T=1) of the softmax (mean and max over nodes), argmax agreement, the largest
logit difference, and the pair-wise loss's cosine error on the official nodes. Two reference rows
put the numbers in scale: the default ``gap-u8`` logit codec applied to the fp32 logits (the error the
store's ``fidelity`` reports), and ``bf16`` logits through ``gap-u8`` (what a bf16 build stores).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from common import save

from cache_tools.codecs import LogitCodec
from cache_tools.datasets.sample import render_scene
from cache_tools.fidelity import cosine_matrix, kl_per_pixel, official_kernel, pool_cells
from cache_tools.schema import parse_hw
from pipeline.inference import run_teacher
from pipeline.teachers import calibrate_batchnorm, create_teacher


def timed(model, x, device, precision) -> tuple[np.ndarray, np.ndarray, float]:
    """(logits, feature) of one image as numpy, and the forward's seconds (synchronised)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    z, f = run_teacher(model, x, device, precision)
    z, f = z[0].cpu().numpy(), f[0].cpu().numpy()  # .cpu() waits for the GPU
    return z, f, time.perf_counter() - t0


def errors(ref: np.ndarray, got: np.ndarray, ref_f: np.ndarray | None, got_f: np.ndarray | None) -> dict:
    """The error of ``got`` against the fp32 ``ref`` (logits (K, h, w); features (C, h, w) or None)."""
    kl = kl_per_pixel(ref, got, 1.0)
    out = {
        "kl_t1_mean": float(kl.mean()),
        "kl_t1_max": float(kl.max()),
        "argmax_agreement": float((ref.argmax(0) == got.argmax(0)).mean()),
        "max_abs_logit_diff": float(np.abs(ref - got).max()),
        "pair_cos_err_max": float("nan"),
    }
    if ref_f is not None and got_f is not None:
        kernel = official_kernel(*ref_f.shape[1:])
        a, b = (cosine_matrix(pool_cells(f, kernel, "max")) for f in (ref_f, got_f))
        out["pair_cos_err_max"] = float(np.abs(a - b).max())
    return out


def merge(rows: list[dict], seconds: list[float]) -> dict:
    """Per-image results -> one row: means of means, maxima of maxima, the median time."""
    return {
        "seconds": statistics.median(seconds) if seconds else float("nan"),
        "kl_t1_mean": float(np.mean([r["kl_t1_mean"] for r in rows])),
        "kl_t1_max": max(r["kl_t1_max"] for r in rows),
        "argmax_agreement": float(np.mean([r["argmax_agreement"] for r in rows])),
        "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows),
        "pair_cos_err_max": max(r["pair_cos_err_max"] for r in rows),
    }


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precisions = ("fp32", "tf32", "fp16", "bf16") if device.type == "cuda" else ("fp32", "bf16")
    size = parse_hw(args.size)
    model = create_teacher(args.teacher, num_classes=19, random_weights=True, seed=0, device=str(device)).model
    # BN needs two images in train mode (the pyramid's 1x1 cell); the first two are also measured
    xs = [
        torch.from_numpy(render_scene(size, seed=1000 + i)[0]).permute(2, 0, 1)[None]
        for i in range(max(2, args.images))
    ]
    calibrate_batchnorm(model, torch.cat(xs[:2]).float().to(device))
    xs = xs[: args.images]
    if device.type == "cuda":  # kernels chosen and loaded before anything is timed
        for p in precisions:
            timed(model, xs[0], device, p)
    codec = LogitCodec("gap-u8")
    per = {p: ([], []) for p in (*precisions, "fp32 -> gap-u8", "bf16 -> gap-u8")}
    for x in xs:
        ref, ref_f, secs = timed(model, x, device, "fp32")
        for p in precisions:
            got, got_f, secs = (ref, ref_f, secs) if p == "fp32" else timed(model, x, device, p)
            per[p][0].append(errors(ref, got, ref_f, got_f))
            per[p][1].append(secs)
            if p == "bf16":
                per["bf16 -> gap-u8"][0].append(errors(ref, codec.decode(codec.encode(got)[0]), None, None))
        per["fp32 -> gap-u8"][0].append(errors(ref, codec.decode(codec.encode(ref)[0]), None, None))
        print(f"image {len(per['fp32'][0])}/{len(xs)} done", flush=True)
    grid = ref.shape[1:]
    top2 = np.sort(ref, axis=0)[-2:]
    return {
        # the scale the errors are read against (of the last image's fp32 logits)
        "logit_abs_max": float(np.abs(ref).max()),
        "top2_margin_median": float(np.median(top2[1] - top2[0])),
        "teacher": args.teacher,
        "size": list(size),
        "grid": list(grid),
        "images": len(xs),
        "device": str(device),
        "rows": {p: merge(rows, secs) for p, (rows, secs) in per.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    ap.add_argument("--teacher", default="psp101" if gpu else "psp34_mini")
    ap.add_argument("--size", default="1024x2048" if gpu else "256x512", help="image HxW")
    ap.add_argument("--images", type=int, default=4 if gpu else 2)
    args = ap.parse_args()
    t0 = time.perf_counter()
    result = run(args)
    print(
        f"\n{result['teacher']} (random weights, BN calibrated), {result['images']} images of "
        f"{result['size'][0]}x{result['size'][1]} -> grid {result['grid'][0]}x{result['grid'][1]}, on {result['device']}"
    )
    print(
        f"fp32 logits: |z| up to {result['logit_abs_max']:.1f}, median top-1/top-2 margin "
        f"{result['top2_margin_median']:.2f}"
    )
    head = f"{'precision':16s} {'s/image':>8s} {'KL1 mean':>9s} {'KL1 max':>9s} {'argmax %':>9s} {'max|dz|':>8s} {'pair err':>9s}"
    print(head)
    for name, r in result["rows"].items():
        print(
            f"{name:16s} {r['seconds']:8.2f} {r['kl_t1_mean']:9.1e} {r['kl_t1_max']:9.1e} "
            f"{100 * r['argmax_agreement']:9.3f} {r['max_abs_logit_diff']:8.4f} {r['pair_cos_err_max']:9.1e}"
        )
    print(f"({time.perf_counter() - t0:.0f} s in all; json: {save('precision', result)})")


if __name__ == "__main__":
    main()
