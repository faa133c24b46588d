"""Check a whole cache: every entry decodes and matches its build-time checksum (``skdcache verify``).

The scan is one dask task per shard (a shard is the unit the build writes). A task opens the store
itself, fetches each data part's shard object whole, reads the shard index to find entries whose
chunk is missing, decodes the chunks from memory and compares
:func:`~cache_tools.store.entry_checksum` of every entry with ``entries/checksum``. Problems are
reported by image id:

* **missing** -- the entry's done marker is unset (its build never wrote it);
* **partial** -- marked done, but a shard object or an inner chunk is missing from the store (and
  the fill value it reads as is not what was written: the checksum tells);
* **corrupt** -- a chunk does not decode (zstd frame checksum, shard index crc) or the decoded parts
  do not match the checksum written at build time.

With a dataset root it also recomputes the sha256 of every image file (``images/sha256``), and
checks that every id of the cache is an image of the dataset, resolved through
:meth:`~cache_tools.datasets.SegDataset.resolve_id` (an id that tries to leave the dataset root is
reported, never opened).

dask is imported here and nowhere else in ``cache_tools``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import CacheError, DatasetError
from .schema import Arrays
from .store import CacheReader, _data_arrays, entry_checksum, open_cache

__all__ = ["Problem", "VerifyReport", "verify_cache"]

_MAX_U64 = 2**64 - 1


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one image (``entry`` is None for image-file problems)."""

    image_id: str
    kind: str
    reason: str
    entry: int | None = None


@dataclass
class VerifyReport:
    """What :func:`verify_cache` found.

    The id lists hold each image once per kind, sorted; ``problems`` has the details (entry and
    reason). Image-file kinds (with a dataset): ``fingerprint`` (the file is not the one the cache
    was built from), ``not_in_dataset``, ``unsafe_id`` (an id that is not a plain relative path),
    ``unreadable``, ``unrecorded`` (the cache holds no fingerprint for a written image).
    """

    url: str
    status: str
    mode: str
    num_images: int
    num_entries: int
    num_shards: int
    entries_ok: int = 0
    missing: list[str] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    dataset_root: str | None = None
    images_checked: int = 0
    fingerprint: list[str] = field(default_factory=list)
    not_in_dataset: list[str] = field(default_factory=list)
    unsafe_id: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    unrecorded: list[str] = field(default_factory=list)
    dataset_extra: int = 0
    problems: list[Problem] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0

    _KINDS = ("missing", "partial", "corrupt", "fingerprint", "not_in_dataset", "unsafe_id", "unreadable", "unrecorded")

    @property
    def sound(self) -> bool:
        """True when every entry is written and intact (and, with a dataset, every image matches)."""
        return self.status == "complete" and not any(getattr(self, k) for k in self._KINDS)

    def summary(self) -> str:
        """One line for people."""
        what = f"{self.num_entries} entries of {self.num_images} images"
        if self.sound:
            line = f"sound: {what} decode and match their checksums"
            if self.dataset_root is not None:
                line += f"; {self.images_checked} image files match their fingerprints"
            return line
        parts = []
        for kind, label in (
            ("missing", "missing"),
            ("partial", "partial"),
            ("corrupt", "corrupt"),
            ("fingerprint", "changed image file(s)"),
            ("not_in_dataset", "id(s) not in the dataset"),
            ("unsafe_id", "unsafe id(s)"),
            ("unreadable", "unreadable image file(s)"),
            ("unrecorded", "image(s) without a recorded fingerprint"),
        ):
            ids = getattr(self, kind)
            if ids:
                shown = ", ".join(ids[:3]) + (f", … (+{len(ids) - 3})" if len(ids) > 3 else "")
                parts.append(f"{len(ids)} {label} ({shown})")
        if self.status != "complete" and not (self.missing or self.partial or self.corrupt):
            parts.append(f"the store is not finalised (status {self.status})")
        return f"NOT sound: {'; '.join(parts)} — {self.entries_ok}/{self.num_entries} entries intact"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sound"] = self.sound
        d["summary"] = self.summary()
        return d


# ------------------------------------------------------------------------------------------------
# the per-shard task (runs in a dask worker; opens the store itself)


@dataclass(frozen=True)
class _Job:
    """What a task needs to open the store and the dataset by itself (plain, picklable values)."""

    token: str
    url: str
    storage_options: str  # JSON
    cache_dir: str | None
    dataset_root: str | None
    splits: tuple[str, ...]


@dataclass
class _ShardResult:
    shard: int
    entries: int
    entries_ok: int = 0
    bytes_read: int = 0
    images_checked: int = 0
    problems: list[Problem] = field(default_factory=list)


_OPEN: dict[tuple[str, str], Any] = {}
_OPEN_LOCK = threading.Lock()


