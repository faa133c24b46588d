"""Where a cache lives: a local path or any fsspec URL, turned into a zarr store.

Remote filesystems are created lazily in the process that uses them (fsspec's async filesystems are
not fork-safe), and storage errors that a user can fix (missing bucket, missing credentials,
permissions, full disk) become one-line :class:`~cache_tools.errors.CacheError` messages.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import CacheError, CacheNotFoundError, CacheWriteError

__all__ = ["is_remote", "local_path", "open_store", "remove_store", "storage_errors", "url_exists"]


def is_remote(url: str) -> bool:
    """True for fsspec URLs other than plain local paths (``file://`` counts as local)."""
    return "://" in str(url) and not str(url).startswith("file://")


def local_path(url: str | os.PathLike) -> Path:
    url = str(url)
    return Path(url[len("file://") :] if url.startswith("file://") else url).expanduser()


def _filesystem(url: str, storage_options: dict | None):
    import fsspec

    fs, path = fsspec.url_to_fs(url, **(storage_options or {}))
    return fs, path


def url_exists(url: str, storage_options: dict | None = None) -> bool:
    """Whether anything exists at ``url`` (a directory/prefix or an object)."""
    if not is_remote(url):
        return local_path(url).exists()
    with storage_errors(url):
        fs, path = _filesystem(url, storage_options)
        return bool(fs.exists(path)) or bool(fs.exists(path.rstrip("/") + "/zarr.json"))


def open_store(
    url: str | os.PathLike,
    *,
    read_only: bool,
    storage_options: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Any:
    """A zarr store for ``url``.

    Args:
        url: a local path, ``file://`` URL or any fsspec URL (``s3://bucket/x.zarr``, ``gcs://``,
            ``https://`` for read-only HTTP, ``memory://`` ...).
        read_only: open without write permission (what every reader uses).
        storage_options: passed to fsspec (e.g. ``{"endpoint_url": ..., "anon": True}``).
        cache_dir: for remote stores read through a local whole-file cache (fsspec ``simplecache``):
            the first epoch downloads each shard once, later epochs read local disk.
    """
    import zarr.storage

    url = str(url)
    if not is_remote(url):
        path = local_path(url)
        if read_only and not path.exists():
            raise CacheNotFoundError(f"no cache at {url}: the path does not exist")
        return zarr.storage.LocalStore(path, read_only=read_only)
    opts = dict(storage_options or {})
    if cache_dir is not None:
        if not read_only:
            raise CacheError("a read-through cache (--cache-dir) is only for reading")
        protocol = url.split("://", 1)[0]
        opts = {protocol: opts, "simplecache": {"cache_storage": str(cache_dir), "same_names": False}}
        url = f"simplecache::{url}"
    with storage_errors(url):
        return zarr.storage.FsspecStore.from_url(url, storage_options=opts, read_only=read_only)


def remove_store(url: str, storage_options: dict | None = None) -> None:
    """Delete a whole store (used by ``--overwrite`` only after every input was validated)."""
    with storage_errors(url):
        if not is_remote(url):
            import shutil

            path = local_path(url)
            if path.exists():
                shutil.rmtree(path)
            return
        fs, path = _filesystem(url, storage_options)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def _describe(exc: BaseException) -> str | None:
    """A user-fixable storage problem, in words, or None for anything else."""
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return "no credentials for the object store: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or a profile)"
    if name in ("ClientError",) and ("AccessDenied" in text or "Forbidden" in text or "403" in text):
        return f"access denied by the object store ({text})"
    if name == "NoSuchBucket" or "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return f"the bucket does not exist ({text})"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"):
        return f"cannot reach the object store endpoint ({text})"
    if isinstance(exc, PermissionError):
        return f"permission denied ({text})"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "no space left on the destination device"
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS,):
        return "the destination is on a read-only file system"
    if isinstance(exc, ImportError) and "s3fs" in text:
        return "s3:// URLs need the s3fs package: pip install 'skd[s3]'"
    if isinstance(exc, ValueError) and "Protocol not known" in text:
        return f"unknown URL protocol ({text})"
    if isinstance(exc, ImportError) and ("Install" in text or "install" in text):
        return text
    return None


@contextlib.contextmanager
def storage_errors(url: str, *, writing: bool = False) -> Iterator[None]:
    """Turn user-fixable storage exceptions raised inside the block into one-line CacheErrors."""
    try:
        yield
    except CacheError:
        raise
    except Exception as exc:
        desc = _describe(exc)
        if desc is None:
            raise
        cls = CacheWriteError if writing or isinstance(exc, OSError) else CacheError
        raise cls(f"{'cannot write' if writing else 'cannot access'} {url}: {desc}") from exc
