"""What checking every read costs the training loader: samples/s with and without the entry checksum.

    python benchmarks/read_checks.py --size 1024x2048 --crop 512x1024 --images 4 --samples 10   # ~3 min, 2 cores

Every entry a training worker reads is compared with its build-time checksum (blake2b-64 over the
encoded parts), so a missing or altered chunk stops training instead of teaching uniform targets.
This measures the loader (``SegTrainData`` samples, in-process: image decode, augmentation, cache
read and target resampling) over a dense and a views cache, with the check and without it, on the
same draws interleaved sample by sample; the ratio is of the totals over all rounds.
It also prints the checksum's own cost per entry.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import save

from cache_tools.datasets import write_sample_dataset
from cache_tools.store import entry_checksum
from pipeline.build import BuildConfig, build_cache
from student.data import PairSpec, SegTrainData


class _Unchecked(SegTrainData):
    """The loader with the read check switched off (for this comparison only)."""

    def _open(self):
        reader = super()._open()
        read = type(reader).read_entry
        reader.read_entry = lambda i, check=False: read(reader, i, check=False)  # type: ignore[method-assign]
        return reader


def side_by_side(loaders: dict[str, SegTrainData], draws: range) -> dict[str, float]:
    """Samples per second of each loader over the same draws, interleaved sample by sample.

    Each draw is read by every loader back to back, the order alternating from draw to draw, so
    that the machine's slow phases and the page cache favour none of them.
    """
    spent = dict.fromkeys(loaders, 0.0)
    names = list(loaders)
    for d in draws:
        for name in names if d % 2 else names[::-1]:
            t0 = time.perf_counter()
            loaders[name][d]
            spent[name] += time.perf_counter() - t0
    return {name: len(draws) / s for name, s in spent.items()}


def read_rates(reader, n: int) -> dict[str, float]:
    """Entries per second of the read path alone (fetch + decode), checked and not, interleaved."""
    spent = {"checked": 0.0, "unchecked": 0.0}
    for k in range(n):
        e = k % reader.num_entries
        for check in (True, False) if k % 2 else (False, True):
            t0 = time.perf_counter()
            reader.read_entry(e, check=check)
            spent["checked" if check else "unchecked"] += time.perf_counter() - t0
    return {name: n / s for name, s in spent.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512x1024", help="image size of the sample dataset")
    ap.add_argument("--crop", default="256x256")
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--samples", type=int, default=24, help="samples per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    crop = tuple(int(v) for v in args.crop.split("x"))
    rows: dict[str, dict[str, list[float]]] = {}
    per_entry: dict[str, dict[str, float]] = {}
    reads: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        write_sample_dataset(data, num_train=args.images, num_val=0, size=(h, w), seed=6)
        common = dict(teacher="psp_tiny", random_weights=True, data=str(data), loader_workers=0)
        build_cache(BuildConfig(out=str(tmp / "dense.zarr"), **common))
        build_cache(BuildConfig(out=str(tmp / "views.zarr"), mode="views", views=2, crop=crop, **common))
        for kind in ("dense", "views"):
            cache = str(tmp / f"{kind}.zarr")
            kw = dict(crop=crop, cache=cache, pair=PairSpec(), seed=0)
            loaders = {"checked": SegTrainData(str(data), **kw), "unchecked": _Unchecked(str(data), **kw)}
            side_by_side(loaders, range(2))  # open the store
            for rnd in range(args.rounds):
                rates = side_by_side(loaders, range(rnd * args.samples, (rnd + 1) * args.samples))
                for name, r in rates.items():
                    rows.setdefault(kind, {}).setdefault(name, []).append(r)
            reader = loaders["checked"]._open()
            reads[kind] = read_rates(reader, 20 * args.samples)
            parts = reader.read_parts(0)
            nbytes = sum(v.nbytes for p in parts.values() for v in p.values())
            t0 = time.perf_counter()
            for _ in range(50):
                entry_checksum(parts)
            per_entry[kind] = {"bytes": nbytes, "checksum_ms": (time.perf_counter() - t0) / 50 * 1e3}
    print(
        f"loader samples/s (in-process, {args.rounds} x {args.samples} samples), {args.size} images, crop {args.crop}, CPU"
    )
    print(
        f"{'cache':8s} {'checked':>9s} {'unchecked':>10s} {'checked/unchecked':>18s} {'entry bytes':>12s} {'checksum':>9s}"
    )
    total = {}
    for kind, r in rows.items():
        total[kind] = {name: len(v) / sum(1 / x for x in v) for name, v in r.items()}  # equal samples per round
        b = total[kind]
        print(
            f"{kind:8s} {b['checked']:9.2f} {b['unchecked']:10.2f} {b['checked'] / b['unchecked']:18.3f} "
            f"{per_entry[kind]['bytes']:12d} {per_entry[kind]['checksum_ms']:7.2f}ms"
        )
    for kind, r in reads.items():
        print(
            f"read path alone ({kind}): {r['checked']:.1f} vs {r['unchecked']:.1f} entries/s checked/unchecked "
            f"= {r['checked'] / r['unchecked']:.3f}"
        )
    payload = {"args": vars(args), "rounds": rows, "total": total, "per_entry": per_entry, "read_path": reads}
    path = save("read_checks", payload)
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    main()
