"""skd's cache store: format, codecs, datasets, and the tools to inspect, verify and share caches.

Torch-free by design (numpy, zarr, numcodecs, fsspec, pillow): anyone on a team can inspect and
verify a cache without installing a deep-learning stack.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import *  # noqa: F403
from .schema import FORMAT_VERSION, CacheSchema, View
from .store import CacheEntry, CacheReader, open_cache

__all__ = ["FORMAT_VERSION", "CacheEntry", "CacheReader", "CacheSchema", "View", "__version__", "open_cache"]