def _opened(job: _Job, what: str) -> Any:
    """The reader (or dataset) of this run, opened once per worker process."""
    key = (job.token, what)
    with _OPEN_LOCK:
        if key not in _OPEN:
            if what == "reader":
                _OPEN[key] = open_cache(
                    job.url,
                    storage_options=json.loads(job.storage_options),
                    cache_dir=job.cache_dir,
                    allow_incomplete=True,
                )
            else:
                from .datasets import open_dataset

                _OPEN[key] = open_dataset(job.dataset_root, splits=job.splits)  # type: ignore[arg-type]
        return _OPEN[key]


def _forget(token: str) -> None:
    with _OPEN_LOCK:
        for key in [k for k in _OPEN if k[0] == token]:
            del _OPEN[key]


def _entry_chunks(meta: dict) -> int | None:
    """Inner chunks per shard when each holds exactly one entry (our layout), else None."""
    try:
        shard = list(meta["chunk_grid"]["configuration"]["chunk_shape"])
        inner = list(meta["codecs"][0]["configuration"]["chunk_shape"])
        shape = list(meta["shape"])
    except (KeyError, IndexError, TypeError):
        return None
    if len(inner) != len(shape) or inner[0] != 1 or inner[1:] != shape[1:] or shard[1:] != shape[1:]:
        return None
    return int(shard[0])


def _shard_index(meta: dict, data: bytes, n_chunks: int) -> np.ndarray | None:
    """(n_chunks, 2) offsets and lengths from a shard's index, or None when our layout does not apply.

    Raises:
        ValueError: the index is damaged (its crc32c does not match, or it points outside the object).
    """
    codecs = meta.get("codecs") or []
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None
    conf = codecs[0].get("configuration") or {}
    names = [c.get("name") for c in conf.get("index_codecs") or []]
    endian = ((conf.get("index_codecs") or [{}])[0].get("configuration") or {}).get("endian", "little")
    if names != ["bytes", "crc32c"] or endian != "little":
        return None
    size = 16 * n_chunks + 4
    if len(data) < size:
        raise ValueError(f"the shard object is {len(data)} bytes, shorter than its index")
    raw = data[:size] if conf.get("index_location") == "start" else data[-size:]
    import google_crc32c

    if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise ValueError("the shard index fails its crc32c check")
    index = np.frombuffer(raw[:-4], dtype="<u8").reshape(n_chunks, 2)
    present = index[:, 0] != _MAX_U64
    ends = index[present, 0] + index[present, 1]
    if ends.size and int(ends.max()) > len(data):
        raise ValueError("the shard index points past the end of the object")
    return index


def _decode_shard(arr: Any, key: str, data: bytes, start: int, stop: int) -> tuple[list[Any], dict[int, str]]:
    """Decode entries [start, stop) of one shard object held in memory.

    Returns the value of each entry (None where it fails) and, for the entries that fail, why.
    """
    import zarr
    from zarr.core.buffer import default_buffer_prototype

    proto = default_buffer_prototype()
    meta = arr.metadata.to_buffer_dict(proto)["zarr.json"]
    store = zarr.storage.MemoryStore({"zarr.json": meta, key: proto.buffer.from_bytes(data)})
    mem = zarr.open_array(store, mode="r", zarr_format=3)
    try:
        return list(np.asarray(mem[start:stop])), {}
    except Exception:  # noqa: BLE001 - any decode failure: one bad chunk spoils the whole read, find which
        values: list[Any] = []
        failed = {}
        for e in range(start, stop):
            try:
                values.append(np.asarray(mem[e]))
            except Exception as exc:  # noqa: BLE001 - reported as this entry's corruption
                values.append(None)
                text = str(exc).splitlines()[0] if str(exc) else ""
                failed[e] = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        return values, failed


def _fetch(reader: CacheReader, keys: list[str]) -> list[bytes | None]:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    store = reader.group.store
    proto = default_buffer_prototype()

    async def get_all():
        return await asyncio.gather(*(store.get(k, proto) for k in keys))

    bufs = sync(get_all())
    return [None if b is None else b.to_bytes() for b in bufs]


def _verify_shard(job: _Job, shard: int) -> _ShardResult:
    r: CacheReader = _opened(job, "reader")
    out, keys = _scan_shard(job, r, shard)
    forget = getattr(r.group.store, "forget", None)
    if forget is not None and any(p.kind in ("partial", "corrupt") for p in out.problems) and forget(keys):
        # local copies of a read-through cache: what was found may be stale (the origin repaired
        # since); look at the origin's objects again
        out, _ = _scan_shard(job, r, shard)
    if job.dataset_root is not None:
        out.problems.extend(_check_images(job, r, shard, r.done[slice(*r.schema.shard_range(shard))], out))
    return out


