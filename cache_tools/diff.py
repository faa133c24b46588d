"""Compare two caches of the same images entry by entry (``skdcache diff``).

Useful when a team swaps teachers (or codecs): how often do the two argmaxes agree, how far apart
are their softmaxes (KL at T=1, from A to B), and how different are the pair-wise similarity
matrices the pair-wise loss would distil. Both caches must hold the same image ids; dense caches
must share each entry's grid, views caches must hold identical views.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import SchemaMismatchError
from .fidelity import compose_nodes, cosine_matrix, kl_per_pixel, official_kernel
from .schema import CacheSchema
from .store import CacheReader, open_cache

__all__ = ["DiffReport", "diff_caches"]


@dataclass
class DiffReport:
    """What :func:`diff_caches` measured (pixel-weighted over the compared entries).

    Attributes:
        argmax_agreement: fraction of grid nodes where both teachers pick the same class.
        kl_t1_mean / kl_t1_max: KL(softmax(A) ‖ softmax(B)) per node, mean and max.
        pair_cos_diff_mean / _max: |cos_A − cos_B| over the pair-wise nodes' cosine matrices (None
            unless both caches store features).
        class_agreement: per class of A's argmax, the fraction of its nodes where B agrees.
        worst: the entries with the largest mean KL.
    """

    a: str
    b: str
    teacher_a: str
    teacher_b: str
    mode: str
    entries: int
    entries_total: int
    nodes: int
    argmax_agreement: float
    kl_t1_mean: float
    kl_t1_max: float
    pair_cos_diff_mean: float | None = None
    pair_cos_diff_max: float | None = None
    class_agreement: dict[str, float] = field(default_factory=dict)
    worst: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _check_comparable(ra: CacheReader, rb: CacheReader) -> None:
    a, b = ra.schema, rb.schema
    if a.dataset.class_names != b.dataset.class_names:
        raise SchemaMismatchError(
            f"the caches label different classes ({a.dataset.num_classes} vs {b.dataset.num_classes}, "
            f"first difference: {_first_diff(a.dataset.class_names, b.dataset.class_names)})"
        )
    if ra.image_ids != rb.image_ids:
        only_a = sorted(set(ra.image_ids) - set(rb.image_ids))
        only_b = sorted(set(rb.image_ids) - set(ra.image_ids))
        if only_a or only_b:
            which = f"{only_a[0]!r} is only in A" if only_a else f"{only_b[0]!r} is only in B"
            raise SchemaMismatchError(
                f"the caches hold different images ({len(only_a)} only in A, {len(only_b)} only in B; {which}); "
                "`skdcache subset` one of them to the other's ids first"
            )
        raise SchemaMismatchError("the caches hold the same images in a different order")
    if a.mode != b.mode:
        raise SchemaMismatchError(f"cannot compare a {a.mode} cache with a {b.mode} cache entry by entry")
    if a.entries_per_image != b.entries_per_image:
        raise SchemaMismatchError(
            f"the caches hold {a.entries_per_image} and {b.entries_per_image} entries per image "
            "(a mirrored pass or another view count)"
        )
    if not np.array_equal(ra.entry_grid, rb.entry_grid):
        e = int(np.argwhere((ra.entry_grid != rb.entry_grid).any(axis=1))[0, 0])
        raise SchemaMismatchError(
            f"entry {e} is on a {tuple(ra.entry_grid[e])} grid in A and {tuple(rb.entry_grid[e])} in B; "
            "only maps on the same grid can be compared"
        )
    same_views = (
        np.array_equal(ra.entry_scale, rb.entry_scale)
        and np.array_equal(ra.entry_resized, rb.entry_resized)
        and np.array_equal(ra.entry_box, rb.entry_box)
        and np.array_equal(ra.entry_flip, rb.entry_flip)
    )
    if not same_views:
        raise SchemaMismatchError(
            "the caches hold different views of the images (another view seed, crop or scale set); "
            "only identical views can be compared"
        )


def _first_diff(a: tuple, b: tuple) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"class {i} is {x!r} vs {y!r}"
    return f"{len(a)} vs {len(b)} classes"


def _nodes(schema: CacheSchema, feature: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    f = schema.features
    assert f is not None
    return compose_nodes(feature, f.block, grid, official_kernel(*grid), f.pool or "max")


def diff_caches(
    a: str,
    b: str,
    *,
    storage_options: dict | None = None,
    b_storage_options: dict | None = None,
    max_entries: int | None = None,
    workers: int = 4,
    worst: int = 5,
    progress: Callable[[int, int], None] | None = None,
) -> DiffReport:
    """Compare the teacher targets of two caches of the same images.

    Args:
        a, b: the caches (paths or fsspec URLs); KL is measured from A to B.
        storage_options: fsspec options for ``a`` (and ``b`` unless ``b_storage_options``).
        max_entries: compare only this many entries, evenly spread (default: all).
        worst: how many of the most different entries to list.
        progress: ``progress(entries_done, entries_total)``.

    Raises:
        SchemaMismatchError: the caches cannot be compared (other images, classes, grids or views).
    """
    t0 = time.perf_counter()
    ra = open_cache(a, storage_options=storage_options)
    rb = open_cache(b, storage_options=storage_options if b_storage_options is None else b_storage_options)
    _check_comparable(ra, rb)
    n = ra.num_entries
    entries = list(range(n))
    if max_entries is not None and 0 < max_entries < n:
        entries = sorted({int(round(x)) for x in np.linspace(0, n - 1, max_entries)})
    rows = []
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        for i, row in enumerate(pool.map(lambda e: _compare_entry(ra, rb, e), entries), 1):
            rows.append(row)
            if progress is not None:
                progress(i, len(entries))
    report = _summarise(str(a), str(b), ra, rb, rows, worst)
    report.seconds = time.perf_counter() - t0
    return report


def _compare_entry(ra: CacheReader, rb: CacheReader, e: int) -> dict:
    """Sums over one entry's grid nodes: agreement (overall and per class of A's argmax), KL and,
    when both caches store features, the pair-wise cosine differences."""
    k = ra.schema.dataset.num_classes
    ea, eb = ra.read_entry(e), rb.read_entry(e)
    kl = kl_per_pixel(ea.logits, eb.logits, 1.0)
    am, bm = ea.logits.argmax(0), eb.logits.argmax(0)
    agree = am == bm
    out = {
        "entry": e,
        "image_id": ea.image_id,
        "nodes": int(kl.size),
        "agree": int(agree.sum()),
        "kl_sum": float(kl.sum()),
        "kl_max": float(kl.max()),
        "class_total": np.bincount(am.ravel(), minlength=k),
        "class_agree": np.bincount(am[agree].ravel(), minlength=k),
    }
    if ra.schema.features is not None and rb.schema.features is not None:
        ca = cosine_matrix(_nodes(ra.schema, ea.feature, ea.grid))  # type: ignore[arg-type]
        cb = cosine_matrix(_nodes(rb.schema, eb.feature, eb.grid))  # type: ignore[arg-type]
        d = np.abs(ca - cb)
        out["cos_sum"], out["cos_count"], out["cos_max"] = float(d.sum()), int(d.size), float(d.max())
    return out


def _summarise(a: str, b: str, ra: CacheReader, rb: CacheReader, rows: list[dict], worst: int) -> DiffReport:
    """The report of the compared entries' rows (pixel-weighted), all but the time it took."""
    k = ra.schema.dataset.num_classes
    nodes = sum(r["nodes"] for r in rows)
    total = np.sum([r["class_total"] for r in rows], axis=0)
    agree = np.sum([r["class_agree"] for r in rows], axis=0)
    names = ra.schema.dataset.class_names
    report = DiffReport(
        a=a,
        b=b,
        teacher_a=ra.schema.teacher.name,
        teacher_b=rb.schema.teacher.name,
        mode=ra.schema.mode,
        entries=len(rows),
        entries_total=ra.num_entries,
        nodes=nodes,
        argmax_agreement=sum(r["agree"] for r in rows) / max(1, nodes),
        kl_t1_mean=sum(r["kl_sum"] for r in rows) / max(1, nodes),
        kl_t1_max=max(r["kl_max"] for r in rows),
        class_agreement={names[c]: float(agree[c] / total[c]) for c in range(k) if total[c]},
        worst=[
            {
                "entry": r["entry"],
                "image_id": r["image_id"],
                "kl_t1_mean": r["kl_sum"] / r["nodes"],
                "argmax_agreement": r["agree"] / r["nodes"],
            }
            for r in sorted(rows, key=lambda r: -r["kl_sum"] / r["nodes"])[: max(0, worst)]
        ],
    )
    if ra.schema.features is not None and rb.schema.features is not None:
        report.pair_cos_diff_mean = sum(r["cos_sum"] for r in rows) / max(1, sum(r["cos_count"] for r in rows))
        report.pair_cos_diff_max = max(r["cos_max"] for r in rows)
    return report
