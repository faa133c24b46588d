"""Create, resume, finalise and read cache stores.

Writers own whole shards: :meth:`CacheWriter.write_shard` writes every array of one shard in one
piece (zarr rewrites a whole shard object on any write into it, and two writers sharing a shard
lose data), then the shard's per-entry checksums and, last, its done markers. A killed build
therefore leaves complete shards plus some that are simply not done, and a resume redoes only
those.

Readers validate everything they are told by the store before they use it: the schema attribute,
every array's dtype and codec chain (an allow-list of standard zarr v3 codecs; never pickle or
object dtypes) and the shapes the schema implies.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import __version__
from .codecs import FeatureCodec, LogitCodec, Part
from .errors import (
    CacheError,
    CacheNotFoundError,
    ConfigMismatchError,
    CorruptEntryError,
    IncompleteCacheError,
    NotACacheError,
    SchemaError,
    SchemaMismatchError,
    UnsafeCacheError,
)
from .fidelity import summarize
from .schema import FIDELITY_COLUMNS, ROOT_ATTR, Arrays, CacheSchema, Compressor, View, first_difference
from .storage import is_remote, local_path, open_store, remove_store, storage_errors, url_exists

__all__ = [
    "ALLOWED_CODECS",
    "ALLOWED_DTYPES",
    "CacheEntry",
    "CacheReader",
    "CacheWriter",
    "entry_checksum",
    "open_cache",
    "prepare_cache",
]

logger = logging.getLogger(__name__)

ALLOWED_DTYPES = frozenset(
    [
        "bool",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "int8",
        "int16",
        "int32",
        "int64",
        "float16",
        "float32",
        "float64",
    ]
)
#: The largest metadata document (``zarr.json``) a reader parses; a store's root document with its
#: consolidated metadata is a few tens of KB.
MAX_DOCUMENT_BYTES = 16 * 2**20
#: Standard zarr v3 codecs a reader will run. Anything else (numcodecs.pickle, vlen codecs, ...) is refused.
ALLOWED_CODECS = frozenset(["bytes", "zstd", "blosc", "sharding_indexed", "crc32c", "transpose"])


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _compressors(comp: Compressor, dtype: str) -> list:
    from zarr.codecs import BloscCodec, ZstdCodec

    if comp.name == "none":
        return []
    if comp.name == "zstd":
        # the frame checksum makes a corrupt chunk fail to decode instead of decoding to garbage
        return [ZstdCodec(level=comp.level, checksum=True)]
    itemsize = np.dtype(dtype).itemsize
    shuffle = "shuffle" if itemsize > 1 else "noshuffle"
    cname = "lz4" if comp.name == "blosc-lz4" else "zstd"
    return [BloscCodec(cname=cname, clevel=comp.level, shuffle=shuffle, typesize=itemsize)]


def entry_checksum(parts: dict[str, dict[str, np.ndarray]]) -> int:
    """blake2b-64 over an entry's encoded parts (targets and parts in sorted order, little-endian)."""
    h = hashlib.blake2b(digest_size=8)
    for target in sorted(parts):
        for name in sorted(parts[target]):
            arr = np.ascontiguousarray(parts[target][name])
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            h.update(f"{target}/{name}:{arr.dtype.str}:{arr.shape}".encode())
            h.update(memoryview(arr.reshape(-1)).cast("B"))  # the bytes in place: no copy on the read path
    return int.from_bytes(h.digest(), "little")


