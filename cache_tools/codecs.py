"""Value codecs for teacher logits and features.

A codec turns one entry's float32 map into a few plain numpy arrays ("parts": uint8/uint16 codes
and float side values) that are stored as ordinary zarr arrays, then compressed losslessly by a
standard zarr v3 codec (zstd or blosc). Nothing here is a custom zarr codec, so ``zarr.open`` reads
every part of every store; the decoding rule of each codec is written in ``docs/cache_format.md``.

Each codec is one class holding its parts, encode, decode, stored parameters and their validation;
:data:`LOGIT_CODEC_CLASSES` and :data:`FEATURE_CODEC_CLASSES` map the names a store records to
them, and ``LogitCodec(name, **params)`` / ``FeatureCodec(name, ...)`` build the class a name
stands for. A codec that keeps arrays once per store (the PCA basis and mean) describes them
itself (:meth:`FeatureCodec.tables`), so the store lays them out like any other array.

Lossy codecs never wrap silently: values outside a codec's range are clipped and counted, and the
count is reported by the build.

Logit codecs (input ``(..., K, h, w)``):

* ``fp32``, ``fp16`` -- the logits themselves.
* ``int8-pixel`` -- per-pixel affine uint8: ``z = lo + q * step`` with per-pixel ``lo``/``step``.
* ``int8-channel`` -- per-entry, per-class affine uint8.
* ``gap-u8`` -- the per-pixel top logit ``top`` (fp16) and, for every class, its gap to the top,
  ``g = top - z >= 0``, companded exponentially: ``q = round(255 * (1 - exp(-g/s)) / (1 - exp(-G/s)))``
  with ``g`` clipped to ``G``. A class's weight in the softmax falls as ``exp(-g/T)``, so the
  step grows where the weight vanishes (the optimal quantiser density for a squared error weighted
  by ``p`` is ``p^(1/3)``; ``s = 6`` balances T = 1 and T = 4). The argmax class alone has ``q = 0``
  (others are at least 1), so the decoded argmax is always the teacher's.
* ``gap-u16`` -- the same with linear 16-bit gaps: near-lossless.

The gap codecs' codes are smooth over the image (neighbouring nodes see the same classes), so they
are stored after a lossless **2-D difference** (``predictor: delta2d``, the default): the part
``dq = Δ_h Δ_w q`` (differences of neighbours along w, then along h, the first row and column against
0, in the code's unsigned integer arithmetic, i.e. modulo 256 or 65536), and
``q = cumsum_h cumsum_w dq`` in the same arithmetic. zstd-1 compresses ``dq`` ≈1.5× better than
``q`` (docs/benchmarks.md). Stores without ``predictor`` (or with ``none``) hold ``q`` itself.

Feature codecs (input ``(..., C, hp, wp)``): ``fp32``, ``fp16``, ``int8`` (per-entry, per-channel
affine) and ``pca`` (projection on a k-dimensional basis stored in the store, fp16 coefficients).

Example:
    >>> import numpy as np
    >>> codec = LogitCodec("gap-u8")
    >>> z = np.array([[[3.0]], [[1.0]], [[-2.0]]], dtype=np.float32)  # K=3, 1x1
    >>> parts, clipped = codec.encode(z)
    >>> sorted(parts), parts["dq"].ravel().tolist(), clipped
    (['dq', 'top'], [0, 72, 144], 0)
    >>> [round(float(v), 2) for v in codec.decode(parts).ravel()]
    [3.0, 1.01, -1.99]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .errors import SchemaError

if TYPE_CHECKING:
    from .schema import TargetLayout

__all__ = [
    "FEATURE_CODEC_CLASSES",
    "LOGIT_CODEC_CLASSES",
    "FeatureCodec",
    "LogitCodec",
    "Part",
    "fit_pca",
    "parse_feature_codec",
]

_F16_MAX = 65504.0
#: Lossless predictors for integer code parts: "none" stores the codes, "delta2d" their 2-D difference.
PREDICTORS = ("none", "delta2d")


@dataclass(frozen=True)
class Part:
    """One stored array of a codec: its shape per entry (or per store, for a table) and dtype."""

    shape: tuple[int, ...]
    dtype: str


def _to_f16(x: np.ndarray) -> tuple[np.ndarray, int]:
    over = int(np.count_nonzero(np.abs(x) > _F16_MAX))
    if over:
        x = np.clip(x, -_F16_MAX, _F16_MAX)
    return x.astype(np.float16), over


def _affine_u8(x: np.ndarray, axes: tuple[int, ...]) -> dict[str, np.ndarray]:
    lo = x.min(axis=axes, keepdims=True)
    hi = x.max(axis=axes, keepdims=True)
    step = (hi - lo) / 255.0
    safe = np.where(step > 0, step, 1.0)
    q = np.rint((x - lo) / safe).clip(0, 255).astype(np.uint8)
    return {
        "q": q,
        "lo": np.squeeze(lo, axes).astype(np.float32),
        "step": np.squeeze(step, axes).astype(np.float32),
    }


def delta2d(q: np.ndarray) -> np.ndarray:
    """Lossless 2-D difference of unsigned integer codes over the last two axes (wraps modulo 2^bits)."""
    d = np.diff(q, axis=-1, prepend=np.zeros_like(q[..., :1]))
    return np.diff(d, axis=-2, prepend=np.zeros_like(d[..., :1, :]))


def undelta2d(d: np.ndarray) -> np.ndarray:
    """Inverse of :func:`delta2d`: cumulative sums over h then w in the codes' own dtype."""
    return np.cumsum(np.cumsum(d, axis=-2, dtype=d.dtype), axis=-1, dtype=d.dtype)


