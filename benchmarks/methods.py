"""Which distillation methods does one teacher cache serve, and how well? mean +- std mIoU over seeds.

    python benchmarks/methods.py --iters 200 --unlabelled-methods kd --workers 0   # docs/benchmarks.md §10 (94 min)
    python benchmarks/methods.py --seeds 0 --iters 40 --methods none,kd,cwd,ifvd      # a smoke run

On the sample benchmark (``benchmarks/quality.py``'s recipe: 160 train / 40 val procedural scenes at
128x256, here with ``--extra`` unlabelled ``train_extra`` images next to them), one teacher
(the demo's shipped psp34_mini, trained on these 160 labelled images; ``--teacher-iters N`` trains
one here instead) and the same student recipe (psp18_mini, batch 8, crop 128x128,
lr 0.02) for every row:

* student alone (task loss only);
* each method of ``--methods`` (``kd``, ``cwd``, ``dist``, ``ifvd``, and ``skd`` = SKD's three terms
  with CIRKD's per-pixel KL weight 1, as in quality.py) from each source of ``--sources``: a dense
  cache, a views cache (``--views`` exact views per image) and the teacher online. Both caches are
  built with ``--features-block 1x1`` (the full feature map), so ``ifvd`` is served from each;
* for each method of ``--unlabelled-methods``, the same from the dense cache on
  ``--split train,train_extra``: what the unlabelled images add (task loss on the labelled ones only).

Every method uses its reference defaults (docs/training.md, "Methods"). Rows are paired by seed (same
initialisation and sample stream): the table gives each row minus the student alone, and each
cached row minus the same method online, with its 95 % Student-t interval. Raw numbers go to
``benchmarks/out/methods.json`` (``--name``); the printed table is what docs/benchmarks.md quotes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import OUT, cli, save

from cache_tools.datasets import write_sample_dataset
from pipeline.demo import paired_interval

ROOT = OUT / "methods"
SKD = ["--losses", "pixel,pair,holistic", "--pixel-mode", "kl", "--lambda-pi", "1"]
METHODS = {"none": ["--losses", "none"], "kd": ["--losses", "kd"], "cwd": ["--losses", "cwd"]}
METHODS |= {"dist": ["--losses", "dist"], "ifvd": ["--losses", "ifvd"], "skd": SKD}
SOURCES = ("dense", "views", "online")
SHIPPED = Path(__file__).resolve().parents[1] / "pipeline" / "demo_assets" / "psp34_mini_sample.safetensors"


def prepare(args) -> tuple[Path, float, dict[str, list[str]]]:
    """The data (with its unlabelled split), the teacher (and its mIoU) and the two caches; each made once."""
    data = ROOT / f"data-extra{args.extra}"
    if not data.exists():
        write_sample_dataset(data, num_train=160, num_val=40, size=(128, 256), seed=0, num_extra=args.extra)
    if args.teacher_iters:  # train a teacher here
        teacher = ROOT / f"teacher-{args.teacher_iters}"
        weights = teacher / "model.safetensors"
        if not weights.exists():
            cli(
                "skdstudent", "train", "--data", str(data), "--out", str(teacher), "--student", "psp34_mini",
                "--losses", "none", "--iters", str(args.teacher_iters), "--batch-size", "8", "--crop", "128x128",
                "--lr", "0.02", "--workers", str(args.workers),
            )  # fmt: skip
    else:  # the demo's shipped teacher, trained on exactly these 160 images (benchmarks/demo_teacher.py)
        teacher = ROOT / "teacher-shipped"
        teacher.mkdir(parents=True, exist_ok=True)
        weights = SHIPPED
    if not (teacher / "eval.json").exists():
        r = cli("skdstudent", "eval", "--checkpoint", str(weights), "--data", str(data), "--split", "val")
        (teacher / "eval.json").write_text(json.dumps({"miou": r["miou"]}))
    common = ["--teacher", "psp34_mini", "--weights", str(weights), "--data", str(data)]
    common += ["--split", "train,train_extra" if args.extra else "train", "--features-block", "1x1"]
    dense, views = teacher / "dense.zarr", teacher / f"views{args.views}.zarr"
    if "dense" in args.sources and not dense.exists():
        cli("skdcache", "build", *common, "--out", str(dense))
    if "views" in args.sources and not views.exists():
        views_flags = ["--mode", "views", "--views", str(args.views), "--crop", "128x128"]  # the student's crop
        cli("skdcache", "build", *common, "--out", str(views), *views_flags)
    sources = {
        "dense": ["--cache", str(dense)],
        "views": ["--cache", str(views)],
        "online": ["--teacher", "psp34_mini", "--weights", str(weights)],
    }
    return data, json.loads((teacher / "eval.json").read_text())["miou"], sources


def settings(args, sources: dict[str, list[str]]) -> dict[str, list[str]]:
    """Row name -> the flags that make it (the student recipe is added by :func:`run`)."""
    rows = {"student alone": METHODS["none"]} if "none" in args.methods else {}
    for method in (m for m in args.methods if m != "none"):
        for source in args.sources:
            rows[f"{method}, {source}"] = [*sources[source], *METHODS[method]]
    for method in args.unlabelled_methods if args.extra else []:
        rows[f"{method}, dense, + {args.extra} unlabelled"] = [
            *sources["dense"], *METHODS[method], "--split", "train,train_extra",
        ]  # fmt: skip
    return rows


def run(args, data: Path, name: str, extra: list[str], seed: int) -> tuple[float, float]:
    """(mIoU, seconds) of one row at one seed; a finished run is read back, not repeated."""
    slug = name.replace(" ", "_").replace(",", "").replace("+", "plus")
    out = ROOT / "runs" / f"{slug}_it{args.iters}_seed{seed}"
    if (out / "eval.json").exists():
        return json.loads((out / "eval.json").read_text())["miou"], float("nan")
    r = cli(
        "skdstudent", "train", "--data", str(data), "--out", str(out), "--student", "psp18_mini",
        "--iters", str(args.iters), "--batch-size", "8", "--crop", "128x128", "--lr", "0.02",
        "--seed", str(seed), "--workers", str(args.workers), *extra,
    )  # fmt: skip
    return r["miou"], r["seconds"]


def _paired(a: list[float], b: list[float]) -> tuple[dict, str]:
    """a − b paired by seed: ({mean, std, ci95}, the table cell)."""
    mean, std, ci = paired_interval([x - y for x, y in zip(a, b, strict=True)])
    cell = f"{100 * mean:+.2f}" + (f" [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]" if ci else "")
    return {"mean": mean, "std": std, "ci95": ci}, cell


def report(results: dict[str, list[float]]) -> dict[str, dict]:
    """Print the table: mean, std, and each row minus the student alone and minus the same method
    online, paired by seed (95 % t interval)."""
    alone = results.get("student alone")
    print("| setting | mIoU mean | std | − alone [95 % interval] | − online [95 % interval] | per seed |")
    print("|---|---|---|---|---|---|")
    differences = {}
    for name, vals in results.items():
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        per = " · ".join(f"{100 * v:.2f}" for v in vals)
        vs_alone = vs_online = ""
        if alone is not None and name != "student alone":
            differences[name], vs_alone = _paired(vals, alone)
        method, _, source = name.partition(", ")
        online = results.get(f"{method}, online")
        if online is not None and source in ("dense", "views"):
            to_online, vs_online = _paired(vals, online)
            differences.setdefault(name, {})["to_online"] = to_online
        print(f"| {name} | {100 * statistics.mean(vals):.2f} | {100 * std:.2f} | {vs_alone} | {vs_online} | {per} |")
    return differences


def _names(text: str, allowed) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in out if x not in allowed]
    if bad:
        raise SystemExit(f"unknown {bad[0]!r}; choose from {', '.join(allowed)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iters", type=int, default=300, help="student iterations")
    ap.add_argument(
        "--teacher-iters", type=int, default=0, help="train a teacher for N iterations (0: the shipped one)"
    )
    ap.add_argument("--methods", default="none,kd,cwd,dist,ifvd,skd")
    ap.add_argument("--sources", default="dense,views,online")
    ap.add_argument("--unlabelled-methods", default="skd,kd")
    ap.add_argument("--extra", type=int, default=160, help="unlabelled train_extra images (0: no such row)")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--name", default="methods", help="raw numbers go to benchmarks/out/NAME.json")
    args = ap.parse_args()
    args.methods = _names(args.methods, METHODS)
    args.sources = _names(args.sources, SOURCES)
    args.unlabelled_methods = _names(args.unlabelled_methods, [m for m in METHODS if m != "none"])
    if args.unlabelled_methods and args.extra:
        args.sources = list(dict.fromkeys([*args.sources, "dense"]))
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    data, teacher_miou, sources = prepare(args)
    rows = settings(args, sources)
    results: dict[str, list[float]] = {name: [] for name in rows}
    seconds: dict[str, list[float]] = {name: [] for name in rows}
    for seed in seeds:  # seeds outermost: an interrupted run still has every row for the first seeds
        for name, extra in rows.items():
            miou, secs = run(args, data, name, extra, seed)
            results[name].append(miou)
            seconds[name].append(secs)
            print(f"seed {seed}  {name:34s} mIoU {100 * miou:6.2f}  ({secs:.0f} s)", flush=True)
    made = f"{args.teacher_iters} it" if args.teacher_iters else "shipped demo teacher"
    print(f"\nteacher psp34_mini ({made}): {100 * teacher_miou:.2f} mIoU")
    differences = report(results)
    path = save(
        args.name,
        {
            "seeds": seeds,
            "iters": args.iters,
            "teacher_iters": args.teacher_iters,
            "extra": args.extra,
            "views": args.views,
            "teacher_miou": teacher_miou,
            "miou": results,
            "difference_to_alone": differences,
            "seconds": seconds,
            "wall_s": time.perf_counter() - t0,
        },
    )
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    main()
