"""Error types. Every error a user can fix derives from :class:`SkdError`.

The CLIs print an ``SkdError`` as one line (no traceback) and exit non-zero; anything else is a bug
and keeps its traceback. Subclasses also inherit the matching builtin (``FileNotFoundError``,
``ValueError``, ...) so callers can catch either, as zarr's ``errors.py`` does.
"""

from __future__ import annotations

__all__ = [
    "CacheError",
    "CacheNotFoundError",
    "CacheWriteError",
    "ConfigError",
    "ConfigMismatchError",
    "CorruptEntryError",
    "DatasetError",
    "FormatVersionError",
    "IncompleteCacheError",
    "ModelError",
    "NotACacheError",
    "SchemaError",
    "SchemaMismatchError",
    "SkdError",
    "UnsafeCacheError",
    "WeightsError",
]


class SkdError(Exception):
    """Base class of errors caused by user input; the message says what is wrong and how to fix it."""


class CacheError(SkdError):
    """Something is wrong with a cache store."""


class CacheNotFoundError(CacheError, FileNotFoundError):
    """No store at the given URL."""


class NotACacheError(CacheError, ValueError):
    """The URL holds something, but not an skd cache."""


class FormatVersionError(CacheError, ValueError):
    """The store was written in a format version this reader does not know."""


class SchemaError(CacheError, ValueError):
    """The store's attributes or array metadata do not follow the schema."""


class UnsafeCacheError(SchemaError):
    """The store asks for something a reader must never do (unknown codec, object dtype, path escape)."""


class SchemaMismatchError(CacheError, ValueError):
    """Cache and dataset (or cache and training configuration) do not belong together."""


class ConfigMismatchError(CacheError, ValueError):
    """An existing store was built with a different configuration than the one requested."""


class IncompleteCacheError(CacheError):
    """The store's build has not finished (some entries are missing)."""


class CorruptEntryError(CacheError):
    """An entry's chunks are missing, cannot be decoded, or do not match their checksum."""


class CacheWriteError(CacheError, OSError):
    """The destination cannot be written (permissions, full disk, missing credentials)."""


class DatasetError(SkdError, ValueError):
    """The image dataset is missing, malformed, or does not match what was asked."""


class ModelError(SkdError, ValueError):
    """Unknown model name or unusable model definition."""


class WeightsError(ModelError):
    """A checkpoint cannot be read or does not fit the architecture."""


class ConfigError(SkdError, ValueError):
    """An option value is invalid or options contradict each other."""
