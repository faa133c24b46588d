"""The cache format, defined once.

Every array name, attribute key and the format version live here; readers and writers never spell
them themselves. ``docs/cache_format.md`` is the normative text this module implements.

A cache is a zarr v3 group. Its root attribute ``skd_cache`` holds a :class:`CacheSchema`
serialised with :meth:`CacheSchema.to_dict`. Entries (one per image in a dense store, one per view
in a views store) are the first axis of every per-entry array; one entry is one chunk, and a shard
holds ``shard_entries`` consecutive entries that always cover whole images.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

from .errors import FormatVersionError, SchemaError, UnsafeCacheError

__all__ = [
    "COMPRESSORS",
    "FEATURE_CODECS",
    "FIDELITY_COLUMNS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LOGIT_CODECS",
    "ROOT_ATTR",
    "Arrays",
    "CacheSchema",
    "Compressor",
    "DatasetStamp",
    "DenseParams",
    "TargetLayout",
    "TeacherStamp",
    "View",
    "ViewsParams",
    "ids_digest",
    "first_difference",
    "parse_hw",
]

FORMAT_NAME = "skd-cache"
#: Bump on any change a v1 reader could misread; old versions keep a fixture in tests/fixtures.
FORMAT_VERSION = 1
#: Root-group attribute that holds the schema.
ROOT_ATTR = "skd_cache"

MODES = ("dense", "views")
STATUSES = ("building", "complete")
LOGIT_CODECS = ("fp32", "fp16", "int8-pixel", "int8-channel", "gap-u8", "gap-u16")
FEATURE_CODECS = ("fp32", "fp16", "int8", "pca")
COMPRESSORS = ("none", "zstd", "blosc-lz4", "blosc-zstd")
POOLS = ("max", "avg")

#: Sizes no real store comes near (docs/cache_format.md, "Limits"). A store claiming more is refused
#: from its numbers alone, before any array is allocated or read: a reader's work must never scale
#: with what a few bytes of untrusted metadata claim.
MAX_IMAGES = 1 << 22
MAX_ENTRIES = 1 << 22
MAX_SHARD_ENTRIES = 1 << 16
MAX_CLASSES = 1 << 14
MAX_CHANNELS = 1 << 16
#: teacher grid (h or w): an image side of 65536 pixels at stride 8 (ceil mode, +1)
MAX_GRID = (1 << 13) + 1
#: pixels per side of an image, a scaled image, a view's crop or a tile
MAX_PIXELS = 1 << 16
MAX_ID_BYTES = 1024

#: Per-entry fidelity measured at build time (NaN for entries that were not sampled).
FIDELITY_COLUMNS = (
    "kl_t1_mean",
    "kl_t1_max",
    "kl_t4_mean",
    "kl_t4_max",
    "argmax_agreement",
    "pair_cos_err_mean",
    "pair_cos_err_max",
    "valid_pixels",
)


class Arrays:
    """Array paths inside the store (group/array)."""

    # per image (first axis = image index)
    IMAGE_ID = "images/id"  # (I, L) uint8, UTF-8 bytes, zero padded
    IMAGE_SHA256 = "images/sha256"  # (I, 32) uint8, sha256 of the image file bytes
    IMAGE_SIZE = "images/size"  # (I, 2) int32, (H, W) pixels
    # per entry (first axis = entry index)
    ENTRY_IMAGE = "entries/image"  # (E,) int32 image index
    ENTRY_SCALE = "entries/scale"  # (E,) float32
    ENTRY_RESIZED = "entries/resized"  # (E, 2) int32 (Hs, Ws) after scaling
    ENTRY_BOX = "entries/box"  # (E, 4) int32 (y0, x0, h, w) in the resized image
    ENTRY_FLIP = "entries/flip"  # (E,) uint8
    ENTRY_GRID = "entries/grid"  # (E, 2) int32 valid (h, w) of the logit grid
    ENTRY_DONE = "entries/done"  # (E,) uint8, 1 once the entry's data is written
    ENTRY_CHECKSUM = "entries/checksum"  # (E,) uint64 blake2b-64 of the encoded parts
    ENTRY_FIDELITY = "entries/fidelity"  # (E, len(FIDELITY_COLUMNS)) float32
    ENTRY_CLIPPED = "entries/clipped"  # (E,) uint32 values clipped by the lossy codecs
    LOGITS = "logits"  # group; parts are logits/<part>
    FEATURES = "features"  # group; parts are features/<part>
    PCA_BASIS = "features/pca_basis"  # (k, C) float32
    PCA_MEAN = "features/pca_mean"  # (C,) float32

    ENTRY_TABLE = (ENTRY_IMAGE, ENTRY_SCALE, ENTRY_RESIZED, ENTRY_BOX, ENTRY_FLIP, ENTRY_GRID)

    @staticmethod
    def logits_part(part: str) -> str:
        return f"{Arrays.LOGITS}/{part}"

    @staticmethod
    def features_part(part: str) -> str:
        return f"{Arrays.FEATURES}/{part}"


class View(NamedTuple):
    """The geometry of one entry: which image, how it was scaled, cropped and flipped.

    The image is resized to ``resized`` = (Hs, Ws) (scale ``scale``), padded bottom/right to at
    least the box size, cropped to ``box`` = (y0, x0, h, w) and mirrored when ``flip``. A dense
    entry is the identity view of its image (or its mirror image).
    """

    image: int
    scale: float
    resized: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool

    @classmethod
    def identity(cls, image: int, size: tuple[int, int], flip: bool = False) -> View:
        h, w = size
        return cls(image, 1.0, (h, w), (0, 0, h, w), flip)


def ids_digest(ids: list[str]) -> str:
    """sha256 over the newline-joined image ids: a cheap proof that two id lists are equal."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def first_difference(a: Any, b: Any, path: str = "", *, words: tuple[str, str] = ("vs", "")) -> str | None:
    """The first differing field of two nested dicts, as ``"path.to.key: a <words> b"``, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            found = first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k, words=words)
            if found:
                return found
        return None
    if a == b:
        return None
    middle, tail = words
    return f"{path}: {a!r} {middle} {b!r}{' ' + tail if tail else ''}"


def parse_hw(value: str | tuple[int, int] | list[int], what: str = "size") -> tuple[int, int]:
    """'512x1024' / '512' / (512, 1024) -> (512, 1024)."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:[xX,]\s*(\d+))?\s*", value)
        if not m:
            raise SchemaError(f"{what} must look like HxW (e.g. 512x1024), got {value!r}")
        h = int(m.group(1))
        w = int(m.group(2)) if m.group(2) else h
    else:
        vals = list(value)
        if len(vals) != 2:
            raise SchemaError(f"{what} must have two values (H, W), got {value!r}")
        h, w = int(vals[0]), int(vals[1])
    if h <= 0 or w <= 0:
        raise SchemaError(f"{what} must be positive, got {h}x{w}")
    return h, w


