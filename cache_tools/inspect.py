"""What a cache holds, as plain data (``skdcache info``)."""

from __future__ import annotations

import os
from typing import Any

from .schema import Arrays
from .storage import is_remote, local_path, storage_errors
from .store import CacheReader, open_cache

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


def array_bytes(url: str, storage_options: dict | None = None) -> dict[str, int]:
    """Stored bytes under each top-level array path of a store (metadata documents included)."""
    sizes: dict[str, int] = {}
    with storage_errors(url):
        if not is_remote(url):
            root = local_path(url)
            for dirpath, _, files in os.walk(root):
                for f in files:
                    p = os.path.join(dirpath, f)
                    rel = os.path.relpath(p, root).replace(os.sep, "/")
                    sizes[rel] = os.path.getsize(p)
        else:
            import fsspec

            fs, path = fsspec.url_to_fs(url, **(storage_options or {}))
            base = path.rstrip("/")
            for p, info in fs.find(base, detail=True).items():
                sizes[p[len(base) + 1 :]] = int(info.get("size") or 0)
    return sizes


def _bytes_under(sizes: dict[str, int], prefix: str) -> int:
    return sum(v for k, v in sizes.items() if k == prefix or k.startswith(prefix + "/"))


def describe_cache(url: str, *, storage_options: dict | None = None, reader: CacheReader | None = None) -> dict[str, Any]:
    """A JSON-able description of a cache: schema, arrays with codecs and bytes, fidelity."""
    r = reader or open_cache(url, storage_options=storage_options, allow_incomplete=True)
    s = r.schema
    sizes = array_bytes(r.url, storage_options)
    total = sum(sizes.values())
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
    target_bytes = _bytes_under(sizes, Arrays.LOGITS) + _bytes_under(sizes, Arrays.FEATURES)
    logits_bytes = _bytes_under(sizes, Arrays.LOGITS)
    done = int(r.done.sum())
    d = s.to_dict()
    return {
        "url": r.url,
        "format_version": s.format_version,
        "status": s.status,
        "mode": s.mode,
        "teacher": d["teacher"],
        "dataset": {k: v for k, v in d["dataset"].items() if k != "class_names"} | {"class_names": list(s.dataset.class_names)},
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
        "bytes_total": total,
        "bytes_targets": target_bytes,
        "bytes_per_entry": target_bytes / max(1, done),
        "bytes_per_image": target_bytes / max(1, done / s.entries_per_image),
        "bytes_logits_per_entry": logits_bytes / max(1, done),
        "bytes_features_per_entry": (target_bytes - logits_bytes) / max(1, done),
        "fidelity": s.fidelity,
        "build": s.build,
        "tool_version": s.tool_version,
        "created": s.created,
        "completed": s.completed,
    }