def _wanted_checksums(job: _Job, r: CacheReader, a: int, b: int, flag: Callable) -> np.ndarray | None:
    """Checksums of entries [a, b) as the store records them; None (every done entry flagged) if unreadable."""
    from .storage import storage_errors

    try:
        with storage_errors(job.url):
            return r.array(Arrays.ENTRY_CHECKSUM)[a:b]
    except CacheError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged table: every entry of the shard is unverifiable
        for e in range(a, b):
            if r.done[e]:
                flag(e, "corrupt", f"its checksum in entries/checksum does not decode ({type(exc).__name__})")
        return None


def _scan_shard(job: _Job, r: CacheReader, shard: int) -> tuple[_ShardResult, list[str]]:
    """Decode every done entry of one shard and compare it with its checksum; returns the keys read.

    A chunk that is missing reads as the fill value, which is sound only where the entry's checksum
    says the fill value is what was written (an all-zero chunk a writer skipped); otherwise the
    entry is *partial*.
    """
    from .storage import storage_errors

    s = r.schema
    a, b = s.shard_range(shard)
    out = _ShardResult(shard=shard, entries=b - a)
    ids = r.image_ids
    done = r.done[a:b]
    bad: dict[int, Problem] = {}
    absent: dict[int, str] = {}

    def flag(e: int, kind: str, reason: str) -> None:
        if e not in bad:
            bad[e] = Problem(ids[int(r.entry_image[e])], kind, reason, e)

    want = _wanted_checksums(job, r, a, b, flag)
    for e in range(a, b):
        if not done[e - a]:
            flag(e, "missing", "never written (its done marker is unset)")
    parts: dict[str, dict[str, list[Any]]] = {}
    todo = [e for e in range(a, b) if done[e - a]]
    paths = list(_data_arrays(s))
    arrays = [r.array(p) for p in paths]
    keys = [f"{arr.path}/{arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))}" for arr in arrays]
    if todo:
        with storage_errors(job.url):
            blobs = _fetch(r, keys)
        for path, arr, key, data in zip(paths, arrays, keys, blobs, strict=True):
            target, name = path.split("/", 1)
            if data is None:
                fill = np.full(arr.shape[1:], arr.metadata.fill_value, dtype=arr.dtype)
                parts.setdefault(target, {})[name] = [fill] * (b - a)
                for e in todo:
                    absent.setdefault(e, f"the shard object {key} is missing")
                continue
            out.bytes_read += len(data)
            meta = arr.metadata.to_dict()
            n_chunks = _entry_chunks(meta)
            try:
                index = None if n_chunks is None else _shard_index(meta, data, n_chunks)
            except ValueError as exc:
                for e in todo:
                    flag(e, "corrupt", f"{key}: {exc}")
                continue
            if index is not None:
                for e in todo:
                    if e - a < len(index) and index[e - a, 0] == _MAX_U64:
                        absent.setdefault(e, f"its chunk of {path} is missing from the shard")
            values, failed = _decode_shard(arr, key[len(arr.path) + 1 :], data, a, b)
            for e, why in failed.items():
                if done[e - a]:
                    flag(e, "corrupt", f"{path} does not decode ({why})")
            parts.setdefault(target, {})[name] = values
        for e in todo:
            if e in bad:
                continue
            entry = {t: {n: v[e - a] for n, v in p.items()} for t, p in parts.items()}
            if want is None or entry_checksum(entry) != int(want[e - a]):
                if e in absent:
                    flag(e, "partial", absent[e])
                else:
                    flag(e, "corrupt", "the decoded parts do not match the checksum written at build time")
            else:
                out.entries_ok += 1
    out.problems.extend(bad[e] for e in sorted(bad))
    return out, keys