# --------------------------------------------------------------------------------------------------
# validation helpers: every reader of untrusted attributes goes through these


def _get(d: dict, key: str, where: str) -> Any:
    if not isinstance(d, dict):
        raise SchemaError(f"{where} must be an object, got {type(d).__name__}")
    if key not in d:
        raise SchemaError(f"{where}.{key} is missing")
    return d[key]


def _str(d: dict, key: str, where: str, *, choices: tuple[str, ...] | None = None, max_len: int = 512) -> str:
    v = _get(d, key, where)
    if not isinstance(v, str) or len(v) > max_len:
        raise SchemaError(f"{where}.{key} must be a string of at most {max_len} characters")
    if choices is not None and v not in choices:
        raise UnsafeCacheError(f"{where}.{key} is {v!r}; this reader knows only {', '.join(choices)}")
    return v


def _opt_str(d: dict, key: str, where: str) -> str | None:
    if d.get(key) is None:
        return None
    return _str(d, key, where)


def _int(d: dict, key: str, where: str, *, lo: int = 0, hi: int = 2**40) -> int:
    v = _get(d, key, where)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise SchemaError(f"{where}.{key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _float(d: dict, key: str, where: str) -> float:
    v = _get(d, key, where)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SchemaError(f"{where}.{key} must be a finite number, got {v!r}")
    return float(v)


def _bool(d: dict, key: str, where: str) -> bool:
    v = _get(d, key, where)
    if not isinstance(v, bool):
        raise SchemaError(f"{where}.{key} must be true or false, got {v!r}")
    return v


def _ints(d: dict, key: str, where: str, n: int | None = None, lo: int = 0, hi: int = 2**31) -> tuple[int, ...]:
    v = _get(d, key, where)
    if not isinstance(v, list) or (n is not None and len(v) != n):
        raise SchemaError(f"{where}.{key} must be a list of {n or 'some'} integers, got {str(v)[:80]}")
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int) or x < lo or x > hi:
            raise SchemaError(f"{where}.{key} must hold integers in [{lo}, {hi}], got {v!r}")
    return tuple(v)


