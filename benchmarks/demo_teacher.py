"""Train the demo's teacher once and ship it: ``pipeline/demo_assets/<name>.safetensors`` + provenance.

    python benchmarks/demo_teacher.py [--work DIR] [--iters 1500]   # ~12 min on 2 idle CPU cores

Every step is a seeded skd command (printed, and recorded in the provenance file):

1. ``skdcache sample-data`` with the ``full`` demo preset's data arguments (the demo regenerates the
   same bytes from the same seed, so the teacher is evaluated on the demo's own val split);
2. ``skdstudent train --student psp34_mini --losses none`` (task loss only, seed 0);
3. the float32 result is stored with float16 convolution weights (about half the 6.5 MB; BN
   parameters and statistics stay float32, integer buffers int64) — the demo loads it into a float32
   model, so only the rounding of the convolution weights differs;
4. ``skdstudent eval`` of the float16 file on val: the mIoU recorded in the provenance.

The provenance JSON holds the commands, seeds, data arguments, both mIoUs, the sha256 the demo
checks before use, the skd commit and the torch version. An existing ``--work`` run with the same
arguments is reused (its config.json is compared first), so an interrupted session can finish later.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.demo import ASSETS, PRESETS, _data_args  # noqa: E402


def _cli(args: list[str]) -> dict:
    print("$ " + " ".join(shlex.quote(a) for a in args), flush=True)
    module = {"skdcache": "pipeline", "skdstudent": "student"}[args[0]]
    proc = subprocess.run([sys.executable, "-m", module, *args[1:]], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}")
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def _to_fp16(src: Path, dst: Path) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    # convolution weights (nearly all the bytes) to float16; BN statistics stay float32: the first
    # layer sees raw pixels minus the mean, its running_var exceeds float16's 65504
    half = {k: v.half() if v.is_floating_point() and v.dim() > 1 else v for k, v in tensors.items()}
    for k, v in half.items():
        if v.dtype == torch.float16 and not torch.isfinite(v).all():
            raise SystemExit(f"{k} does not fit float16 (overflow); ship the float32 file instead")
    meta["stored_dtype"] = "float16 convolution weights, float32 BN parameters and statistics (trained in float32)"
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(half, str(dst), metadata=meta)
    dst.chmod(0o644)  # safetensors writes 0600; the file ships with the package


def _git_commit() -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return proc.stdout.strip() or None


def _git_dirty() -> bool:
    proc = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return bool(proc.stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "demo_teacher")
    ap.add_argument("--iters", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=0.02)
    args = ap.parse_args()
    p = PRESETS["full"]
    d = _data_args(p)
    data, run = args.work / "data", args.work / "teacher"
    data_cmd = ["skdcache", "sample-data", str(data), "--num-images", str(d["num_images"])]
    data_cmd += ["--num-val", str(d["num_val"]), "--size", d["size"], "--seed", str(d["seed"]), "--json"]
    train_cmd = ["skdstudent", "train", "--data", str(data), "--out", str(run), "--student", p.teacher]
    train_cmd += ["--losses", "none", "--iters", str(args.iters), "--batch-size", str(p.batch_size)]
    train_cmd += ["--crop", p.crop, "--lr", str(args.lr), "--seed", "0", "--json"]
    t0 = time.perf_counter()
    if not data.exists():
        _cli(data_cmd)
    if (run / "eval.json").exists():
        cfg = json.loads((run / "config.json").read_text())
        want = {"student": p.teacher, "iters": args.iters, "lr": args.lr, "seed": 0, "batch_size": p.batch_size}
        if any(cfg.get(k) != v for k, v in want.items()) or cfg.get("losses") != []:
            raise SystemExit(f"{run} holds another run ({cfg}); give another --work")
        print(f"reusing {run} (its config.json matches the command below)")
        fp32 = json.loads((run / "eval.json").read_text())["miou"]
    else:
        fp32 = _cli(train_cmd)["miou"]
    dst = ASSETS / f"{p.teacher_asset}.safetensors"
    _to_fp16(run / "model.safetensors", dst)
    eval_cmd = ["skdstudent", "eval", "--checkpoint", str(dst), "--data", str(data), "--split", "val", "--json"]
    miou = _cli(eval_cmd)["miou"]
    import torch

    prov = {
        "file": dst.name,
        "sha256": hashlib.sha256(dst.read_bytes()).hexdigest(),
        "bytes": dst.stat().st_size,
        "architecture": p.teacher,
        "num_classes": 19,
        "dtype": "float16 convolution weights, float32 BN; trained in float32 (benchmarks/demo_teacher.py)",
        "data": d,
        "seeds": {"data": d["seed"], "train": 0},
        "commands": [shlex.join(data_cmd), shlex.join(train_cmd), shlex.join(eval_cmd)],
        "train_command": shlex.join(train_cmd),
        "miou_val_float32": fp32,
        "miou_val": miou,
        "skd_commit": _git_commit(),
        "skd_tree_dirty": _git_dirty(),
        "threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
        "torch": torch.__version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "script_seconds": round(time.perf_counter() - t0, 1),
    }
    (ASSETS / f"{p.teacher_asset}.json").write_text(json.dumps(prov, indent=2) + "\n")
    print(json.dumps({k: prov[k] for k in ("file", "sha256", "bytes", "miou_val_float32", "miou_val")}, indent=2))


if __name__ == "__main__":
    main()
