"""Where a cache lives: a local path or any fsspec URL, turned into a zarr store.

Remote filesystems are created lazily in the process that uses them (fsspec's async filesystems are
not fork-safe), and storage errors that a user can fix (missing bucket, missing credentials,
permissions, full disk) become one-line :class:`~cache_tools.errors.CacheError` messages.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import CacheError, CacheNotFoundError, CacheWriteError

__all__ = [
    "is_remote",
    "local_path",
    "check_writable",
    "open_store",
    "read_through_store",
    "remove_store",
    "storage_errors",
    "url_exists",
]

logger = logging.getLogger(__name__)


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
    cache_key: str = "",
) -> Any:
    """A zarr store for ``url``.

    Args:
        url: a local path, ``file://`` URL or any fsspec URL (``s3://bucket/x.zarr``, ``gcs://``,
            ``https://`` for read-only HTTP, ``memory://`` ...).
        read_only: open without write permission (what every reader uses).
        storage_options: passed to fsspec (e.g. ``{"endpoint_url": ..., "anon": True}``).
        cache_dir: for remote stores, a local read-through cache (:func:`read_through_store`): each
            object is downloaded whole once, later reads (byte ranges of shards included) come from
            local disk. Ignored for local paths. Only for stores whose data objects no longer change
            (a complete cache); :func:`cache_tools.store.open_cache` uses it only then.
        cache_key: mixed into the cache's namespace, so that a store rebuilt at the same URL never
            reads the old store's objects (``open_cache`` passes a digest of the schema attribute).
    """
    import zarr.storage

    url = str(url)
    if not read_only:
        check_writable(url)
    if not is_remote(url):
        path = local_path(url)
        if read_only and not path.exists():
            raise CacheNotFoundError(f"no cache at {url}: the path does not exist")
        return zarr.storage.LocalStore(path, read_only=read_only)
    if cache_dir is not None and not read_only:
        raise CacheError("a read-through cache (--cache-dir) is only for reading")
    with storage_errors(url):
        store = zarr.storage.FsspecStore.from_url(url, storage_options=dict(storage_options or {}), read_only=read_only)
    if cache_dir is None:
        return store
    namespace = hashlib.sha256(f"{url}\n{cache_key}".encode()).hexdigest()[:32]
    return read_through_store(store, Path(cache_dir).expanduser() / namespace)


def check_writable(url: str) -> None:
    """Refuse destinations that can only be read (plain HTTP), before anything is attempted."""
    if str(url).startswith(("http://", "https://")):
        raise CacheWriteError(
            f"cannot write {url}: plain HTTP(S) is read-only; write to a path or an object store "
            "(s3://, gs://, ...) and serve that over HTTP"
        )


def _bounds(byte_range: Any, size: int) -> tuple[int, int]:
    """``[start, stop)`` of a zarr byte request on an object of ``size`` bytes (stop may pass the end)."""
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest

    if isinstance(byte_range, RangeByteRequest):
        return byte_range.start, byte_range.end
    if isinstance(byte_range, OffsetByteRequest):
        return byte_range.offset, size
    if isinstance(byte_range, SuffixByteRequest):
        return max(0, size - byte_range.suffix), size
    raise ValueError(f"unexpected byte range {byte_range!r}")


class _ReadThrough:
    """A read-only zarr store that keeps a local copy of every object it reads.

    fsspec's ``simplecache::`` cannot serve here: under zarr's async FsspecStore it awaits the
    remote filesystem on the wrong event loop, seeks to negative offsets for the shard-index
    suffix reads, and writes downloads in place, so a concurrent reader can see half a file.
    This store downloads each object whole (once per process, concurrent requests share the
    download), writes it to a temporary name and renames it into place (atomic, so several
    processes can share one cache directory), and answers byte ranges from the local copy.
    Metadata documents (``zarr.json``) always come from the remote store.

    A local copy is trusted only while what it holds matches the store's own checks: a reader
    that finds an entry missing or not matching its checksum calls :meth:`forget` on the objects
    it read and reads them again, so a store repaired at its origin (``skdcache copy
    --checksum``) is read afresh, and a copy damaged on local disk heals itself.

    The methods only: :func:`_read_through_class` mixes them into zarr's ``WrapperStore`` on first
    use, so that importing this module does not import zarr.
    """

    _store: Any

    def __init__(self, store: Any, directory: Path) -> None:
        super().__init__(store)  # type: ignore[call-arg]  # zarr's WrapperStore, see the class docstring
        self.directory = Path(directory)
        self._inflight: dict[str, Any] = {}
        self.hits = 0
        self.misses = 0

    def _with_store(self, store: Any) -> Any:
        return type(self)(store, self.directory)

    def with_read_only(self, read_only: bool = False) -> Any:
        if not read_only:
            raise CacheError("a read-through cache (--cache-dir) is only for reading")
        return self

    @property
    def read_only(self) -> bool:
        return True

    def _local(self, key: str) -> Path:
        # hashed names: keys come from an untrusted store and must never name a path
        return self.directory / hashlib.sha256(key.encode()).hexdigest()

    async def _fetch(self, key: str, prototype: Any) -> bytes | None:
        import asyncio

        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            buf = await self._store.get(key, prototype)
            data = None if buf is None else buf.to_bytes()
            if data is not None:
                await asyncio.to_thread(self._save, key, data)
            fut.set_result(data)
            return data
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved here: waiters re-raise it, nobody else has to
            raise
        finally:
            self._inflight.pop(key, None)

    def _save(self, key: str, data: bytes) -> None:
        target = self._local(key)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except OSError as exc:  # a full or read-only cache disk must not break reading
            logger.warning("read-through cache %s: cannot keep %s (%s)", self.directory, key, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _read_local(self, key: str, byte_range: Any) -> bytes | None:
        try:
            with open(self._local(key), "rb") as f:
                if byte_range is None:
                    return f.read()
                size = os.fstat(f.fileno()).st_size
                start, stop = _bounds(byte_range, size)
                f.seek(min(start, size))
                return f.read(max(0, min(stop, size) - start))
        except FileNotFoundError:
            return None

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        if key.rsplit("/", 1)[-1] == "zarr.json":
            return await self._store.get(key, prototype, byte_range)
        data = self._read_local(key, byte_range)
        if data is not None:
            self.hits += 1
            return prototype.buffer.from_bytes(data)
        self.misses += 1
        whole = await self._fetch(key, prototype)
        if whole is None:
            return None
        if byte_range is not None:
            whole = whole[slice(*_bounds(byte_range, len(whole)))]
        return prototype.buffer.from_bytes(whole)

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list:
        import asyncio

        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    def forget(self, keys: list[str]) -> int:
        """Drop the local copies of ``keys`` (the next read fetches them again); returns how many existed."""
        dropped = 0
        for key in keys:
            try:
                self._local(key).unlink()
                dropped += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise CacheError(f"read-through cache {self.directory}: cannot drop a stale copy ({exc})") from exc
        return dropped

    async def set(self, key: str, value: Any) -> None:
        raise CacheError("a read-through cache (--cache-dir) is only for reading")

    async def delete(self, key: str) -> None:
        raise CacheError("a read-through cache (--cache-dir) is only for reading")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._store == self._store and other.directory == self.directory

    __hash__ = None  # type: ignore[assignment]


@functools.cache
def _read_through_class() -> type:
    """The read-through store class: :class:`_ReadThrough` over zarr's ``WrapperStore``, made once."""
    from zarr.storage import WrapperStore

    class _ReadThroughStore(_ReadThrough, WrapperStore):
        __doc__ = _ReadThrough.__doc__

    return _ReadThroughStore


def read_through_store(store: Any, directory: str | os.PathLike) -> Any:
    """Wrap a (remote) zarr store with a local read-through cache in ``directory``; see :func:`open_store`.

    The class is defined on first use, so that importing this module does not import zarr.
    """
    return _read_through_class()(store, Path(directory))


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
    if isinstance(exc, OSError) and exc.errno in (
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.ENAMETOOLONG,
        errno.EDQUOT,
    ):
        return f"{exc.strerror.lower()}: {exc.filename}" if exc.strerror else text
    if isinstance(exc, ImportError) and "s3fs" in text:
        return "s3:// URLs need the s3fs package: pip install 'skd[s3]'"
    if name == "ClientResponseError" and hasattr(exc, "status"):  # aiohttp (HTTP filesystem)
        status = int(exc.status)  # type: ignore[attr-defined]
        if status in (401, 403):
            return f"access denied by the server (HTTP {status})"
        return f"the server answered HTTP {status} {getattr(exc, 'message', '')}".rstrip()
    if name in ("ServerDisconnectedError", "ServerTimeoutError"):
        return f"cannot reach the server ({text})"
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