def _strs(d: dict, key: str, where: str, max_items: int = 1024) -> tuple[str, ...]:
    v = _get(d, key, where)
    if not isinstance(v, list) or len(v) > max_items or not all(isinstance(x, str) and len(x) <= 256 for x in v):
        raise SchemaError(f"{where}.{key} must be a list of at most {max_items} strings of at most 256 characters")
    return tuple(v)


def _json_scalars(d: Any, where: str, depth: int = 0) -> dict:
    """A free-form attribute dict: JSON scalars, lists and dicts only, bounded depth."""
    if not isinstance(d, dict):
        raise SchemaError(f"{where} must be an object")
    if depth > 4:
        raise SchemaError(f"{where} is nested too deeply")
    for k, v in d.items():
        if not isinstance(k, str):
            raise SchemaError(f"{where} keys must be strings")
        if isinstance(v, dict):
            _json_scalars(v, f"{where}.{k}", depth + 1)
        elif isinstance(v, list):
            if not all(x is None or isinstance(x, (str, int, float, bool)) for x in v):
                raise SchemaError(f"{where}.{k} must be a list of scalars")
        elif not (v is None or isinstance(v, (str, int, float, bool))):
            raise SchemaError(f"{where}.{k} has an unsupported value type {type(v).__name__}")
    return d


# --------------------------------------------------------------------------------------------------
# schema dataclasses


@dataclass(frozen=True)
class Compressor:
    """The lossless stage applied to every part of a target (a standard zarr v3 codec)."""

    name: str = "zstd"
    level: int = 1

    def __post_init__(self) -> None:
        if self.name not in COMPRESSORS:
            raise SchemaError(f"unknown compressor {self.name!r}; choose one of {', '.join(COMPRESSORS)}")
        if not 0 <= self.level <= 22:
            raise SchemaError(f"compressor level must be in 0..22, got {self.level}")

    @classmethod
    def parse(cls, text: str) -> Compressor:
        """'zstd', 'zstd:5', 'blosc-lz4:5', 'none' -> Compressor."""
        name, _, level = text.partition(":")
        default = {"zstd": 1, "blosc-lz4": 5, "blosc-zstd": 1, "none": 0}
        if name not in default:
            raise SchemaError(f"unknown compressor {name!r}; choose one of {', '.join(COMPRESSORS)}")
        return cls(name=name, level=int(level) if level else default[name])

    def to_dict(self) -> dict:
        return {"name": self.name, "level": self.level}

    @classmethod
    def from_dict(cls, d: dict, where: str = "compressor") -> Compressor:
        return cls(name=_str(d, "name", where, choices=COMPRESSORS), level=_int(d, "level", where, hi=22))


