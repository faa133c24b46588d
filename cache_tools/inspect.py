"""What a cache holds, as plain data (``skdcache info``).

:func:`describe_cache` reads only metadata, the small tables and a listing of the store's objects
(for byte counts); it never decodes an entry.
"""

from __future__ import annotations

import os
from typing import Any

from .schema import Arrays
from .storage import is_remote, local_path, storage_errors
from .store import open_cache

__all__ = ["describe_cache", "array_bytes"]


def _codec_summary(meta: dict) -> tuple[list[int] | None, list[int] | None, list[str]]:
    """(chunk shape, shard shape, codec names) of an array's v3 metadata."""
    grid = list(meta["chunk_grid"]["configuration"]["chunk_shape"])
    codecs = list(meta.get("codecs") or [])
    if codecs and codecs[0].get("name") == "sharding_indexed":
        conf = codecs[0]["configuration"]
        inner = [_codec_text(c) for c in conf.get("codecs", [])]
        return list(conf["chunk_shape"]), grid, ["sharding_indexed", *inner]
    return grid, None, [_codec_text(c) for c in codecs]


def _codec_text(c: dict) -> str:
    name = c.get("name", "?")
    conf = c.get("configuration") or {}
    if name == "zstd":
        return f"zstd(level={conf.get('level')})"
    if name == "blosc":
        return f"blosc({conf.get('cname')}, clevel={conf.get('clevel')}, {conf.get('shuffle')})"
    return str(name)


def array_bytes(url: str, storage_options: dict | None = None) -> dict[str, int] | None:
    """Stored bytes of every object of a store, by key (metadata documents included).

    Returns None when the location cannot be listed (plain HTTP).
    """
    sizes: dict[str, int] = {}
    with storage_errors(url):
        if not is_remote(url):
            root = local_path(url)
            for dirpath, _, files in os.walk(root):
                for f in files:
                    p = os.path.join(dirpath, f)
                    rel = os.path.relpath(p, root).replace(os.sep, "/")
                    sizes[rel] = os.path.getsize(p)
            return sizes
        import fsspec

        fs, path = fsspec.url_to_fs(url, **(storage_options or {}))
        if url.startswith(("http://", "https://")):
            return None  # HTTP has no listing; sizes would be guesses
        base = path.rstrip("/")
        for p, info in fs.find(base, detail=True).items():
            sizes[p[len(base) + 1 :]] = int(info.get("size") or 0)
    return sizes


def _bytes_under(sizes: dict[str, int] | None, prefix: str) -> int | None:
    if sizes is None:
        return None
    return sum(v for k, v in sizes.items() if k == prefix or k.startswith(prefix + "/"))


def _per(n: int | None, d: float) -> float | None:
    return None if n is None else n / max(1.0, d)


def describe_cache(
    url: str,
    *,
    storage_options: dict | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """A JSON-able description of a cache: format, provenance, layout, arrays, bytes, fidelity.

    Byte counts are ``None`` where the store cannot be listed (plain HTTP).
    """
    r = open_cache(url, storage_options=storage_options, cache_dir=cache_dir, allow_incomplete=True)
    s = r.schema
    sizes = array_bytes(r.url, storage_options)
    arrays = []
    for path, arr in sorted(r._arrays.items()):
        chunks, shards, codecs = _codec_summary(arr.metadata.to_dict())
        arrays.append(
            {
                "path": path,
                "shape": list(arr.shape),
                "dtype": str(arr.dtype),
                "chunks": chunks,
                "shards": shards,
                "codecs": codecs,
                "bytes": _bytes_under(sizes, path),
            }
        )
    logits_bytes = _bytes_under(sizes, Arrays.LOGITS)
    features_bytes = _bytes_under(sizes, Arrays.FEATURES)
    target_bytes = None if logits_bytes is None else logits_bytes + (features_bytes or 0)
    done = int(r.done.sum())
    images_done = done / s.entries_per_image
    d = s.to_dict()
    return {
        "url": r.url,
        "format": d["format"],
        "format_version": s.format_version,
        "status": s.status,
        "mode": s.mode,
        "teacher": d["teacher"],
        "dataset": d["dataset"],
        "images": s.num_images,
        "classes": s.dataset.num_classes,
        "entries": s.num_entries,
        "entries_done": done,
        "entries_per_image": s.entries_per_image,
        "shards": s.num_shards,
        "shard_entries": s.shard_entries,
        "views": d["views"],
        "dense": d["dense"],
        "logits": d["logits"],
        "features": d["features"],
        "arrays": arrays,
        "bytes_total": None if sizes is None else sum(sizes.values()),
        "bytes_targets": target_bytes,
        "bytes_per_entry": _per(target_bytes, done),
        "bytes_per_image": _per(target_bytes, images_done),
        "bytes_logits_per_entry": _per(logits_bytes, done),
        "bytes_features_per_entry": _per(features_bytes, done) if s.features is not None else 0.0,
        "fidelity": s.fidelity,
        "build": s.build,
        "build_seconds": s.build.get("seconds"),
        "teacher_check": s.build.get("teacher_check"),  # the build's sanity gate (None: not run)
        "tool_version": s.tool_version,
        "created": s.created,
        "completed": s.completed,
    }