def _check_images(job: _Job, r: CacheReader, shard: int, done: np.ndarray, out: _ShardResult) -> list[Problem]:
    from .datasets import check_id, fingerprint

    ds = _opened(job, "dataset")
    k = r.schema.entries_per_image
    a, b = r.schema.shard_range(shard)
    recorded = r.image_sha256()[a // k : b // k]  # hex, "" where not written
    found = []
    for j, img in enumerate(range(a // k, b // k)):
        image_id = r.image_ids[img]
        try:
            check_id(image_id)
        except DatasetError as exc:
            found.append(Problem(image_id, "unsafe_id", str(exc)))
            continue
        try:
            ds.resolve_id(image_id)
        except DatasetError as exc:
            kind = "unsafe_id" if "outside" in str(exc) else "not_in_dataset"
            found.append(Problem(image_id, kind, str(exc)))
            continue
        try:
            data = ds.read_image_bytes(image_id)
        except DatasetError as exc:
            found.append(Problem(image_id, "unreadable", str(exc)))
            continue
        out.images_checked += 1
        written = bool(done[j * k : (j + 1) * k].any())
        if not recorded[j]:
            if written:
                found.append(Problem(image_id, "unrecorded", "the cache holds no fingerprint for this image"))
            continue
        have, want = fingerprint(data), recorded[j]
        if have != want:
            found.append(
                Problem(
                    image_id,
                    "fingerprint",
                    f"the image file's sha256 is {have[:16]}…, the cache was built from {want[:16]}…",
                )
            )
    return found


# ------------------------------------------------------------------------------------------------


def verify_cache(
    url: str,
    dataset_root: str | None = None,
    storage_options: dict | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    *,
    cache_dir: str | None = None,
    workers: int = 8,
    scheduler: str = "threads",
) -> VerifyReport:
    """Decode every entry of a cache and compare it with its build-time checksum.

    Args:
        url: the cache (path or fsspec URL).
        dataset_root: also check the image files' fingerprints (and that every id is in the dataset).
        storage_options: fsspec options for a remote URL.
        progress: called as ``progress(entries_done, entries_total, bytes_read)`` after each shard.
        cache_dir: local read-through cache for a remote store.
        workers: parallel shard tasks.
        scheduler: dask scheduler for the tasks ("threads", "sync" or "processes").

    Returns:
        The report; :attr:`VerifyReport.sound` tells whether the cache can be trusted.

    Raises:
        CacheError: the store cannot be opened at all (not a cache, unknown version, unsafe metadata,
            storage errors); DatasetError: the dataset root cannot be opened.
    """
    t0 = time.perf_counter()
    r = open_cache(url, storage_options=storage_options, cache_dir=cache_dir, allow_incomplete=True)
    s = r.schema
    report = VerifyReport(
        url=str(url),
        status=s.status,
        mode=s.mode,
        num_images=s.num_images,
        num_entries=s.num_entries,
        num_shards=s.num_shards,
        dataset_root=None if dataset_root is None else str(dataset_root),
    )
    job = _Job(
        token=uuid.uuid4().hex,
        url=str(url),
        storage_options=json.dumps(storage_options or {}),
        cache_dir=None if cache_dir is None else str(cache_dir),
        dataset_root=None if dataset_root is None else str(dataset_root),
        splits=tuple(s.dataset.splits),
    )
    opened: dict[tuple[str, str], Any] = {(job.token, "reader"): r}  # a threads scheduler's tasks share it
    if dataset_root is not None:
        from .datasets import open_dataset

        ds = open_dataset(dataset_root, splits=s.dataset.splits)
        report.dataset_extra = len(set(ds.ids) - set(r.image_ids))
        opened[(job.token, "dataset")] = ds
    with _OPEN_LOCK:
        _OPEN.update(opened)
    try:
        results = _run_shards(job, s.num_shards, s.num_entries, workers, scheduler, progress)
    finally:
        _forget(job.token)
    _add_results(report, results)
    report.seconds = time.perf_counter() - t0
    return report


def _add_results(report: VerifyReport, results: tuple[_ShardResult, ...]) -> None:
    """Add the shards' counts and problems (in shard order) and the sorted id list of each kind."""
    kinds: dict[str, set[str]] = {k: set() for k in VerifyReport._KINDS}
    for res in sorted(results, key=lambda x: x.shard):
        report.entries_ok += res.entries_ok
        report.bytes_read += res.bytes_read
        report.images_checked += res.images_checked
        report.problems.extend(res.problems)
        for p in res.problems:
            kinds[p.kind].add(p.image_id)
    for kind, found in kinds.items():
        setattr(report, kind, sorted(found))


def _run_shards(
    job: _Job,
    num_shards: int,
    num_entries: int,
    workers: int,
    scheduler: str,
    progress: Callable[[int, int, int], None] | None,
) -> tuple[_ShardResult, ...]:
    """One dask task per shard; ``progress(entries_done, entries_total, bytes_read)`` after each."""
    import dask
    from dask.callbacks import Callback

    state = {"entries": 0, "bytes": 0}
    lock = threading.Lock()

    class _Progress(Callback):
        def _posttask(self, key, result, dsk, state_, worker_id):
            if isinstance(result, _ShardResult):
                with lock:
                    state["entries"] += result.entries
                    state["bytes"] += result.bytes_read
                    if progress is not None:
                        progress(state["entries"], num_entries, state["bytes"])

    tasks = [dask.delayed(_verify_shard, pure=False)(job, shard) for shard in range(num_shards)]
    with _Progress():
        return dask.compute(*tasks, scheduler=scheduler, num_workers=max(1, int(workers)))