@dataclass(frozen=True)
class TargetLayout:
    """How one teacher output (logits or feature) is stored.

    Attributes:
        codec: value codec (see ``cache_tools.codecs``).
        channels: channels of the teacher output (K classes, or C feature channels).
        grid: (h, w) canvas of the teacher's grid; an entry's valid extent is ``entries/grid``.
        pool: features only — "max" or "avg" pooling applied before storing.
        block: features only — (bh, bw) pooling kernel = stride on the teacher grid, ceil mode;
            (1, 1) stores the full map.
        stored_channels: channels actually stored (PCA: k).
        params: codec parameters (JSON scalars).
        compressor: lossless stage.
    """

    codec: str
    channels: int
    grid: tuple[int, int]
    compressor: Compressor = field(default_factory=Compressor)
    pool: str | None = None
    block: tuple[int, int] = (1, 1)
    stored_channels: int | None = None
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # normalise so that a layout equals its own JSON round trip
        object.__setattr__(self, "grid", tuple(int(v) for v in self.grid))
        object.__setattr__(self, "block", tuple(int(v) for v in self.block))
        if self.stored_channels is None:
            object.__setattr__(self, "stored_channels", self.channels)

    @property
    def cells(self) -> tuple[int, int]:
        """(hp, wp): stored spatial size = ceil(grid / block)."""
        return (-(-self.grid[0] // self.block[0]), -(-self.grid[1] // self.block[1]))

    @property
    def depth(self) -> int:
        return int(self.stored_channels)  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        return {
            "codec": self.codec,
            "channels": self.channels,
            "stored_channels": self.depth,
            "grid": list(self.grid),
            "pool": self.pool,
            "block": list(self.block),
            "params": dict(self.params),
            "compressor": self.compressor.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict, where: str, codecs: tuple[str, ...]) -> TargetLayout:
        pool = d.get("pool") if isinstance(d, dict) else None
        if pool is not None and pool not in POOLS:
            raise UnsafeCacheError(f"{where}.pool is {pool!r}; this reader knows only {', '.join(POOLS)}")
        return cls(
            codec=_str(d, "codec", where, choices=codecs),
            channels=_int(d, "channels", where, lo=1, hi=MAX_CHANNELS),
            stored_channels=_int(d, "stored_channels", where, lo=1, hi=MAX_CHANNELS),
            grid=_ints(d, "grid", where, 2, lo=1, hi=MAX_GRID),  # type: ignore[arg-type]
            pool=pool,
            block=_ints(d, "block", where, 2, lo=1, hi=MAX_GRID),  # type: ignore[arg-type]
            params=_json_scalars(_get(d, "params", where), f"{where}.params"),
            compressor=Compressor.from_dict(_get(d, "compressor", where), f"{where}.compressor"),
        )


#: Output grid conventions: "8k+1" (ceil-mode stem pool, skd) and "8k" (``ceil(n/8)``, mmseg/CIRKD).
GRID_CONVENTIONS = ("8k+1", "8k")


@dataclass(frozen=True)
class TeacherStamp:
    """Where the targets came from: the one provenance type of a model (``pipeline.teachers.create_teacher``
    makes it as ``Teacher.info``; stores write it under ``teacher``)."""

    name: str
    architecture: str
    num_classes: int
    feature_channels: int
    weights_sha256: str | None
    random_weights: bool
    normalization: dict
    parameters: int = 0
    seed: int | None = None
    weights_path: str | None = None
    # the teacher family's conventions (pipeline.families); stores from before families read as skd's
    family: str = "skd"
    grid: str = "8k+1"  # "8k+1": ceil-mode stem, 65 nodes for 512 pixels; "8k": ceil(n/8), 64 for 512
    align_corners: bool = True  # where grid nodes sit on the pixels (node j at j(L-1)/(n-1) when True)
    ignore_index: int = 255  # the family's own ignore label (the dataset's is DatasetStamp.ignore_index)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "teacher") -> TeacherStamp:
        norm = _json_scalars(_get(d, "normalization", where), f"{where}.normalization")
        sha = _opt_str(d, "weights_sha256", where)
        if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise SchemaError(f"{where}.weights_sha256 must be 64 hex digits")
        seed = d.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise SchemaError(f"{where}.seed must be an integer or null")
        return cls(
            name=_str(d, "name", where),
            architecture=_str(d, "architecture", where),
            num_classes=_int(d, "num_classes", where, lo=1, hi=MAX_CLASSES),
            feature_channels=_int(d, "feature_channels", where, lo=1, hi=MAX_CHANNELS),
            weights_sha256=sha,
            random_weights=_bool(d, "random_weights", where),
            normalization=norm,
            parameters=_int(d, "parameters", where),
            seed=seed,
            weights_path=_opt_str(d, "weights_path", where),
            family=_str(d, "family", where, max_len=64) if "family" in d else "skd",
            grid=_str(d, "grid", where, choices=GRID_CONVENTIONS) if "grid" in d else "8k+1",
            align_corners=_bool(d, "align_corners", where) if "align_corners" in d else True,
            ignore_index=_int(d, "ignore_index", where, lo=-1, hi=65535) if "ignore_index" in d else 255,
        )


@dataclass(frozen=True)
class DatasetStamp:
    """Which images the cache was built from, and which of them have labels.

    ``unlabelled`` lists the store's images without a label as sorted, disjoint half-open index
    ranges ``(start, stop)`` (a split such as Cityscapes' ``train_extra`` is one run). It is written
    only when some image is unlabelled, so a labelled cache's document is unchanged, and a store
    written before it existed reads as all labelled.
    """

    name: str
    splits: tuple[str, ...]
    num_images: int
    ids_sha256: str
    class_names: tuple[str, ...]
    ignore_index: int = 255
    unlabelled: tuple[tuple[int, int], ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labelled(self) -> list[bool]:
        """Whether each image of the store (in store order) has a label."""
        out = [True] * self.num_images
        for start, stop in self.unlabelled:
            out[start:stop] = [False] * (stop - start)
        return out

    @property
    def num_labelled(self) -> int:
        return self.num_images - sum(stop - start for start, stop in self.unlabelled)

    def with_labels(self, labelled: list[bool] | tuple[bool, ...]) -> DatasetStamp:
        """This stamp recording which images (in store order) have labels."""
        flags = [bool(v) for v in labelled]
        if len(flags) != self.num_images:
            raise ValueError(f"{len(flags)} label flags for {self.num_images} images")
        runs: list[tuple[int, int]] = []
        for i, has in enumerate(flags):
            if has:
                continue
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        return replace(self, unlabelled=tuple(runs))

    def to_dict(self) -> dict:
        d = {
            "name": self.name,
            "splits": list(self.splits),
            "num_images": self.num_images,
            "ids_sha256": self.ids_sha256,
            "class_names": list(self.class_names),
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
        }
        if self.unlabelled:
            d["unlabelled"] = [list(r) for r in self.unlabelled]
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "dataset") -> DatasetStamp:
        out = cls(
            name=_str(d, "name", where),
            splits=_strs(d, "splits", where),
            num_images=_int(d, "num_images", where, lo=1, hi=MAX_IMAGES),
            ids_sha256=_str(d, "ids_sha256", where),
            class_names=_strs(d, "class_names", where, max_items=MAX_CLASSES),
            ignore_index=_int(d, "ignore_index", where, hi=65535),
            unlabelled=_ranges(d.get("unlabelled", []), f"{where}.unlabelled", int(d.get("num_images", 0))),
        )
        if _int(d, "num_classes", where, lo=1) != out.num_classes:
            raise SchemaError(f"{where}.num_classes disagrees with {where}.class_names")
        return out


def _ranges(value: Any, where: str, n: int) -> tuple[tuple[int, int], ...]:
    """Sorted, disjoint, non-empty ``[start, stop)`` ranges within ``[0, n]``."""
    if not isinstance(value, list) or len(value) > MAX_IMAGES:
        raise SchemaError(f"{where} must be a list of [start, stop] ranges")
    out: list[tuple[int, int]] = []
    last = 0
    for r in value:
        ok = isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
        if not ok or not last <= r[0] < r[1] <= n:
            raise SchemaError(f"{where} must hold sorted, disjoint [start, stop) image ranges within 0..{n}, got {r!r}")
        out.append((r[0], r[1]))
        last = r[1]
    return tuple(out)


@dataclass(frozen=True)
class ViewsParams:
    """Views mode: K augmented views per image drawn from ``seed`` (official distribution)."""

    per_image: int
    seed: int
    crop: tuple[int, int]
    scales: tuple[float, ...]
    flip: bool = True

    def to_dict(self) -> dict:
        return {
            "per_image": self.per_image,
            "seed": self.seed,
            "crop": list(self.crop),
            "scales": list(self.scales),
            "flip": self.flip,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "views") -> ViewsParams:
        scales = _get(d, "scales", where)
        if (
            not isinstance(scales, list)
            or not 0 < len(scales) <= 64
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s < 100 for s in scales)
        ):
            raise SchemaError(f"{where}.scales must be a list of 1 to 64 positive numbers")
        return cls(
            per_image=_int(d, "per_image", where, lo=1, hi=1 << 16),
            seed=_int(d, "seed", where, hi=2**63),
            crop=_ints(d, "crop", where, 2, lo=1, hi=MAX_PIXELS),  # type: ignore[arg-type]
            scales=tuple(float(s) for s in scales),
            flip=_bool(d, "flip", where),
        )


@dataclass(frozen=True)
class DenseParams:
    """Dense mode: the teacher on each whole image (and its mirror image when ``flip``)."""

    flip: bool = False
    inference: str = "whole"  # or "slide"
    tile: tuple[int, int] | None = None
    overlap: float = 1.0 / 3.0

    @property
    def per_image(self) -> int:
        return 2 if self.flip else 1

    def to_dict(self) -> dict:
        return {
            "flip": self.flip,
            "inference": self.inference,
            "tile": list(self.tile) if self.tile else None,
            "overlap": self.overlap,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "dense") -> DenseParams:
        tile = d.get("tile") if isinstance(d, dict) else None
        return cls(
            flip=_bool(d, "flip", where),
            inference=_str(d, "inference", where, choices=("whole", "slide")),
            tile=_ints(d, "tile", where, 2, lo=1, hi=MAX_PIXELS) if tile is not None else None,  # type: ignore[arg-type]
            overlap=_float(d, "overlap", where),
        )


@dataclass(frozen=True)
class CacheSchema:
    """Everything a reader needs to know about a store, stored as the root attribute ``skd_cache``."""

    mode: str
    teacher: TeacherStamp
    dataset: DatasetStamp
    num_entries: int
    entries_per_image: int
    shard_entries: int
    id_bytes: int
    logits: TargetLayout
    features: TargetLayout | None = None
    views: ViewsParams | None = None
    dense: DenseParams | None = None
    status: str = "building"
    fidelity: dict = field(default_factory=dict)
    build: dict = field(default_factory=dict)
    tool_version: str = ""
    created: str = ""
    completed: str | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SchemaError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if (self.mode == "views") != (self.views is not None) or (self.mode == "dense") != (self.dense is not None):
            raise SchemaError(f"a {self.mode} store must carry exactly the '{self.mode}' parameters")
        if self.shard_entries % self.entries_per_image:
            raise SchemaError("shard_entries must be a multiple of entries_per_image (shards hold whole images)")
        if self.num_entries != self.dataset.num_images * self.entries_per_image:
            raise SchemaError("num_entries must equal dataset.num_images * entries_per_image")
        if self.logits.channels != self.dataset.num_classes:
            raise SchemaError("logits.channels must equal the dataset's class count")
        self._check_limits()

    def _check_limits(self) -> None:
        """Refuse sizes no real store has (the ``MAX_*`` limits), from the numbers alone."""
        checks = [
            ("num_entries", self.num_entries, MAX_ENTRIES),
            ("dataset.num_images", self.num_images, MAX_IMAGES),
            ("shard_entries", self.shard_entries, MAX_SHARD_ENTRIES),
            ("id_bytes", self.id_bytes, MAX_ID_BYTES),
            ("logits.channels", self.logits.channels, MAX_CLASSES),
        ]
        for name, layout in (("logits", self.logits), ("features", self.features)):
            if layout is not None:
                checks += [(f"{name}.grid", v, MAX_GRID) for v in layout.grid]
                checks += [(f"{name}.block", v, MAX_GRID) for v in layout.block]
                checks.append((f"{name}.stored_channels", layout.depth, layout.channels))
        for name, value, hi in checks:
            if not 1 <= value <= hi:
                raise SchemaError(
                    f"{ROOT_ATTR}.{name} is {value}, outside 1..{hi}: the limits of an skd cache "
                    "(docs/cache_format.md, Limits)"
                )
        if self.num_images * self.id_bytes > 1 << 30:
            raise SchemaError(f"{ROOT_ATTR}: {self.num_images} image ids of {self.id_bytes} bytes exceed 1 GiB")

    # -- derived ---------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return self.dataset.num_images

    @property
    def num_shards(self) -> int:
        return -(-self.num_entries // self.shard_entries)

    @property
    def shard_images(self) -> int:
        return self.shard_entries // self.entries_per_image

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Entry range [start, stop) of a shard."""
        start = shard * self.shard_entries
        return start, min(start + self.shard_entries, self.num_entries)

    def content_key(self) -> dict:
        """The parts of the schema that determine the stored bytes (a resume must match them)."""
        d = self.to_dict()
        for k in ("status", "fidelity", "build", "tool_version", "created", "completed"):
            d.pop(k, None)
        d["teacher"].pop("weights_path", None)
        return d

    def with_status(self, **changes: Any) -> CacheSchema:
        return replace(self, **changes)

    # -- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "status": self.status,
            "mode": self.mode,
            "teacher": self.teacher.to_dict(),
            "dataset": self.dataset.to_dict(),
            "num_entries": self.num_entries,
            "entries_per_image": self.entries_per_image,
            "shard_entries": self.shard_entries,
            "id_bytes": self.id_bytes,
            "logits": self.logits.to_dict(),
            "features": self.features.to_dict() if self.features else None,
            "views": self.views.to_dict() if self.views else None,
            "dense": self.dense.to_dict() if self.dense else None,
            "fidelity": dict(self.fidelity),
            "build": dict(self.build),
            "tool_version": self.tool_version,
            "created": self.created,
            "completed": self.completed,
        }

    @classmethod
    def from_dict(cls, d: Any) -> CacheSchema:
        """Validate untrusted attributes and build the schema.

        Raises:
            FormatVersionError: the store is of a format version this reader does not know.
            SchemaError / UnsafeCacheError: anything else that does not follow the schema.
        """
        where = ROOT_ATTR
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise SchemaError(f"attribute {where!r} does not describe an {FORMAT_NAME} store")
        version = _int(d, "format_version", where, hi=1 << 20)
        if version != FORMAT_VERSION:
            newer = "newer" if version > FORMAT_VERSION else "older"
            raise FormatVersionError(
                f"cache format version {version} is {newer} than this skd reads (format version "
                f"{FORMAT_VERSION}); {'upgrade skd' if version > FORMAT_VERSION else 'rebuild the cache'}"
            )
        mode = _str(d, "mode", where, choices=MODES)
        features = d.get("features")
        views = d.get("views")
        dense = d.get("dense")
        completed = d.get("completed")
        return cls(
            format_version=version,
            status=_str(d, "status", where, choices=STATUSES),
            mode=mode,
            teacher=TeacherStamp.from_dict(_get(d, "teacher", where), f"{where}.teacher"),
            dataset=DatasetStamp.from_dict(_get(d, "dataset", where), f"{where}.dataset"),
            num_entries=_int(d, "num_entries", where, lo=1, hi=MAX_ENTRIES),
            entries_per_image=_int(d, "entries_per_image", where, lo=1, hi=1 << 16),
            shard_entries=_int(d, "shard_entries", where, lo=1, hi=MAX_SHARD_ENTRIES),
            id_bytes=_int(d, "id_bytes", where, lo=1, hi=MAX_ID_BYTES),
            logits=TargetLayout.from_dict(_get(d, "logits", where), f"{where}.logits", LOGIT_CODECS),
            features=(
                TargetLayout.from_dict(features, f"{where}.features", FEATURE_CODECS) if features is not None else None
            ),
            views=ViewsParams.from_dict(views, f"{where}.views") if views is not None else None,
            dense=DenseParams.from_dict(dense, f"{where}.dense") if dense is not None else None,
            fidelity=_json_scalars(_get(d, "fidelity", where), f"{where}.fidelity"),
            build=_json_scalars(_get(d, "build", where), f"{where}.build"),
            tool_version=_str(d, "tool_version", where),
            created=_str(d, "created", where),
            completed=completed if isinstance(completed, str) else None,
        )
