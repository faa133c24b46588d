"""Move and cut caches: copy between any two fsspec URLs, subset, merge (``skdcache copy|subset|merge``).

* :func:`copy_cache` copies a store object by object, resumably: objects already at the destination
  with the same size are skipped (small ones only when their bytes are equal too), every object it
  writes is read back and compared, and the root ``zarr.json`` -- the only document that makes the
  destination a cache -- is written last, so a copy that stops half-way never looks complete.
* :func:`subset_cache` and :func:`merge_caches` write a *new* store through
  :func:`~cache_tools.store.prepare_cache` / :class:`~cache_tools.store.CacheWriter`: the encoded
  parts are copied as they are (no re-encoding, every entry's checksum is checked on the way), the
  schema describes the new image list, shards are laid out afresh, and the fidelity summary is
  recomputed from the copied per-entry rows. Both resume like a build: re-running the same command
  writes only the shards that are not done.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from .errors import (
    CacheError,
    CacheWriteError,
    ConfigMismatchError,
    CorruptEntryError,
    IncompleteCacheError,
    NotACacheError,
    SchemaMismatchError,
)
from .schema import Arrays, CacheSchema, View, first_difference, ids_digest
from .storage import check_writable, is_remote, local_path, remove_store, storage_errors
from .store import CacheReader, _data_arrays, entry_checksum, open_cache, prepare_cache

__all__ = ["CopyReport", "WriteReport", "copy_cache", "merge_caches", "select_images", "subset_cache"]

logger = logging.getLogger(__name__)

#: Objects up to this size are compared by content before a copy skips them (tables, metadata).
_SMALL = 1 << 20


# ------------------------------------------------------------------------------------------------
# copy


@dataclass
class CopyReport:
    """What :func:`copy_cache` did."""

    src: str
    dst: str
    objects: int
    copied: int
    skipped: int
    bytes_copied: int
    bytes_skipped: int
    verified: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _filesystem(url: str, storage_options: dict | None) -> tuple[Any, str]:
    """(fsspec filesystem, root path) for a store URL; local paths get a plain local filesystem."""
    import fsspec

    if not is_remote(url):
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(auto_mkdir=True), str(local_path(url).absolute())
    fs, path = fsspec.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/")


def _listing(fs: Any, root: str) -> dict[str, int]:
    """Relative key -> size of every object under ``root`` (empty when nothing is there)."""
    if not fs.exists(root):
        return {}
    out = {}
    for path, info in fs.find(root, detail=True).items():
        if info.get("type", "file") != "file":
            continue
        rel = path[len(root) :].lstrip("/") if path.startswith(root) else path.rsplit(root + "/", 1)[-1]
        out[rel] = int(info.get("size") or 0)
    return out


def _location(url: str) -> tuple[str, ...]:
    """A location as path components (protocol first), so that nesting is a prefix test."""
    if not is_remote(url):
        return ("file", *local_path(url).resolve().parts)
    protocol, _, rest = url.partition("://")
    return (protocol.lower(), *(p for p in rest.split("/") if p and p != "."))


def _refuse_same(dst: str, srcs: Sequence[str]) -> None:
    """Refuse a destination that is a source, lies inside one, or holds one (local paths and URLs)."""
    d = _location(str(dst))
    for s in srcs:
        loc = _location(str(s))
        if loc == d:
            raise CacheError(f"the destination {dst} is also a source; write to a new location")
        if d[: len(loc)] == loc:
            raise CacheError(f"the destination {dst} is inside the source {s}; write to a location outside it")
        if loc[: len(d)] == d:
            raise CacheError(f"the source {s} is inside the destination {dst}; write to a location outside it")


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass(frozen=True)
class _Place:
    """One end of a copy: its URL, fsspec filesystem and root path; storage errors name the URL."""

    url: str
    fs: Any
    root: str

    @classmethod
    def open(cls, url: str, storage_options: dict | None) -> _Place:
        with storage_errors(url):
            return cls(url, *_filesystem(url, storage_options))

    def listing(self) -> dict[str, int]:
        """Relative key -> size of every object there."""
        with storage_errors(self.url):
            return _listing(self.fs, self.root)

    def read(self, rel: str) -> bytes:
        with storage_errors(self.url):
            return self.fs.cat_file(f"{self.root}/{rel}")

    def write(self, rel: str, data: bytes) -> None:
        _write_verified(self.fs, f"{self.root}/{rel}", data, self.url)

    def same(self, other: _Place, rel: str) -> bool:
        """Whether ``rel`` holds the same bytes here and at ``other`` (False when it is missing there)."""
        try:
            return _digest(self.fs.cat_file(f"{self.root}/{rel}")) == _digest(other.fs.cat_file(f"{other.root}/{rel}"))
        except FileNotFoundError:
            return False


@dataclass
class _Tally:
    """Bytes and objects done so far, reported to a ``progress(bytes, total_bytes, objects, total)`` callback."""

    total_bytes: int
    total_objects: int
    progress: Callable[[int, int, int, int], None] | None
    bytes_done: int = 0
    objects_done: int = 0

    def add(self, nbytes: int) -> None:
        """One more object done, of ``nbytes`` bytes."""
        self.bytes_done += nbytes
        self.objects_done += 1
        if self.progress is not None:
            self.progress(self.bytes_done, self.total_bytes, self.objects_done, self.total_objects)


def copy_cache(
    src: str,
    dst: str,
    *,
    storage_options: dict | None = None,
    dst_storage_options: dict | None = None,
    overwrite: bool = False,
    checksum: bool = False,
    workers: int = 8,
    progress: Callable[[int, int, int, int], None] | None = None,
) -> CopyReport:
    """Copy a cache between two locations (local path or fsspec URL each), resumably.

    Args:
        src: the cache to copy.
        dst: where to put it; a partial copy there is continued.
        storage_options: fsspec options for ``src`` (and ``dst`` unless ``dst_storage_options``).
        dst_storage_options: fsspec options for ``dst``.
        overwrite: replace a *different* cache, or another zarr store, at ``dst`` (files that are
            neither a zarr store nor part of a partial copy of ``src`` are never deleted).
        checksum: compare every object already at ``dst`` by content, not only by size (repairs a
            damaged copy: objects whose bytes differ are copied again).
        workers: objects copied in parallel.
        progress: ``progress(bytes_done, bytes_total, objects_done, objects_total)``.

    Raises:
        ConfigMismatchError: ``dst`` holds another cache and ``overwrite`` is False.
        NotACacheError: ``dst`` holds files that are not (a partial copy of) this cache.
        CacheError: ``dst`` is ``src``, lies inside it or holds it.
        CacheWriteError: ``dst`` cannot be written, or an object read back differs.
    """
    t0 = time.perf_counter()
    src, dst = str(src), str(dst)
    _refuse_same(dst, [src])
    check_writable(dst)
    dst_opts = storage_options if dst_storage_options is None else dst_storage_options
    reader = open_cache(src, storage_options=storage_options, allow_incomplete=True)
    if src.startswith(("http://", "https://")):
        raise CacheError(
            f"cannot copy from {src}: plain HTTP cannot list a store's objects; copy from the location "
            "the web server publishes, or read the cache over HTTP directly"
        )
    source = _Place.open(src, storage_options)
    objects = source.listing()
    if "zarr.json" not in objects:
        raise NotACacheError(f"{src} has no root zarr.json; nothing to copy")
    dest = _Place.open(dst, dst_opts)
    existing = dest.listing()
    root_doc = source.read("zarr.json")
    existing = _clear_destination(source, dest, root_doc, objects, existing, dst_opts, overwrite)
    todo, skipped = _plan_copy(source, dest, objects, existing, checksum)
    tally = _Tally(sum(objects.values()), len(objects), progress, sum(objects[r] for r in skipped), len(skipped))
    copied_bytes = _copy_objects(source, dest, todo, workers, tally)
    # last: the root document that makes the destination a cache
    if existing.get("zarr.json") == objects["zarr.json"] and "zarr.json" in existing:
        skipped.append("zarr.json")
    else:
        dest.write("zarr.json", root_doc)
        copied_bytes += len(root_doc)
        todo.append("zarr.json")
    tally.add(objects["zarr.json"])
    if open_cache(dst, storage_options=dst_opts, allow_incomplete=True).schema != reader.schema:
        raise CacheWriteError(f"the copy at {dst} does not describe the same cache as {src}")
    return CopyReport(
        src=src,
        dst=dst,
        objects=len(objects),
        copied=len(todo),
        skipped=len(skipped),
        bytes_copied=copied_bytes,
        bytes_skipped=sum(objects[r] for r in skipped),
        verified=len(todo),
        seconds=time.perf_counter() - t0,
    )


def _clear_destination(
    source: _Place,
    dest: _Place,
    root_doc: bytes,
    objects: dict[str, int],
    existing: dict[str, int],
    opts: dict | None,
    overwrite: bool,
) -> dict[str, int]:
    """What of ``existing`` can stay: all of a partial copy; nothing of another store, which is
    removed with ``overwrite`` and refused without it. Files skd did not write are always refused."""
    if "zarr.json" in existing:
        if dest.read("zarr.json") == root_doc:
            return existing
        if not _is_cache(dest.url, opts) and not overwrite:
            raise NotACacheError(
                f"{dest.url} holds a zarr store that is not an skd cache; refusing to write there: choose another "
                f"destination, or pass --overwrite to delete everything at {dest.url}"
            )
        if not overwrite:
            raise ConfigMismatchError(
                f"{dest.url} already holds a different cache (or another state of this one); "
                "pass --overwrite to replace it"
            )
        with storage_errors(dest.url, writing=True):
            remove_store(dest.url, opts)
        return {}
    if existing:
        strangers = sorted(set(existing) - set(objects))
        if strangers:
            raise NotACacheError(
                f"{dest.url} holds files that are not part of {source.url} (e.g. {strangers[0]}); refusing to "
                "write there: choose another destination (skd never deletes files it did not write)"
            )
        logger.info("%s: continuing a partial copy (%d objects there)", dest.url, len(existing))
    return existing


def _plan_copy(
    source: _Place, dest: _Place, objects: dict[str, int], existing: dict[str, int], checksum: bool
) -> tuple[list[str], list[str]]:
    """(objects to copy, objects already there) in key order, the root document in neither.

    An object of the same size is already there; a small one (or any, with ``checksum``) only
    when its bytes are equal too.
    """
    todo, skipped = [], []
    for rel, size in sorted(objects.items()):
        if rel == "zarr.json":
            continue
        small = size <= _SMALL or checksum
        if existing.get(rel) == size and (not small or source.same(dest, rel)):
            skipped.append(rel)
        else:
            todo.append(rel)
    return todo, skipped


def _copy_objects(source: _Place, dest: _Place, todo: list[str], workers: int, tally: _Tally) -> int:
    """Copy ``todo`` in parallel, every object read back and compared; returns the bytes copied."""

    def one(rel: str) -> int:
        data = source.read(rel)
        dest.write(rel, data)
        return len(data)

    copied = 0
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        for n in pool.map(one, todo):
            copied += n
            tally.add(n)
    return copied


def _is_cache(url: str, storage_options: dict | None) -> bool:
    try:
        open_cache(url, storage_options=storage_options, allow_incomplete=True)
    except CacheError:
        return False
    return True


def _write_verified(fs: Any, path: str, data: bytes, url: str, attempts: int = 3) -> None:
    """Write one object, read it back, compare size and hash; retry a mismatch a few times."""
    want = _digest(data)
    for attempt in range(attempts):
        with storage_errors(url, writing=True):
            fs.pipe_file(path, data)
        with storage_errors(url):
            back = fs.cat_file(path)
        if len(back) == len(data) and _digest(back) == want:
            return
        logger.warning(
            "%s: read back %d bytes that differ from the %d written (attempt %d)",
            path,
            len(back),
            len(data),
            attempt + 1,
        )
    raise CacheWriteError(f"cannot write {url}: {path} reads back different bytes than were written")


# ------------------------------------------------------------------------------------------------
# subset and merge: a new store from some images of one or more stores


@dataclass
class WriteReport:
    """What :func:`subset_cache` / :func:`merge_caches` wrote."""

    dst: str
    sources: list[str]
    images: int
    entries: int
    shards: int
    shards_written: int
    resumed: bool
    bytes_encoded: int
    seconds: float
    schema: CacheSchema

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "schema"}
        d["fidelity"] = dict(self.schema.fidelity)
        d["splits"] = list(self.schema.dataset.splits)
        return d


def select_images(
    ids: Sequence[str],
    *,
    split: str | None = None,
    wanted: Sequence[str] | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> list[int]:
    """Indices (sorted) of the images to keep: one of a split (the id's first path component), a
    list of ids, or a random fraction.

    Raises:
        SchemaMismatchError: nothing matches, or a wanted id is not in the cache.
    """
    given = [x is not None for x in (split, wanted, fraction)]
    if sum(given) != 1:
        raise CacheError("choose exactly one of --split, --ids and --fraction")
    if split is not None:
        keep = [i for i, s in enumerate(ids) if s.split("/", 1)[0] == split]
        if not keep:
            have = sorted({s.split("/", 1)[0] for s in ids})
            raise SchemaMismatchError(
                f"no image of split {split!r} in the cache (its ids start with: {', '.join(have)})"
            )
        return keep
    if wanted is not None:
        index = {s: i for i, s in enumerate(ids)}
        keep_set = set()
        for s in wanted:
            if s not in index:
                raise SchemaMismatchError(f"image id {s!r} is not in the cache")
            keep_set.add(index[s])
        if not keep_set:
            raise SchemaMismatchError("the id list is empty")
        return sorted(keep_set)
    assert fraction is not None
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1 and math.isfinite(fraction)):
        raise CacheError(f"--fraction must be in (0, 1], got {fraction!r}")
    n = max(1, round(fraction * len(ids)))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(len(ids), size=n, replace=False))


@dataclass(frozen=True)
class _Source:
    """One image of the new store: which reader holds it, at which image index."""

    reader: CacheReader
    image: int


def _new_schema(
    base: CacheSchema, ids: list[str], splits: tuple[str, ...], shard_images: int, build: dict
) -> CacheSchema:
    k = base.entries_per_image
    dataset = replace(base.dataset, splits=splits, num_images=len(ids), ids_sha256=ids_digest(ids))
    return replace(
        base,
        dataset=dataset,
        num_entries=len(ids) * k,
        shard_entries=max(1, min(shard_images, len(ids))) * k,
        id_bytes=max(16, max(len(s.encode()) for s in ids)),
        status="building",
        fidelity={},
        build=build,
        completed=None,
    )


def _write_store(
    dst: str,
    schema: CacheSchema,
    picks: list[_Source],
    *,
    sources: list[str],
    dst_storage_options: dict | None,
    overwrite: bool,
    workers: int,
    progress: Callable[[int, int], None] | None,
    t0: float,
) -> WriteReport:
    """Write the store ``schema`` describes at ``dst``, image ``j`` copied from ``picks[j]``; or resume it."""
    ids, sizes, views, grids = _layout(picks)
    for p in picks:  # every copied entry must exist: refuse before anything is written
        if not p.reader.done[list(p.reader.entries_of_image(p.image))].all():
            raise IncompleteCacheError(
                f"image {p.reader.image_ids[p.image]!r} of {p.reader.url} was never fully written; "
                "finish (resume) that build first"
            )
    writer, resumed = prepare_cache(
        dst,
        schema,
        image_ids=ids,
        image_sizes=np.asarray(sizes, dtype=np.int64),
        views=views,
        grids=np.asarray(grids, dtype=np.int64),
        feature_codec=picks[0].reader.feature_codec,  # its tables (a pca basis) go along
        overwrite=overwrite,
        storage_options=dst_storage_options,
    )
    if writer.schema.status == "complete":
        # nothing to do: finalising again would rewrite the provenance and the root document
        return _report(dst, sources, writer.schema, 0, resumed, 0, t0)
    pending = writer.pending_shards()
    paths = list(_data_arrays(writer.schema))
    entries_done = schema.num_entries - len(pending) * schema.shard_entries
    nbytes = 0
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        written = pool.map(lambda shard: _copy_shard(writer, picks, paths, shard), pending)
        for shard, n in zip(pending, written, strict=True):
            a, b = writer.schema.shard_range(shard)
            entries_done += b - a
            nbytes += n
            if progress is not None:
                progress(entries_done, schema.num_entries)
    return _report(dst, sources, writer.finalize(), len(pending), resumed, nbytes, t0)


def _layout(picks: list[_Source]) -> tuple[list[str], list[np.ndarray], list[View], list[np.ndarray]]:
    """Image ids, image sizes, views (renumbered to the new image order) and grids of the new store."""
    ids, sizes, views, grids = [], [], [], []
    for j, p in enumerate(picks):
        r = p.reader
        ids.append(r.image_ids[p.image])
        sizes.append(r.image_sizes[p.image])
        for e in r.entries_of_image(p.image):
            v = r.view(e)
            views.append(View(j, v.scale, v.resized, v.box, v.flip))
            grids.append(r.entry_grid[e])
    return ids, sizes, views, grids


def _runs(chosen: list[_Source], k: int) -> list[tuple[CacheReader, int, int]]:
    """``chosen`` as contiguous entry ranges ``(reader, start, stop)`` of one source each."""
    runs: list[tuple[CacheReader, int, int]] = []
    for p in chosen:
        e0, e1 = p.image * k, (p.image + 1) * k
        if runs and runs[-1][0] is p.reader and runs[-1][2] == e0:
            runs[-1] = (p.reader, runs[-1][1], e1)
        else:
            runs.append((p.reader, e0, e1))
    return runs


def _copy_shard(writer: Any, picks: list[_Source], paths: list[str], shard: int) -> int:
    """Write one shard of the new store from its sources' encoded parts, each entry checked against
    its checksum; one slice read per part and contiguous run. Returns the bytes written."""
    k = writer.schema.entries_per_image
    a, b = writer.schema.shard_range(shard)
    values: dict[str, list[np.ndarray]] = {p: [] for p in paths}
    rows: dict[str, list[np.ndarray]] = {}
    for r, e0, e1 in _runs(picks[a // k : b // k], k):
        with storage_errors(r.url):
            got = {p: np.asarray(r.array(p)[e0:e1]) for p in paths}
            run_rows = {
                t: r.array(t)[e0:e1] for t in (Arrays.ENTRY_CHECKSUM, Arrays.ENTRY_FIDELITY, Arrays.ENTRY_CLIPPED)
            }
            run_rows[Arrays.IMAGE_SHA256] = r.array(Arrays.IMAGE_SHA256)[e0 // k : e1 // k]
        _check_run(r, e0, got, run_rows[Arrays.ENTRY_CHECKSUM])
        for p in paths:
            values[p].append(got[p])
        for t, v in run_rows.items():
            rows.setdefault(t, []).append(v)
    stacked = {p: np.concatenate(v) for p, v in values.items()}
    table = {t: np.concatenate(v) for t, v in rows.items()}
    return writer.write_shard(
        shard,
        logits={p.split("/", 1)[1]: v for p, v in stacked.items() if p.startswith(Arrays.LOGITS + "/")},
        features={p.split("/", 1)[1]: v for p, v in stacked.items() if p.startswith(Arrays.FEATURES + "/")} or None,
        image_sha256=table[Arrays.IMAGE_SHA256],
        checksums=table[Arrays.ENTRY_CHECKSUM].astype(np.uint64),
        fidelity=table[Arrays.ENTRY_FIDELITY],
        clipped=table[Arrays.ENTRY_CLIPPED],
    )


def _check_run(r: CacheReader, e0: int, got: dict[str, np.ndarray], want: np.ndarray) -> None:
    """Refuse to copy an entry of ``got`` (entries ``e0...`` of ``r``) that does not match its checksum."""
    for j in range(len(want)):
        parts: dict[str, dict[str, np.ndarray]] = {}
        for p, v in got.items():
            target, name = p.split("/", 1)
            parts.setdefault(target, {})[name] = v[j]
        if entry_checksum(parts) != int(want[j]):
            image_id = r.image_ids[int(r.entry_image[e0 + j])]
            raise CorruptEntryError(
                f"entry {e0 + j} ({image_id}) of {r.url} does not match its checksum; "
                f"run `skdcache verify {r.url}` and rebuild that shard"
            )


def _report(
    dst: str, sources: list[str], final: CacheSchema, written: int, resumed: bool, nbytes: int, t0: float
) -> WriteReport:
    return WriteReport(
        dst=dst,
        sources=sources,
        images=final.num_images,
        entries=final.num_entries,
        shards=final.num_shards,
        shards_written=written,
        resumed=resumed,
        bytes_encoded=nbytes,
        seconds=time.perf_counter() - t0,
        schema=final,
    )


def subset_cache(
    src: str,
    dst: str,
    *,
    split: str | None = None,
    ids: Sequence[str] | None = None,
    fraction: float | None = None,
    seed: int = 0,
    storage_options: dict | None = None,
    dst_storage_options: dict | None = None,
    shard_images: int | None = None,
    overwrite: bool = False,
    workers: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> WriteReport:
    """Write a new cache holding some images of ``src`` (exactly one of ``split``, ``ids``, ``fraction``).

    The encoded parts are copied as they are; the schema's dataset stamp (splits, image count, ids
    digest) describes the subset, shards are laid out for it (``shard_images`` images each, default
    the source's) and the fidelity summary is recomputed from the copied rows.

    Args:
        split: keep the images whose id starts with ``split/``.
        ids: keep these image ids.
        fraction: keep a random fraction of the images, drawn with ``seed``.
        progress: ``progress(entries_done, entries_total)``.

    Raises:
        SchemaMismatchError: the selection is empty or names ids the cache does not hold.
        IncompleteCacheError / CorruptEntryError: a selected entry is not written or fails its checksum.
    """
    t0 = time.perf_counter()
    _refuse_same(str(dst), [src])
    check_writable(str(dst))
    r = open_cache(src, storage_options=storage_options)
    keep = select_images(r.image_ids, split=split, wanted=ids, fraction=fraction, seed=seed)
    kept_ids = [r.image_ids[i] for i in keep]
    if split is not None:
        splits: tuple[str, ...] = (split,)
    else:
        present = {s.split("/", 1)[0] for s in kept_ids}
        splits = tuple(s for s in r.schema.dataset.splits if s in present) or r.schema.dataset.splits
    how = (
        {"split": split}
        if split is not None
        else ({"ids": len(kept_ids)} if ids is not None else {"fraction": fraction, "seed": seed})
    )
    build = dict(r.schema.build)
    build["derived_from"] = {"operation": "subset", "source": str(src), **how}
    schema = _new_schema(r.schema, kept_ids, splits, shard_images or r.schema.shard_images, build)
    return _write_store(
        str(dst),
        schema,
        [_Source(r, i) for i in keep],
        sources=[str(src)],
        dst_storage_options=storage_options if dst_storage_options is None else dst_storage_options,
        overwrite=overwrite,
        workers=workers,
        progress=progress,
        t0=t0,
    )


def _merge_key(schema: CacheSchema) -> dict:
    """What must agree between the parts of one cache (all but the image lists and the layout)."""
    d = schema.content_key()
    for k in ("num_entries", "shard_entries", "id_bytes"):
        d.pop(k, None)
    for k in ("splits", "num_images", "ids_sha256"):
        d["dataset"].pop(k, None)
    return d


def merge_caches(
    dst: str,
    srcs: Sequence[str],
    *,
    storage_options: dict | None = None,
    dst_storage_options: dict | None = None,
    shard_images: int | None = None,
    overwrite: bool = False,
    workers: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> WriteReport:
    """Merge caches built in parts (same teacher and configuration, disjoint images) into one.

    The merged store holds the images of every part sorted by id (the order a dataset lists them),
    so a cache built in parts equals, entry for entry, one built in one go.

    Raises:
        ConfigMismatchError: two parts differ in anything but their image lists (the message names
            the first difference), or a ``pca`` basis differs.
        SchemaMismatchError: an image id is in two parts.
    """
    t0 = time.perf_counter()
    if len(srcs) < 2:
        raise CacheError("merge needs at least two source caches")
    _refuse_same(str(dst), srcs)
    check_writable(str(dst))
    readers = [open_cache(s, storage_options=storage_options) for s in srcs]
    first = readers[0]
    key = _merge_key(first.schema)
    for src, r in zip(srcs[1:], readers[1:], strict=True):
        diff = first_difference(key, _merge_key(r.schema))
        if diff:
            raise ConfigMismatchError(
                f"cannot merge {src} with {srcs[0]}: they were built with different configurations ({diff})"
            )
        if r.schema.features is not None and r.schema.features.codec == "pca":
            for p in (Arrays.PCA_BASIS, Arrays.PCA_MEAN):
                if not np.array_equal(first.array(p)[...], r.array(p)[...]):
                    raise ConfigMismatchError(
                        f"cannot merge {src} with {srcs[0]}: their {p} differ (separate PCA fits)"
                    )
    owner: dict[str, tuple[str, _Source]] = {}
    for src, r in zip(srcs, readers, strict=True):
        for i, image_id in enumerate(r.image_ids):
            if image_id in owner:
                raise SchemaMismatchError(
                    f"image id {image_id!r} is in both {owner[image_id][0]} and {src}; the parts must not overlap"
                )
            owner[image_id] = (src, _Source(r, i))
    ids = sorted(owner)
    splits: list[str] = []
    for r in readers:
        splits += [s for s in r.schema.dataset.splits if s not in splits]
    builds = [r.schema.build for r in readers]
    build = dict(builds[0])
    build["seconds"] = float(sum(float(b.get("seconds") or 0.0) for b in builds))
    devices = sorted({str(b.get("device")) for b in builds if b.get("device")})
    if devices:
        build["device"] = ", ".join(devices)
    build["derived_from"] = {"operation": "merge", "sources": [str(s) for s in srcs]}
    schema = _new_schema(
        first.schema, ids, tuple(splits), shard_images or max(r.schema.shard_images for r in readers), build
    )
    return _write_store(
        str(dst),
        schema,
        [owner[i][1] for i in ids],
        sources=[str(s) for s in srcs],
        dst_storage_options=storage_options if dst_storage_options is None else dst_storage_options,
        overwrite=overwrite,
        workers=workers,
        progress=progress,
        t0=t0,
    )