def _encode_ids(ids: list[str], width: int) -> np.ndarray:
    out = np.zeros((len(ids), width), dtype=np.uint8)
    for i, s in enumerate(ids):
        b = s.encode("utf-8")
        out[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    return out


def _decode_ids(arr: np.ndarray) -> list[str]:
    out = []
    for row in arr:
        b = bytes(row).rstrip(b"\0")
        try:
            out.append(b.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise SchemaError("images/id holds bytes that are not UTF-8") from exc
    return out


def _feature_codec(schema: CacheSchema) -> FeatureCodec | None:
    """The features codec the schema describes, without its per-store tables."""
    return None if schema.features is None else FeatureCodec.from_layout(schema.features)


def _target_parts(schema: CacheSchema) -> dict[str, dict[str, Part]]:
    k = schema.logits.channels
    h, w = schema.logits.grid
    parts = {"logits": LogitCodec.from_params(schema.logits.codec, schema.logits.params).parts(k, h, w)}
    codec = _feature_codec(schema)
    if codec is not None:
        f = schema.features
        parts["features"] = codec.parts(f.channels, *f.cells)  # type: ignore[union-attr]
    return parts


def _table_arrays(schema: CacheSchema) -> dict[str, Part]:
    """Arrays a codec keeps once per store (the PCA basis and mean): path -> (shape, dtype)."""
    codec = _feature_codec(schema)
    if codec is None:
        return {}
    return {f"{Arrays.FEATURES}/{name}": part for name, part in codec.tables(schema.features.channels).items()}  # type: ignore[union-attr]


def _with_tables(schema: CacheSchema, read: Callable[[str], np.ndarray]) -> FeatureCodec | None:
    """The schema's features codec with the tables it keeps in the store, each read with ``read(path)``."""
    codec = _feature_codec(schema)
    if codec is None:
        return None
    return codec.with_tables({path.rsplit("/", 1)[1]: read(path) for path in _table_arrays(schema)})


def _static_arrays(schema: CacheSchema) -> dict[str, tuple[tuple[int, ...], str, tuple[int, ...]]]:
    """Every array of a store: path -> (shape, dtype, chunk shape). Data parts are sharded."""
    e, i, s = schema.num_entries, schema.num_images, schema.shard_entries
    si = schema.shard_images
    out = {
        Arrays.IMAGE_ID: ((i, schema.id_bytes), "uint8", (min(i, 4096), schema.id_bytes)),
        Arrays.IMAGE_SHA256: ((i, 32), "uint8", (si, 32)),
        Arrays.IMAGE_SIZE: ((i, 2), "int32", (min(i, 4096), 2)),
        Arrays.ENTRY_IMAGE: ((e,), "int32", (s,)),
        Arrays.ENTRY_SCALE: ((e,), "float32", (s,)),
        Arrays.ENTRY_RESIZED: ((e, 2), "int32", (s, 2)),
        Arrays.ENTRY_BOX: ((e, 4), "int32", (s, 4)),
        Arrays.ENTRY_FLIP: ((e,), "uint8", (s,)),
        Arrays.ENTRY_GRID: ((e, 2), "int32", (s, 2)),
        Arrays.ENTRY_DONE: ((e,), "uint8", (s,)),
        Arrays.ENTRY_CHECKSUM: ((e,), "uint64", (s,)),
        Arrays.ENTRY_FIDELITY: ((e, len(FIDELITY_COLUMNS)), "float32", (s, len(FIDELITY_COLUMNS))),
        Arrays.ENTRY_CLIPPED: ((e,), "uint32", (s,)),
    }
    for path, part in _table_arrays(schema).items():
        out[path] = (part.shape, part.dtype, part.shape)
    return out


def _data_arrays(schema: CacheSchema) -> dict[str, Part]:
    out = {}
    for target, parts in _target_parts(schema).items():
        group = Arrays.LOGITS if target == "logits" else Arrays.FEATURES
        for name, part in parts.items():
            out[f"{group}/{name}"] = part
    return out


def _compressor_for(schema: CacheSchema, path: str) -> Compressor:
    if path.startswith(Arrays.LOGITS + "/"):
        return schema.logits.compressor
    if path.startswith(Arrays.FEATURES + "/") and schema.features is not None:
        return schema.features.compressor
    return Compressor("zstd", 3)


# ------------------------------------------------------------------------------------------------
# validation of what a store says about itself


def _codec_names(codecs: Any) -> list[str]:
    names = []
    for c in codecs or ():
        if not isinstance(c, dict):
            raise UnsafeCacheError("array metadata lists a codec that is not an object")
        name = c.get("name")
        names.append(str(name))
        conf = c.get("configuration") or {}
        if name == "sharding_indexed":
            names += _codec_names(conf.get("codecs"))
            names += _codec_names(conf.get("index_codecs"))
    return names


def _check_array_metadata(path: str, arr: Any) -> None:
    _check_metadata_document(path, arr.metadata.to_dict())


def _check_metadata_document(path: str, meta: Any) -> None:
    """Refuse an array whose metadata asks for anything but plain numbers and allowed codecs.

    Works on the raw JSON document too, so that it runs *before* zarr instantiates anything a store
    names (codec classes are looked up by name, entry points included).
    """
    if not isinstance(meta, dict):
        raise UnsafeCacheError(f"the metadata of {path} is not a JSON object")
    if meta.get("zarr_format") != 3:
        raise UnsafeCacheError(f"array {path} is not a zarr v3 array")
    dtype = str(meta.get("data_type"))
    if dtype not in ALLOWED_DTYPES:
        raise UnsafeCacheError(f"array {path} has data type {dtype!r}; an skd cache holds only plain numeric arrays")
    bad = [n for n in _codec_names(meta.get("codecs")) if n not in ALLOWED_CODECS]
    if bad:
        raise UnsafeCacheError(
            f"array {path} uses codec(s) {', '.join(sorted(set(bad)))} outside the allowed set "
            f"({', '.join(sorted(ALLOWED_CODECS))}); refusing to decode it"
        )
    if meta.get("storage_transformers"):
        raise UnsafeCacheError(f"array {path} uses storage transformers; refusing to read it")


def _raw_document(store: Any, key: str) -> Any:
    """The JSON document at ``key`` of a zarr store, parsed by us (None when absent).

    At most :data:`MAX_DOCUMENT_BYTES` are read: a larger document is refused, not parsed.
    """
    from zarr.abc.store import RangeByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    limit = MAX_DOCUMENT_BYTES
    buf = sync(store.get(key, prototype=default_buffer_prototype(), byte_range=RangeByteRequest(0, limit + 1)))
    if buf is None:
        return None
    if len(buf) > limit:
        raise UnsafeCacheError(f"{key} is larger than {limit // 2**20} MiB; an skd cache's metadata is far smaller")
    try:
        return json.loads(buf.to_bytes())
    except (ValueError, UnicodeDecodeError):
        return ValueError(f"{key} is not valid JSON")


def _precheck_store(store: Any, url: str) -> None:
    """Validate the root document and every consolidated child document before zarr parses them."""
    doc = _raw_document(store, "zarr.json")
    if doc is None:
        raise NotACacheError(f"{url} is not an skd cache (no zarr v3 group there: no zarr.json)")
    if isinstance(doc, ValueError) or not isinstance(doc, dict):
        raise NotACacheError(f"{url} is not an skd cache (its zarr.json is not a JSON object)")
    if doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        raise NotACacheError(f"{url} is not an skd cache (its zarr.json does not describe a zarr v3 group)")
    consolidated = doc.get("consolidated_metadata")
    if consolidated is None:
        return
    children = consolidated.get("metadata") if isinstance(consolidated, dict) else None
    if not isinstance(children, dict):
        raise UnsafeCacheError(f"{url}: the consolidated metadata is malformed")
    for path, meta in children.items():
        if isinstance(meta, dict) and meta.get("node_type") == "group":
            continue
        _check_metadata_document(str(path), meta)


def _prefix(group: Any) -> str:
    path = group.store_path.path
    return f"{path}/" if path else ""


def _validate_group(group: Any, schema: CacheSchema) -> dict[str, Any]:
    """Check every array the schema implies (and every array present); return path -> array."""
    members = {}
    if not group.metadata.consolidated_metadata:
        # no consolidated copy (a store being built, or a copy that dropped it): check each
        # expected array's own document before zarr parses it
        for path in list(_static_arrays(schema)) + list(_data_arrays(schema)):
            doc = _raw_document(group.store_path.store, f"{_prefix(group)}{path}/zarr.json")
            if isinstance(doc, ValueError):
                raise SchemaError(f"the metadata of {path} is not valid JSON")
            if doc is None:
                raise SchemaError(f"array {path} is missing from the store (no {path}/zarr.json)")
            _check_metadata_document(path, doc)
    try:
        with warnings.catch_warnings():
            # a folder without a zarr.json (not ours) is no member; the arrays we need were checked above
            warnings.filterwarnings("ignore", message=".*not recognized as a component", category=UserWarning)
            found = list(group.members(max_depth=None))
    except (KeyError, ValueError, TypeError) as exc:
        raise UnsafeCacheError(f"the store holds array metadata this reader refuses to parse ({exc})") from None
    for path, node in found:
        if hasattr(node, "metadata") and getattr(node.metadata, "node_type", "") == "array":
            _check_array_metadata(path, node)
            members[path] = node
    for p, (shape, dtype, chunks, shards) in _expected_layout(schema).items():
        arr = members.get(p)
        if arr is None:
            raise SchemaError(f"array {p} is missing from the store")
        if tuple(arr.shape) != shape or str(arr.dtype) != dtype:
            raise SchemaError(f"array {p} is {tuple(arr.shape)} {arr.dtype}, the schema implies {shape} {dtype}")
        # the chunking decides how many objects a read touches: never let the store choose it
        have = (tuple(arr.chunks), None if arr.shards is None else tuple(arr.shards))
        if have != (chunks, shards):
            raise SchemaError(f"array {p} has chunks/shards {have}, the schema implies {(chunks, shards)}")
    return members


def _expected_layout(schema: CacheSchema) -> dict[str, tuple[tuple[int, ...], str, tuple[int, ...], Any]]:
    """path -> (shape, dtype, chunk shape, shard shape or None) of every array the schema implies."""
    out: dict[str, tuple[tuple[int, ...], str, tuple[int, ...], Any]] = {
        p: (tuple(shape), dtype, tuple(chunks), None) for p, (shape, dtype, chunks) in _static_arrays(schema).items()
    }
    e, s = schema.num_entries, schema.shard_entries
    for p, part in _data_arrays(schema).items():
        out[p] = ((e, *part.shape), part.dtype, (1, *part.shape), (s, *part.shape))
    return out


# ------------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class CacheEntry:
    """One decoded entry.

    Attributes:
        logits: (K, h, w) float32 teacher logits on the entry's valid grid.
        feature: (C, hp, wp) float32 pooled teacher feature cells covering the valid grid, or None.
    """

    index: int
    image_index: int
    image_id: str
    view: View
    grid: tuple[int, int]
    logits: np.ndarray
    feature: np.ndarray | None


def _open_group(
    url: str,
    storage_options: dict | None,
    cache_dir: str | None = None,
    read_only: bool = True,
    cache_key: str = "",
):
    import zarr

    if not url_exists(url, storage_options):
        raise CacheNotFoundError(f"no cache at {url}: nothing exists there (check the path or URL)")
    store = open_store(
        url, read_only=read_only, storage_options=storage_options, cache_dir=cache_dir, cache_key=cache_key
    )
    with storage_errors(url):
        _precheck_store(store, url)
        try:
            return zarr.open_group(store, mode="r" if read_only else "r+", zarr_format=3)
        except (FileNotFoundError, KeyError, ValueError, TypeError) as exc:
            raise NotACacheError(f"{url} cannot be opened as a zarr v3 group ({exc})") from None


def _read_schema(group: Any, url: str) -> CacheSchema:
    attrs = group.attrs.asdict()
    if ROOT_ATTR not in attrs:
        raise NotACacheError(f"{url} is a zarr group but not an skd cache (no '{ROOT_ATTR}' attribute)")
    schema = CacheSchema.from_dict(attrs[ROOT_ATTR])
    _check_sizes(schema)
    return schema


#: The most bytes one entry's encoded parts may take, and one shard object of one part.
MAX_ENTRY_BYTES = 1 << 30
MAX_SHARD_BYTES = 1 << 32


def _check_sizes(schema: CacheSchema) -> None:
    """Refuse entries and shard objects larger than any real store's, from the schema's numbers alone."""
    arrays = {**_data_arrays(schema), **_table_arrays(schema)}
    sizes = {p: int(np.prod(part.shape)) * np.dtype(part.dtype).itemsize for p, part in arrays.items()}
    entry = sum(sizes.values())
    if entry > MAX_ENTRY_BYTES:
        raise SchemaError(
            f"{ROOT_ATTR}: one entry would take {entry / 2**30:.1f} GiB (limit {MAX_ENTRY_BYTES // 2**30} GiB; "
            "docs/cache_format.md): the store's metadata is damaged or not an skd cache's"
        )
    path, biggest = max(sizes.items(), key=lambda kv: kv[1])
    if biggest * schema.shard_entries > MAX_SHARD_BYTES:
        raise SchemaError(
            f"{ROOT_ATTR}: a shard of {path} would take {biggest * schema.shard_entries / 2**30:.1f} GiB "
            f"(limit {MAX_SHARD_BYTES // 2**30} GiB; docs/cache_format.md): the store's metadata is damaged "
            "or not an skd cache's"
        )


def _check_tables_present(group: Any, schema: CacheSchema, url: str) -> None:
    """Refuse a store whose tables hold fewer objects than its schema claims, before reading them.

    Reading the tables costs a request per chunk whether the chunk exists or not, so a few bytes of
    metadata claiming millions of entries would cost minutes. ``entries/grid`` (never zero, written
    when the store is created) has one object per shard in every store; counting them is one
    listing, proportional to what the store really holds. Plain HTTP cannot list: there the
    ``MAX_*`` limits alone bound the work.
    """
    from zarr.core.sync import sync

    if url.startswith(("http://", "https://")):
        return
    expected = schema.num_shards
    prefix = f"{_prefix(group)}{Arrays.ENTRY_GRID}/"

    async def count() -> int:
        n = 0
        async for key in group.store.list_prefix(prefix):
            n += not key.endswith("zarr.json")
            if n >= expected:
                break
        return n

    found = sync(count())
    if found < expected:
        raise SchemaError(
            f"{url} claims {schema.num_entries} entries in {expected} shards, but holds {found} of the "
            f"{expected} objects of {Arrays.ENTRY_GRID}: the store is truncated or its metadata was altered; "
            "copy it again or rebuild it"
        )


class CacheReader:
    """Read-only access to a cache. Cheap to construct in each DataLoader worker.

    The small per-entry tables (views, grids, done markers, checksums) are loaded at open; an
    entry's data is read on demand, one chunk per part.
    """

    def __init__(self, url: str, group: Any, schema: CacheSchema, arrays: dict[str, Any]):
        self.url = url
        self.group = group
        self.schema = schema
        self._arrays = arrays
        self.logit_codec = LogitCodec.from_params(schema.logits.codec, schema.logits.params)
        self.feature_codec = _with_tables(schema, self._table)
        self.image_ids = _decode_ids(self._table(Arrays.IMAGE_ID))
        self.image_sizes = self._table(Arrays.IMAGE_SIZE).astype(np.int64)
        self.entry_image = self._table(Arrays.ENTRY_IMAGE).astype(np.int64)
        self.entry_scale = self._table(Arrays.ENTRY_SCALE)
        self.entry_resized = self._table(Arrays.ENTRY_RESIZED).astype(np.int64)
        self.entry_box = self._table(Arrays.ENTRY_BOX).astype(np.int64)
        self.entry_flip = self._table(Arrays.ENTRY_FLIP).astype(bool)
        self.entry_grid = self._table(Arrays.ENTRY_GRID).astype(np.int64)
        self.done = self._table(Arrays.ENTRY_DONE).astype(bool)
        # every read is compared with it (8 bytes an entry, loaded once per process)
        self.entry_checksums = self._table(Arrays.ENTRY_CHECKSUM)
        if len(set(self.image_ids)) != len(self.image_ids):
            raise SchemaError("images/id holds duplicate ids")
        if self.entry_image.min(initial=0) < 0 or self.entry_image.max(initial=0) >= schema.num_images:
            raise SchemaError("entries/image points outside images/")
        self._check_tables()
        self._parts = _target_parts(schema)
        self._index = {s: i for i, s in enumerate(self.image_ids)}

    def _table(self, path: str) -> np.ndarray:
        """A whole small array; a chunk that does not decode is a one-line CorruptEntryError."""
        try:
            with storage_errors(self.url):
                return self._arrays[path][...]
        except CacheError:
            raise
        except Exception as exc:
            text = str(exc).splitlines()[0] if str(exc) else ""
            raise CorruptEntryError(
                f"{self.url}: the table {path} cannot be read ({type(exc).__name__}: {text}); the store is "
                "damaged — copy it again (`skdcache copy`) or rebuild it"
            ) from exc

    def _check_tables(self) -> None:
        """Refuse geometry a reader would trip over (sizes that are zero, negative or absurd)."""
        limit = 1 << 16  # pixels per side of an image or a scaled image
        canvas = self.schema.logits.grid
        checks = (
            ("images/size", self.image_sizes, 1, limit),
            ("entries/resized", self.entry_resized, 1, 4 * limit),
            ("entries/box", self.entry_box, 0, 4 * limit),
        )
        for name, values, lo, hi in checks:
            if values.size and (values.min() < lo or values.max() > hi):
                raise SchemaError(f"{name} holds values outside [{lo}, {hi}]")
        if self.entry_box.size and self.entry_box[:, 2:].min() < 1:
            raise SchemaError("entries/box holds an empty crop")
        grid = self.entry_grid
        if grid.size and (grid.min() < 1 or (grid > np.asarray(canvas)).any()):
            raise SchemaError(f"entries/grid holds grids outside 1..{canvas[0]}x{canvas[1]} (the canvas)")
        scale = self.entry_scale
        if scale.size and not (np.isfinite(scale).all() and scale.min() > 0):
            raise SchemaError("entries/scale holds values that are not positive numbers")

    # -- tables ---------------------------------------------------------------------------------
    @property
    def num_entries(self) -> int:
        return self.schema.num_entries

    @property
    def num_images(self) -> int:
        return self.schema.num_images

    def __len__(self) -> int:
        return self.num_entries

    def image_index(self, image_id: str) -> int:
        try:
            return self._index[image_id]
        except KeyError:
            raise SchemaMismatchError(f"image id {image_id!r} is not in the cache {self.url}") from None

    def image_sha256(self) -> list[str]:
        """sha256 (hex) of every image file, as recorded at build time ('' where not written)."""
        raw = self._table(Arrays.IMAGE_SHA256)
        return ["" if not row.any() else bytes(row).hex() for row in raw]

    def entries_of_image(self, image: int) -> range:
        k = self.schema.entries_per_image
        return range(image * k, (image + 1) * k)

    def view(self, i: int) -> View:
        y0, x0, h, w = (int(v) for v in self.entry_box[i])
        return View(
            image=int(self.entry_image[i]),
            scale=float(self.entry_scale[i]),
            resized=(int(self.entry_resized[i, 0]), int(self.entry_resized[i, 1])),
            box=(y0, x0, h, w),
            flip=bool(self.entry_flip[i]),
        )

    def checksums(self) -> np.ndarray:
        return self.entry_checksums

    # -- entries --------------------------------------------------------------------------------
    def _part_arrays(self) -> list[tuple[str, str, Any]]:
        out = []
        for target, parts in self._parts.items():
            group = Arrays.LOGITS if target == "logits" else Arrays.FEATURES
            for name in parts:
                out.append((target, name, self._arrays[f"{group}/{name}"]))
        return out

    def read_parts(self, i: int, *, check: bool = True) -> dict[str, dict[str, np.ndarray]]:
        """The encoded parts of entry ``i``: all parts are fetched concurrently, one chunk each.

        With ``check`` (the default) the parts are compared with the entry's build-time checksum, so
        a chunk that is missing (zarr would hand back fill values) or altered is never returned.
        Local copies of a read-through cache that fail the check are dropped and read again once.

        Raises:
            IncompleteCacheError: the entry was never written.
            CorruptEntryError: a chunk does not decode, is missing or does not match the checksum.
        """
        if not 0 <= i < self.num_entries:
            raise IndexError(f"entry {i} out of range (the cache has {self.num_entries})")
        if not self.done[i]:
            raise IncompleteCacheError(f"entry {i} of {self.url} was never written (its build did not finish)")
        try:
            return self._checked_parts(i, check)
        except CorruptEntryError:
            forget = getattr(self.group.store, "forget", None)
            if forget is None or not forget(self._shard_keys(i)):
                raise
        return self._checked_parts(i, check)

    def _checked_parts(self, i: int, check: bool) -> dict[str, dict[str, np.ndarray]]:
        from zarr.core.sync import sync

        arrays = self._part_arrays()

        async def fetch():
            return await asyncio.gather(*(a.async_array.getitem((i,)) for _, _, a in arrays))

        try:
            with storage_errors(self.url):
                values = sync(fetch())
        except CacheError:
            raise
        except Exception as exc:
            text = str(exc).splitlines()[0] if str(exc) else ""
            raise self._damaged(i, f"a chunk does not decode ({type(exc).__name__}: {text})") from exc
        out: dict[str, dict[str, np.ndarray]] = {}
        for (target, name, _), v in zip(arrays, values, strict=True):
            out.setdefault(target, {})[name] = np.asarray(v)
        if check and entry_checksum(out) != int(self.entry_checksums[i]):
            raise self._damaged(i, self._why_mismatch(i))
        return out

    def _shard_keys(self, i: int) -> list[str]:
        """Store keys of the shard objects that hold entry ``i``'s parts."""
        shard = i // self.schema.shard_entries
        arrays = [a for _, _, a in self._part_arrays()]
        return [f"{a.path}/{a.metadata.encode_chunk_key((shard,) + (0,) * (a.ndim - 1))}" for a in arrays]

    def _why_mismatch(self, i: int) -> str:
        """Why entry ``i`` failed its checksum, as far as one look at the store tells (error path only)."""
        from zarr.core.sync import sync

        store = self.group.store
        try:
            with storage_errors(self.url):
                missing = [k for k in self._shard_keys(i) if not sync(store.exists(k))]
        except CacheError:
            missing = []
        if missing:
            return f"its shard object {missing[0]} is missing"
        return "its data does not match its build-time checksum (a chunk is missing from its shard or altered)"

    def _damaged(self, i: int, why: str) -> CorruptEntryError:
        return CorruptEntryError(
            f"entry {i} ({self.image_ids[self.entry_image[i]]}) of {self.url} is damaged: {why} — run "
            f"`skdcache verify {self.url}` and repair it from a sound copy (`skdcache copy SOUND {self.url} "
            "--checksum`) or rebuild it"
        )

    def decode(self, i: int, parts: dict[str, dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray | None]:
        """Decoded (logits, feature) of entry ``i`` cropped to its valid grid / cells."""
        h, w = (int(v) for v in self.entry_grid[i])
        logits = self.logit_codec.decode(parts["logits"])[:, :h, :w]
        feature = None
        if self.feature_codec is not None:
            bh, bw = self.schema.features.block  # type: ignore[union-attr]
            feature = self.feature_codec.decode(parts["features"])[:, : -(-h // bh), : -(-w // bw)]
        return np.ascontiguousarray(logits), None if feature is None else np.ascontiguousarray(feature)

    def read_entry(self, i: int, *, check: bool = True) -> CacheEntry:
        """Read and decode entry ``i``, compared with its build-time checksum unless ``check`` is False."""
        parts = self.read_parts(i, check=check)
        logits, feature = self.decode(i, parts)
        img = int(self.entry_image[i])
        return CacheEntry(
            index=i,
            image_index=img,
            image_id=self.image_ids[img],
            view=self.view(i),
            grid=(int(self.entry_grid[i, 0]), int(self.entry_grid[i, 1])),
            logits=logits,
            feature=feature,
        )

    def array(self, path: str) -> Any:
        return self._arrays[path]


def open_cache(
    url: str | os.PathLike,
    *,
    storage_options: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_incomplete: bool = False,
) -> CacheReader:
    """Open a cache for reading.

    Args:
        url: local path or fsspec URL.
        storage_options: fsspec options for remote URLs.
        cache_dir: local read-through cache directory for remote stores (used once the store is
            complete, when its objects no longer change; see ``storage.open_store``).
        allow_incomplete: open a store whose build has not finished (verify, info).

    Raises:
        CacheNotFoundError, NotACacheError, FormatVersionError, SchemaError, UnsafeCacheError,
        IncompleteCacheError.
    """
    url = str(url)
    group = _open_group(url, storage_options)
    schema = _read_schema(group, url)
    if cache_dir is not None and is_remote(url) and schema.status == "complete":
        # a complete store's objects change only by a repair: read them through the local cache, in
        # a namespace of this very build (a store rebuilt at the same URL gets a fresh one); a local
        # copy that fails a read's checksum is dropped and fetched again (CacheReader.read_parts)
        key = hashlib.sha256(json.dumps(group.attrs[ROOT_ATTR], sort_keys=True).encode()).hexdigest()
        group = _open_group(url, storage_options, str(cache_dir), cache_key=key)
    with storage_errors(url):
        arrays = _validate_group(group, schema)
        _check_tables_present(group, schema, url)
    if schema.status != "complete" and not allow_incomplete:
        raise IncompleteCacheError(
            f"the cache at {url} is incomplete (its build has not finished): re-run the same "
            "`skdcache build` command to resume it"
        )
    return CacheReader(url, group, schema, arrays)


# ------------------------------------------------------------------------------------------------
# writing


class CacheWriter:
    """Writes the shards of one store. Obtain one with :func:`prepare_cache`."""

    def __init__(self, url: str, group: Any, schema: CacheSchema, storage_options: dict | None):
        self.url = url
        self.group = group
        self.schema = schema
        self.storage_options = storage_options
        # zarr keeps write_empty_chunks in the array object, not in the store: without it here an
        # all-zero chunk would be skipped and could not be told from a lost one
        self._arrays = {
            p: group[p].with_config({"write_empty_chunks": True})
            for p in list(_static_arrays(schema)) + list(_data_arrays(schema))
        }

    def done(self) -> np.ndarray:
        with storage_errors(self.url):
            return self._arrays[Arrays.ENTRY_DONE][...].astype(bool)

    def feature_codec(self) -> FeatureCodec | None:
        """The store's features codec with the tables it holds (a resumed build encodes with them)."""
        with storage_errors(self.url):
            return _with_tables(self.schema, lambda path: self._arrays[path][...])

    def pending_shards(self) -> list[int]:
        done = self.done()
        out = []
        for s in range(self.schema.num_shards):
            a, b = self.schema.shard_range(s)
            if not done[a:b].all():
                out.append(s)
        return out

    def write_shard(
        self,
        shard: int,
        *,
        logits: dict[str, np.ndarray],
        features: dict[str, np.ndarray] | None,
        image_sha256: np.ndarray,
        checksums: np.ndarray,
        fidelity: np.ndarray,
        clipped: np.ndarray,
    ) -> int:
        """Write one whole shard; returns the bytes of encoded values written (before compression)."""
        a, b = self.schema.shard_range(shard)
        n = b - a
        k = self.schema.entries_per_image
        nbytes = 0
        with storage_errors(self.url, writing=True):
            for target, parts in (("logits", logits), ("features", features)):
                if parts is None:
                    continue
                group = Arrays.LOGITS if target == "logits" else Arrays.FEATURES
                for name, value in parts.items():
                    if value.shape[0] != n:
                        raise ValueError(f"shard {shard}: {target}/{name} has {value.shape[0]} entries, expected {n}")
                    self._arrays[f"{group}/{name}"][a:b] = value
                    nbytes += value.nbytes
            self._arrays[Arrays.IMAGE_SHA256][a // k : b // k] = image_sha256
            self._arrays[Arrays.ENTRY_CHECKSUM][a:b] = checksums.astype(np.uint64)
            self._arrays[Arrays.ENTRY_FIDELITY][a:b] = fidelity.astype(np.float32)
            self._arrays[Arrays.ENTRY_CLIPPED][a:b] = clipped.astype(np.uint32)
            # last: the done markers, so a marker never exists without its data
            self._arrays[Arrays.ENTRY_DONE][a:b] = np.ones(n, dtype=np.uint8)
        return nbytes

    def finalize(self, build: dict | None = None) -> CacheSchema:
        """Mark the store complete: fidelity summary, build info, consolidated metadata."""
        import zarr

        with storage_errors(self.url, writing=True):
            done = self.done()
            if not done.all():
                raise IncompleteCacheError(f"cannot finalise {self.url}: {int((~done).sum())} entries are not written")
            fid = summarize(self._arrays[Arrays.ENTRY_FIDELITY][...])
            clipped = int(self._arrays[Arrays.ENTRY_CLIPPED][...].sum(dtype=np.int64))
            info = dict(self.schema.build)
            info.update(build or {})
            info["clipped_values"] = clipped
            self.schema = self.schema.with_status(status="complete", fidelity=fid, build=info, completed=_now())
            self.group.attrs[ROOT_ATTR] = self.schema.to_dict()
            with warnings.catch_warnings():
                # consolidated metadata is not in the v3 spec yet; we use it knowingly (one request
                # per open on object storage) and plain zarr reads the store either way
                warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
                zarr.consolidate_metadata(self.group.store)
        return self.schema


#: Attribute of the root document while skd lays a store out: the group's first document carries it,
#: before any other object exists, and the schema attribute replaces it once the store is complete.
#: It is what proves that the objects of an interrupted creation are skd's to clear.
CREATION_ATTR = "skd_creation"

#: Keys an skd store consists of: the root document, group documents, array documents and chunks.
_STORE_KEY = re.compile(r"^zarr\.json$|^[a-z_]+/zarr\.json$|^[a-z_]+/[a-z_0-9]+/(zarr\.json|c(/[0-9]+)+)$")


def _written_by_creation(key: str) -> bool:
    """Whether an object at relative ``key`` is one that :func:`_create_store` writes."""
    return bool(_STORE_KEY.match(key))


def _create_store(
    url: str,
    schema: CacheSchema,
    *,
    image_ids: list[str],
    image_sizes: np.ndarray,
    views: list[View],
    grids: np.ndarray,
    tables: dict[str, np.ndarray],
    storage_options: dict | None,
) -> Any:
    import zarr

    store = open_store(url, read_only=False, storage_options=storage_options)
    with storage_errors(url, writing=True):
        # first object written: the root document with the creation marker (never over anything)
        marker = {"tool_version": __version__, "created": schema.created or _now()}
        group = zarr.create_group(store, zarr_format=3, attributes={CREATION_ATTR: marker})
        for path, (shape, dtype, chunks) in _static_arrays(schema).items():
            group.create_array(
                path,
                shape=shape,
                dtype=dtype,
                chunks=chunks,
                compressors=_compressors(Compressor("zstd", 3), dtype),
                fill_value=0,
            )
        s = schema.shard_entries
        for path, part in _data_arrays(schema).items():
            group.create_array(
                path,
                shape=(schema.num_entries, *part.shape),
                dtype=part.dtype,
                chunks=(1, *part.shape),
                shards=(s, *part.shape),
                compressors=_compressors(_compressor_for(schema, path), part.dtype),
                fill_value=0,
                config={"write_empty_chunks": True},
            )
        group[Arrays.IMAGE_ID][...] = _encode_ids(image_ids, schema.id_bytes)
        group[Arrays.IMAGE_SIZE][...] = np.asarray(image_sizes, dtype=np.int32)
        group[Arrays.ENTRY_IMAGE][...] = np.array([v.image for v in views], dtype=np.int32)
        group[Arrays.ENTRY_SCALE][...] = np.array([v.scale for v in views], dtype=np.float32)
        group[Arrays.ENTRY_RESIZED][...] = np.array([v.resized for v in views], dtype=np.int32)
        group[Arrays.ENTRY_BOX][...] = np.array([v.box for v in views], dtype=np.int32)
        group[Arrays.ENTRY_FLIP][...] = np.array([v.flip for v in views], dtype=np.uint8)
        group[Arrays.ENTRY_GRID][...] = np.asarray(grids, dtype=np.int32)
        group[Arrays.ENTRY_FIDELITY][...] = np.full(
            (schema.num_entries, len(FIDELITY_COLUMNS)), np.nan, dtype=np.float32
        )
        for path, value in tables.items():
            group[path][...] = value
        # last, in one write of the root document: the schema attribute replaces the marker
        group.attrs.put({ROOT_ATTR: schema.to_dict()})
    return group


def _is_empty_location(url: str, storage_options: dict | None) -> bool:
    if not is_remote(url):
        p = local_path(url)
        return not p.exists() or (p.is_dir() and not any(p.iterdir()))
    return not url_exists(url, storage_options)


def _location_fs(url: str, storage_options: dict | None) -> tuple[Any, str]:
    """(fsspec filesystem, root path) of a location; plain paths get the local filesystem."""
    import fsspec

    if not is_remote(url):
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), str(local_path(url).absolute())
    fs, path = fsspec.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/")


def _objects_at(fs: Any, root: str) -> list[str]:
    """Relative keys of every object (file) under ``root``, sorted."""
    out = []
    for path in fs.find(root):
        rel = path[len(root) :].lstrip("/") if path.startswith(root) else path.rsplit(root + "/", 1)[-1]
        out.append(rel)
    return sorted(out)


def _root_document(fs: Any, root: str) -> tuple[str, Any]:
    """What a non-empty location is: ("file", None), ("plain", None) or ("zarr", parsed root document)."""
    if fs.isfile(root):
        return "file", None
    try:
        raw = fs.cat_file(f"{root}/zarr.json")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return "plain", None
    try:
        return "zarr", json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return "zarr", None


def _zarr_kind(doc: Any) -> str:
    if not isinstance(doc, dict):
        return "a zarr.json that is not valid zarr metadata"
    node = doc.get("node_type")
    return f"a zarr {node}" if node in ("group", "array") else "a zarr.json that is not zarr v3 metadata"


def _judge_destination(url: str, schema: CacheSchema, overwrite: bool, storage_options: dict | None) -> Any:
    """Decide what to do with a non-empty destination.

    Returns a :class:`CacheWriter` when a store of this configuration is there (resume, or nothing to
    do when it is complete), or None when the location is skd's to clear (an interrupted creation
    holding only objects skd writes) or ``overwrite`` forces it (a store of another configuration, or
    any other zarr store). A location that holds no zarr store at all is never cleared.

    Raises:
        NotACacheError, ConfigMismatchError: the destination must not be touched.
    """
    fs, root = _location_fs(url, storage_options)
    with storage_errors(url):
        kind, doc = _root_document(fs, root)
        # one example is enough (never walk a whole home directory given as --out by mistake)
        example = sorted(fs.ls(root, detail=False))[:1] if kind == "plain" else []
    if kind == "file":
        raise NotACacheError(
            f"{url} is a file, not an skd cache; refusing to write there: choose another --out "
            "(skd never deletes it, even with --overwrite)"
        )
    if kind == "plain":
        held = example[0].rstrip("/").rsplit("/", 1)[-1] if example else "nothing"
        raise NotACacheError(
            f"{url} exists and is not an skd cache; refusing to write there (it holds what skd did not write, "
            f"e.g. {held}): choose another --out (skd never deletes it, even with --overwrite)"
        )
    attrs = doc.get("attributes") if isinstance(doc, dict) and doc.get("node_type") == "group" else None
    attrs = attrs if isinstance(attrs, dict) else {}
    if ROOT_ATTR in attrs:
        return _reopen_cache(url, schema, overwrite, storage_options)
    if CREATION_ATTR in attrs:
        with storage_errors(url):
            strangers = [k for k in _objects_at(fs, root) if not _written_by_creation(k)]
        if not strangers:
            logger.info("%s: an earlier creation did not finish; creating the store again", url)
            return None
        if overwrite:
            return None
        raise NotACacheError(
            f"{url} holds an unfinished skd store and {len(strangers)} file(s) skd did not write "
            f"(e.g. {strangers[0]}); refusing to delete them: move them away, or pass --overwrite "
            f"to delete everything at {url}"
        )
    if overwrite:
        return None
    raise NotACacheError(
        f"{url} holds {_zarr_kind(doc)} that is not an skd cache; refusing to write there: choose another "
        f"--out, or pass --overwrite to delete everything at {url} and write the cache there"
    )


def _reopen_cache(url: str, schema: CacheSchema, overwrite: bool, storage_options: dict | None) -> Any:
    """A writer on the skd cache at ``url`` when it has this configuration; None when ``overwrite`` replaces it."""
    try:
        group = _open_group(url, storage_options, read_only=False)
        old: CacheSchema | None = CacheSchema.from_dict(group.attrs.asdict()[ROOT_ATTR])
    except CacheError as exc:
        if overwrite:
            return None
        raise ConfigMismatchError(
            f"{url} holds a cache this version cannot resume ({exc}); pass --overwrite to replace it"
        ) from None
    assert old is not None
    if old.content_key() == schema.content_key():
        with storage_errors(url):
            _validate_group(group, old)
        return CacheWriter(url, group, old, storage_options)
    if overwrite:
        return None
    diff = _first_difference(old.content_key(), schema.content_key())
    raise ConfigMismatchError(
        f"{url} already holds a cache built with a different configuration ({diff}); "
        "pass --overwrite to replace it, or choose another --out"
    )


def prepare_cache(
    url: str | os.PathLike,
    schema: CacheSchema,
    *,
    image_ids: list[str],
    image_sizes: np.ndarray,
    views: list[View],
    grids: np.ndarray,
    feature_codec: FeatureCodec | Callable[[], FeatureCodec] | None = None,
    overwrite: bool = False,
    storage_options: dict | None = None,
) -> tuple[CacheWriter, bool]:
    """Create a store, or reopen an unfinished (or complete) one built with the same configuration.

    What is at ``url`` decides: nothing (or an empty folder) -> created; an skd cache of this
    configuration -> reopened (a complete one comes back with ``writer.schema.status ==
    "complete"``: nothing to do); an interrupted creation of skd's (root marked with
    :data:`CREATION_ATTR`, nothing else there) -> cleared and created again. Only with ``overwrite``:
    an skd cache of another configuration, or any other zarr store (with whatever lies beside it), is
    deleted and replaced. Never, even with ``overwrite``: a file, or a folder that holds no zarr store.

    Args:
        feature_codec: the features codec whose per-store tables (a ``pca`` codec's basis and mean)
            a new store holds, or a function making it, called only when a store is created (a
            resumed store keeps its own tables). Not needed for codecs without tables.

    Returns:
        (writer, resumed). ``resumed`` is True when an existing store is continued.

    Raises:
        ConfigMismatchError: a store exists with another configuration and ``overwrite`` is False.
        NotACacheError: something that is not an skd cache exists at ``url`` (never deleted without
            ``overwrite``, a non-zarr location never).
    """
    url = str(url)
    if len(image_ids) != schema.num_images or len(views) != schema.num_entries:
        raise ValueError("image ids / views do not match the schema")
    clear = False
    if not _is_empty_location(url, storage_options):
        writer = _judge_destination(url, schema, overwrite, storage_options)
        if writer is not None:
            return writer, True
        clear = True
    tables = _table_values(schema, feature_codec)  # may fail (a bad teacher): before anything is deleted
    if clear:
        remove_store(url, storage_options)
    schema = schema.with_status(status="building", created=_now(), tool_version=__version__)
    group = _create_store(
        url,
        schema,
        image_ids=image_ids,
        image_sizes=image_sizes,
        views=views,
        grids=grids,
        tables=tables,
        storage_options=storage_options,
    )
    return CacheWriter(url, group, schema, storage_options), False


def _table_values(
    schema: CacheSchema,
    feature_codec: FeatureCodec | Callable[[], FeatureCodec] | None,
) -> dict[str, np.ndarray]:
    """Path -> value of every per-store codec table of a new store (checked against the schema)."""
    paths = _table_arrays(schema)
    if not paths:
        return {}
    if feature_codec is None:
        raise ValueError(f"a store with {', '.join(paths)} needs the features codec that holds them")
    codec = feature_codec if isinstance(feature_codec, FeatureCodec) else feature_codec()
    values = {f"{Arrays.FEATURES}/{name}": value for name, value in codec.table_values().items()}
    for path, part in paths.items():
        if path not in values or values[path].shape != part.shape:
            raise ValueError(f"the features codec's {path} does not fit the schema's {part.shape}")
    return values


def attach_cache(url: str | os.PathLike, schema: CacheSchema, *, storage_options: dict | None = None) -> CacheWriter:
    """Open an existing, unfinished store for writing more shards (a worker of a distributed build).

    Never creates or deletes anything: the store must exist with the same configuration.
    """
    url = str(url)
    group = _open_group(url, storage_options, read_only=False)
    existing = _read_schema(group, url)
    if existing.content_key() != schema.content_key():
        diff = _first_difference(existing.content_key(), schema.content_key())
        raise ConfigMismatchError(f"{url} holds a cache of another configuration ({diff})")
    with storage_errors(url):
        _validate_group(group, existing)
    return CacheWriter(url, group, existing, storage_options)


def _first_difference(a: dict, b: dict) -> str:
    return first_difference(a, b, words=("there vs", "now")) or "no difference"