def _codec_class(table: dict[str, type], name: Any, target: str) -> type:
    if name not in table:
        raise SchemaError(f"unknown {target} codec {name!r}; choose one of {', '.join(table)}")
    return table[name]


def _check_name(codec: Any, name: str | None) -> None:
    """``name`` (what ``LogitCodec(name)`` was given) must be the codec's own."""
    if name is not None and name != codec.name:
        raise SchemaError(f"{type(codec).__name__} is the {codec.name} codec, not {name!r}")


# ------------------------------------------------------------------------------------------------
# shared value rules (a logits and a features codec can store values the same way)


class _Float:
    """The values themselves in ``dtype`` (fp16: values beyond its range are clipped and counted)."""

    dtype: ClassVar[str]

    def parts(self, c: int, h: int, w: int) -> dict[str, Part]:
        return {"data": Part((c, h, w), self.dtype)}

    def encode(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        x = np.asarray(x, dtype=np.float32)
        if self.dtype == "float32":
            return {"data": x.copy()}, 0
        data, over = _to_f16(x)
        return {"data": data}, over

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        return parts["data"].astype(np.float32)

    def error_bound(self) -> str:
        return "exact" if self.dtype == "float32" else "|z|*2^-11"


class _ChannelAffineU8:
    """Per-entry, per-channel affine uint8: ``x = lo[c] + q * step[c]``."""

    def parts(self, c: int, h: int, w: int) -> dict[str, Part]:
        return {"q": Part((c, h, w), "uint8"), "lo": Part((c,), "float32"), "step": Part((c,), "float32")}

    def encode(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        return _affine_u8(np.asarray(x, dtype=np.float32), (-2, -1)), 0

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        lo = parts["lo"][..., :, None, None]
        step = parts["step"][..., :, None, None]
        return lo + parts["q"].astype(np.float32) * step

    def error_bound(self) -> str:
        return "step/2 = (max_hw z - min_hw z)/510 per class"


# ------------------------------------------------------------------------------------------------
# logits


class LogitCodec:
    """Encode/decode logits ``(..., K, h, w)`` float32 to parts and back.

    ``LogitCodec(name, **params)`` builds the codec class registered under ``name`` in
    :data:`LOGIT_CODEC_CLASSES`. This base is a codec without parameters: it refuses a clip or a
    predictor, which only the gap codecs take.
    """

    name: ClassVar[str]
    clip: float | None = None
    scale: float | None = None
    predictor: str = "none"

    def __new__(cls, name: str | None = None, **params: Any) -> LogitCodec:
        if cls is LogitCodec:
            cls = _codec_class(LOGIT_CODEC_CLASSES, name, "logits")
        return super().__new__(cls)

    def __init__(self, name: str | None = None, *, clip: float | None = None, predictor: str | None = None):
        _check_name(self, name)
        if clip is not None:
            raise SchemaError(f"the {self.name} logits codec takes no clip (the gap codecs do); leave the clip unset")
        if predictor not in (None, "none"):
            raise SchemaError(
                f"predictor {predictor!r} is not available for {self.name}; gap codecs take none or delta2d"
            )

    @property
    def params(self) -> dict:
        """The parameters a store records for this codec (JSON scalars, in a fixed order)."""
        return {}

    @classmethod
    def from_params(cls, name: str, params: dict) -> LogitCodec:
        """The codec a store describes. Unknown parameters are refused (a reader that ignored one could
        decode garbage)."""
        codec_cls = _codec_class(LOGIT_CODEC_CLASSES, name, "logits")
        unknown = sorted(set(params) - set(codec_cls().params))  # a default codec lists every key it takes
        if unknown:
            raise SchemaError(
                f"logits codec {name} has parameter(s) {', '.join(unknown)} this version of skd does not know; "
                "upgrade skd to read this cache"
            )
        return codec_cls._from_stored(params)

    @classmethod
    def _from_stored(cls, params: dict) -> LogitCodec:
        return cls()

    def parts(self, k: int, h: int, w: int) -> dict[str, Part]:
        raise NotImplementedError

    def encode(self, z: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        """Returns (parts, number of clipped values)."""
        raise NotImplementedError

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def error_bound(self) -> str:
        """Worst-case absolute error per value, in words (documented in docs/cache_format.md)."""
        raise NotImplementedError


class Fp32Logits(_Float, LogitCodec):
    name = "fp32"
    dtype = "float32"


class Fp16Logits(_Float, LogitCodec):
    name = "fp16"
    dtype = "float16"


class Int8PixelLogits(LogitCodec):
    """Per-pixel affine uint8: ``z = lo[y, x] + q * step[y, x]``."""

    name = "int8-pixel"

    def parts(self, k: int, h: int, w: int) -> dict[str, Part]:
        return {"q": Part((k, h, w), "uint8"), "lo": Part((h, w), "float32"), "step": Part((h, w), "float32")}

    def encode(self, z: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        return _affine_u8(np.asarray(z, dtype=np.float32), (-3,)), 0

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        return parts["lo"][..., None, :, :] + parts["q"].astype(np.float32) * parts["step"][..., None, :, :]

    def error_bound(self) -> str:
        return "step/2 = (max_c z - min_c z)/510 per pixel"


class Int8ChannelLogits(_ChannelAffineU8, LogitCodec):
    name = "int8-channel"


class _GapCodec(LogitCodec):
    """The per-pixel top logit and every class's gap to it, quantised to ``code_dtype`` codes.

    Subclasses say how a clipped gap becomes a code and back (:meth:`_quantise`, :meth:`_gap`).
    """

    code_dtype: ClassVar[type]
    levels: ClassVar[int]
    default_clip: ClassVar[float]

    def __init__(
        self,
        name: str | None = None,
        *,
        clip: float | None = None,
        top_dtype: str = "float16",
        predictor: str | None = None,
    ):
        _check_name(self, name)
        self.clip = float(clip) if clip is not None else self.default_clip
        if not self.clip > 0:
            raise SchemaError(f"gap clip must be positive, got {self.clip}")
        if top_dtype not in ("float16", "float32"):
            raise SchemaError("top_dtype must be float16 or float32")
        self.top_dtype = top_dtype
        predictor = "delta2d" if predictor is None else predictor
        if predictor not in PREDICTORS:
            raise SchemaError(
                f"predictor {predictor!r} is not available for {self.name}; gap codecs take none or delta2d"
            )
        self.predictor = predictor

    @classmethod
    def _from_stored(cls, params: dict) -> LogitCodec:
        # a gap store without ``predictor`` predates it and holds plain codes
        kept = {k: params[k] for k in ("clip", "scale") if k in params}
        return cls(top_dtype=params.get("top_dtype", "float16"), predictor=params.get("predictor", "none"), **kept)

    @property
    def params(self) -> dict:
        extra = {"predictor": self.predictor} if self.predictor != "none" else {}
        return {"clip": self.clip, "top_dtype": self.top_dtype, **extra}

    @property
    def code_part(self) -> str:
        """Name of the integer code part: ``dq`` behind the 2-D difference, else ``q``."""
        return "dq" if self.predictor == "delta2d" else "q"

    def _quantise(self, g: np.ndarray) -> np.ndarray:
        """Gap in [0, clip] -> code in [0, levels] (float, rounded)."""
        raise NotImplementedError

    def _gap(self, q: np.ndarray) -> np.ndarray:
        """Code (float32) -> decoded gap."""
        raise NotImplementedError

    def parts(self, k: int, h: int, w: int) -> dict[str, Part]:
        code = np.dtype(self.code_dtype).name
        return {self.code_part: Part((k, h, w), code), "top": Part((h, w), self.top_dtype)}

    def encode(self, z: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        z = np.asarray(z, dtype=np.float32)
        top = z.max(axis=-3, keepdims=True)
        gap = top - z
        clipped = int(np.count_nonzero(gap > self.clip))
        q = self._quantise(np.minimum(gap, self.clip))
        # only the argmax class may decode to gap 0: ties and tiny gaps go to code 1
        q = np.maximum(q, 1)
        arg = z.argmax(axis=-3)
        np.put_along_axis(q, arg[..., None, :, :], 0, axis=-3)
        q = q.clip(0, self.levels).astype(self.code_dtype)
        top = np.squeeze(top, -3)
        if self.top_dtype == "float16":
            top, over = _to_f16(top)
            clipped += over
        codes = delta2d(q) if self.predictor == "delta2d" else q
        return {self.code_part: codes, "top": top.astype(self.top_dtype)}, clipped

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        codes = parts[self.code_part]
        q = (undelta2d(codes) if self.predictor == "delta2d" else codes).astype(np.float32)
        return parts["top"].astype(np.float32)[..., None, :, :] - self._gap(q)


class GapU8Logits(_GapCodec):
    """Gaps companded exponentially with scale ``s`` into uint8 (see the module docstring)."""

    name = "gap-u8"
    code_dtype = np.uint8
    levels = 255
    default_clip = 48.0

    def __init__(
        self,
        name: str | None = None,
        *,
        clip: float | None = None,
        scale: float | None = None,
        top_dtype: str = "float16",
        predictor: str | None = None,
    ):
        super().__init__(name, clip=clip, top_dtype=top_dtype, predictor=predictor)
        self.scale = float(scale) if scale is not None else 6.0
        if not self.scale > 0:
            raise SchemaError(f"gap-u8 scale must be positive, got {self.scale}")

    @property
    def params(self) -> dict:
        extra = {"predictor": self.predictor} if self.predictor != "none" else {}
        return {"clip": self.clip, "scale": self.scale, "top_dtype": self.top_dtype, **extra}

    def _compand(self, g: np.ndarray) -> np.ndarray:
        """gap in [0, G] -> u in [0, 1]."""
        s = self.scale
        return -np.expm1(-g / s) / -np.expm1(-self.clip / s)

    def _expand(self, u: np.ndarray) -> np.ndarray:
        """u in [0, 1] -> gap (inverse of _compand)."""
        s = self.scale
        return -s * np.log1p(u * np.expm1(-self.clip / s))

    def _quantise(self, g: np.ndarray) -> np.ndarray:
        return np.rint(255.0 * self._compand(g))

    def _gap(self, q: np.ndarray) -> np.ndarray:
        return self._expand(q * (1.0 / 255.0)).astype(np.float32)

    def error_bound(self) -> str:
        s, g = self.scale, self.clip
        return f"u = (1-exp(-g/{s}))/(1-exp(-{g}/{s})) to 1/510; gaps over {g} clipped"


class GapU16Logits(_GapCodec):
    """Linear gaps in uint16: near-lossless."""

    name = "gap-u16"
    code_dtype = np.uint16
    levels = 65535
    default_clip = 64.0

    def _quantise(self, g: np.ndarray) -> np.ndarray:
        return np.rint(65535.0 * (g / self.clip))

    def _gap(self, q: np.ndarray) -> np.ndarray:
        return q * (self.clip / 65535.0)

    def error_bound(self) -> str:
        return f"gap error <= {self.clip}/131070; gaps over {self.clip} clipped"


#: Logits codec name (as a store records it) -> class.
LOGIT_CODEC_CLASSES: dict[str, type[LogitCodec]] = {
    c.name: c for c in (Fp32Logits, Fp16Logits, Int8PixelLogits, Int8ChannelLogits, GapU8Logits, GapU16Logits)
}


# ------------------------------------------------------------------------------------------------
# features


def parse_feature_codec(text: str) -> tuple[str, int | None]:
    """'fp16' -> ('fp16', None); 'pca64' / 'pca:64' -> ('pca', 64)."""
    m = re.fullmatch(r"pca:?(\d+)", text)
    if m:
        k = int(m.group(1))
        if k < 1:
            raise SchemaError("pca needs at least 1 component")
        return "pca", k
    if text not in FEATURE_CODEC_CLASSES or text == "pca":
        raise SchemaError(f"unknown features codec {text!r}; choose fp32, fp16, int8 or pcaK (e.g. pca64)")
    return text, None


class FeatureCodec:
    """Encode/decode (pooled) features ``(..., C, hp, wp)`` float32.

    ``FeatureCodec(name, ...)`` builds the codec class registered under ``name`` in
    :data:`FEATURE_CODEC_CLASSES`; :meth:`from_layout` the one a store's layout describes. A codec
    may keep arrays once per store (:meth:`tables`, stored under ``features/``): the store creates
    them from :meth:`tables`, writes :meth:`table_values` and hands them back with :meth:`with_tables`.
    """

    name: ClassVar[str]

    def __new__(cls, name: str | None = None, *args: Any, **kwargs: Any) -> FeatureCodec:
        if cls is FeatureCodec:
            cls = _codec_class(FEATURE_CODEC_CLASSES, name, "features")
        return super().__new__(cls)

    def __init__(self, name: str | None = None):
        _check_name(self, name)

    @classmethod
    def from_layout(cls, layout: TargetLayout) -> FeatureCodec:
        """The codec of a store's ``features`` layout, without its tables (:meth:`with_tables` adds them)."""
        return _codec_class(FEATURE_CODEC_CLASSES, layout.codec, "features")._describing(layout)

    @classmethod
    def _describing(cls, layout: TargetLayout) -> FeatureCodec:
        return cls()

    def tables(self, c: int) -> dict[str, Part]:
        """Arrays this codec keeps once per store for ``c`` input channels: name -> (shape, dtype)."""
        return {}

    def table_values(self) -> dict[str, np.ndarray]:
        """The values of :meth:`tables`, written when a store is created."""
        return {}

    def with_tables(self, values: dict[str, np.ndarray]) -> FeatureCodec:
        """This codec with the tables a store holds (read back from it)."""
        return self

    def parts(self, c: int, hp: int, wp: int) -> dict[str, Part]:
        raise NotImplementedError

    def encode(self, f: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        """Returns (parts, number of clipped values)."""
        raise NotImplementedError

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError


class Fp32Features(_Float, FeatureCodec):
    name = "fp32"
    dtype = "float32"


class Fp16Features(_Float, FeatureCodec):
    name = "fp16"
    dtype = "float16"


class Int8Features(_ChannelAffineU8, FeatureCodec):
    name = "int8"


class PcaFeatures(FeatureCodec):
    """Projection on a k-dimensional basis: fp16 coefficients per entry, the basis ``(k, C)`` and
    mean ``(C,)`` float32 once per store (``features/pca_basis``, ``features/pca_mean``)."""

    name = "pca"

    def __init__(
        self, name: str | None = None, basis: np.ndarray | None = None, mean: np.ndarray | None = None, *, k: int = 0
    ):
        super().__init__(name)
        if basis is None or mean is None:
            if k < 1:  # only a store's layout may describe the codec before its basis is read
                raise SchemaError("the pca features codec needs its basis and mean")
            self.basis = self.mean = None
            self.k = k
            return
        self.basis = np.asarray(basis, np.float32)  # (k, C)
        self.mean = np.asarray(mean, np.float32)  # (C,)
        if self.basis.ndim != 2 or self.mean.shape != (self.basis.shape[1],) or (k and k != len(self.basis)):
            raise SchemaError(
                f"a pca basis {self.basis.shape} and mean {self.mean.shape} do not fit (k, C) and (C,)"
                + (f" with k = {k}" if k else "")
                + ": the store's features/pca_basis or pca_mean is damaged; rebuild it"
            )
        self.k = len(self.basis)

    @classmethod
    def _describing(cls, layout: TargetLayout) -> FeatureCodec:
        return cls(k=layout.depth)

    def tables(self, c: int) -> dict[str, Part]:
        return {"pca_basis": Part((self.k, c), "float32"), "pca_mean": Part((c,), "float32")}

    def table_values(self) -> dict[str, np.ndarray]:
        basis, mean = self._loaded()
        return {"pca_basis": basis, "pca_mean": mean}

    def with_tables(self, values: dict[str, np.ndarray]) -> FeatureCodec:
        return PcaFeatures(basis=values["pca_basis"], mean=values["pca_mean"], k=self.k)

    def _loaded(self) -> tuple[np.ndarray, np.ndarray]:
        if self.basis is None or self.mean is None:
            raise SchemaError("the pca features codec needs its basis and mean")
        return self.basis, self.mean

    def parts(self, c: int, hp: int, wp: int) -> dict[str, Part]:
        return {"data": Part((self.k, hp, wp), "float16")}

    def encode(self, f: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        basis, mean = self._loaded()
        # (..., C, hp, wp) -> (..., k, hp, wp)
        centred = np.asarray(f, dtype=np.float32) - mean[:, None, None]
        data, over = _to_f16(np.einsum("kc,...chw->...khw", basis, centred, optimize=True))
        return {"data": data}, over

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        basis, mean = self._loaded()
        coeff = parts["data"].astype(np.float32)
        rec = np.einsum("kc,...khw->...chw", basis, coeff, optimize=True)
        return rec + mean[:, None, None]


#: Features codec name (as a store records it) -> class.
FEATURE_CODEC_CLASSES: dict[str, type[FeatureCodec]] = {
    c.name: c for c in (Fp32Features, Fp16Features, Int8Features, PcaFeatures)
}


def fit_pca(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Principal axes of ``vectors`` (N, C).

    Returns:
        (basis (k, C), mean (C,), fraction of variance kept).
    """
    x = np.asarray(vectors, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise SchemaError("PCA needs at least two feature vectors")
    if k > x.shape[1]:
        raise SchemaError(f"PCA to {k} components needs at least {k} feature channels, the teacher has {x.shape[1]}")
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order]
    kept = float(evals[:k].sum() / max(evals.sum(), 1e-30))
    return evecs[:, :k].T.astype(np.float32), mean.astype(np.float32), kept
