"""Value codecs for teacher logits and features.

A codec turns one entry's float32 map into a few plain numpy arrays ("parts": uint8/uint16 codes
and float side values) that are stored as ordinary zarr arrays, then compressed losslessly by a
standard zarr v3 codec (zstd or blosc). Nothing here is a custom zarr codec, so ``zarr.open`` reads
every part of every store; the decoding rule of each codec is written in ``docs/cache_format.md``.

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
    >>> codec = make_logit_codec("gap-u8")
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

import numpy as np

from .errors import SchemaError
from .schema import FEATURE_CODECS, LOGIT_CODECS

__all__ = [
    "FeatureCodec",
    "LogitCodec",
    "Part",
    "fit_pca",
    "make_feature_codec",
    "make_logit_codec",
    "parse_feature_codec",
]

_F16_MAX = 65504.0
#: Lossless predictors for integer code parts: "none" stores the codes, "delta2d" their 2-D difference.
PREDICTORS = ("none", "delta2d")


@dataclass(frozen=True)
class Part:
    """One stored array of a codec: its shape per entry and dtype."""

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


class LogitCodec:
    """Encode/decode logits ``(..., K, h, w)`` float32 to parts and back."""

    def __init__(
        self,
        name: str,
        clip: float | None = None,
        top_dtype: str = "float16",
        scale: float | None = None,
        predictor: str | None = None,
    ):
        if name not in LOGIT_CODECS:
            raise SchemaError(f"unknown logits codec {name!r}; choose one of {', '.join(LOGIT_CODECS)}")
        self.name = name
        default_clip = {"gap-u8": 48.0, "gap-u16": 64.0}.get(name)
        self.clip = float(clip) if clip is not None else default_clip
        if self.clip is not None and not self.clip > 0:
            raise SchemaError(f"gap clip must be positive, got {self.clip}")
        self.scale = (float(scale) if scale is not None else 6.0) if name == "gap-u8" else None
        if self.scale is not None and not self.scale > 0:
            raise SchemaError(f"gap-u8 scale must be positive, got {self.scale}")
        if top_dtype not in ("float16", "float32"):
            raise SchemaError("top_dtype must be float16 or float32")
        self.top_dtype = top_dtype
        gap = name.startswith("gap")
        if predictor is None:
            predictor = "delta2d" if gap else "none"
        if predictor not in PREDICTORS or (predictor != "none" and not gap):
            raise SchemaError(f"predictor {predictor!r} is not available for {name}; gap codecs take none or delta2d")
        self.predictor = predictor

    @property
    def code_part(self) -> str:
        """Name of the integer code part of a gap codec: ``dq`` behind the 2-D difference, else ``q``."""
        return "dq" if self.predictor == "delta2d" else "q"

    @property
    def params(self) -> dict:
        extra = {"predictor": self.predictor} if self.predictor != "none" else {}
        if self.name == "gap-u8":
            return {"clip": self.clip, "scale": self.scale, "top_dtype": self.top_dtype, **extra}
        if self.name == "gap-u16":
            return {"clip": self.clip, "top_dtype": self.top_dtype, **extra}
        return {}

    @classmethod
    def from_params(cls, name: str, params: dict) -> LogitCodec:
        """The codec a store describes. Unknown parameters are refused (a reader that ignored one could
        decode garbage); a gap store without ``predictor`` predates it and holds plain codes."""
        unknown = sorted(set(params) - set(cls(name).params))  # a default codec lists every key it takes
        if unknown:
            raise SchemaError(
                f"logits codec {name} has parameter(s) {', '.join(unknown)} this version of skd does not know; "
                "upgrade skd to read this cache"
            )
        if name.startswith("gap"):
            return cls(
                name,
                clip=params.get("clip"),
                top_dtype=params.get("top_dtype", "float16"),
                scale=params.get("scale"),
                predictor=params.get("predictor", "none"),
            )
        return cls(name)

    def _compand(self, g: np.ndarray) -> np.ndarray:
        """gap in [0, G] -> u in [0, 1] (gap-u8)."""
        s = self.scale
        return -np.expm1(-g / s) / -np.expm1(-self.clip / s)

    def _expand(self, u: np.ndarray) -> np.ndarray:
        """u in [0, 1] -> gap (inverse of _compand)."""
        s = self.scale
        return -s * np.log1p(u * np.expm1(-self.clip / s))

    def parts(self, k: int, h: int, w: int) -> dict[str, Part]:
        n = self.name
        if n in ("fp32", "fp16"):
            return {"data": Part((k, h, w), "float32" if n == "fp32" else "float16")}
        if n == "int8-pixel":
            return {
                "q": Part((k, h, w), "uint8"),
                "lo": Part((h, w), "float32"),
                "step": Part((h, w), "float32"),
            }
        if n == "int8-channel":
            return {"q": Part((k, h, w), "uint8"), "lo": Part((k,), "float32"), "step": Part((k,), "float32")}
        code = "uint8" if n == "gap-u8" else "uint16"
        return {self.code_part: Part((k, h, w), code), "top": Part((h, w), self.top_dtype)}

    def encode(self, z: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        """Returns (parts, number of clipped values)."""
        z = np.asarray(z, dtype=np.float32)
        n = self.name
        if n == "fp32":
            return {"data": z.copy()}, 0
        if n == "fp16":
            data, over = _to_f16(z)
            return {"data": data}, over
        if n == "int8-pixel":
            return _affine_u8(z, (-3,)), 0
        if n == "int8-channel":
            return _affine_u8(z, (-2, -1)), 0
        # gap codecs
        top = z.max(axis=-3, keepdims=True)
        gap = top - z
        clipped = int(np.count_nonzero(gap > self.clip))
        g = np.minimum(gap, self.clip)
        if n == "gap-u8":
            q = np.rint(255.0 * self._compand(g))
            qmax, dtype = 255, np.uint8
        else:
            q = np.rint(65535.0 * (g / self.clip))
            qmax, dtype = 65535, np.uint16
        # only the argmax class may decode to gap 0: ties and tiny gaps go to code 1
        q = np.maximum(q, 1)
        arg = z.argmax(axis=-3)
        np.put_along_axis(q, arg[..., None, :, :], 0, axis=-3)
        q = q.clip(0, qmax).astype(dtype)
        top = np.squeeze(top, -3)
        if self.top_dtype == "float16":
            top, over = _to_f16(top)
            clipped += over
        codes = delta2d(q) if self.predictor == "delta2d" else q
        return {self.code_part: codes, "top": top.astype(self.top_dtype)}, clipped

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        n = self.name
        if n in ("fp32", "fp16"):
            return parts["data"].astype(np.float32)
        if n == "int8-pixel":
            return parts["lo"][..., None, :, :] + parts["q"].astype(np.float32) * parts["step"][..., None, :, :]
        if n == "int8-channel":
            lo = parts["lo"][..., :, None, None]
            step = parts["step"][..., :, None, None]
            return lo + parts["q"].astype(np.float32) * step
        codes = parts[self.code_part]
        q = (undelta2d(codes) if self.predictor == "delta2d" else codes).astype(np.float32)
        if n == "gap-u8":
            gap = self._expand(q * (1.0 / 255.0)).astype(np.float32)
        else:
            gap = q * (self.clip / 65535.0)
        return parts["top"].astype(np.float32)[..., None, :, :] - gap

    def error_bound(self) -> str:
        """Worst-case absolute error per value, in words (documented in docs/cache_format.md)."""
        return {
            "fp32": "exact",
            "fp16": "|z|*2^-11",
            "int8-pixel": "step/2 = (max_c z - min_c z)/510 per pixel",
            "int8-channel": "step/2 = (max_hw z - min_hw z)/510 per class",
            "gap-u8": f"u = (1-exp(-g/{self.scale}))/(1-exp(-{self.clip}/{self.scale})) to 1/510; gaps over {self.clip} clipped",
            "gap-u16": f"gap error <= {self.clip}/131070; gaps over {self.clip} clipped",
        }[self.name]


def delta2d(q: np.ndarray) -> np.ndarray:
    """Lossless 2-D difference of unsigned integer codes over the last two axes (wraps modulo 2^bits)."""
    d = np.diff(q, axis=-1, prepend=np.zeros_like(q[..., :1]))
    return np.diff(d, axis=-2, prepend=np.zeros_like(d[..., :1, :]))


def undelta2d(d: np.ndarray) -> np.ndarray:
    """Inverse of :func:`delta2d`: cumulative sums over h then w in the codes' own dtype."""
    return np.cumsum(np.cumsum(d, axis=-2, dtype=d.dtype), axis=-1, dtype=d.dtype)


def parse_feature_codec(text: str) -> tuple[str, int | None]:
    """'fp16' -> ('fp16', None); 'pca64' / 'pca:64' -> ('pca', 64)."""
    m = re.fullmatch(r"pca:?(\d+)", text)
    if m:
        k = int(m.group(1))
        if k < 1:
            raise SchemaError("pca needs at least 1 component")
        return "pca", k
    if text not in FEATURE_CODECS or text == "pca":
        raise SchemaError(f"unknown features codec {text!r}; choose fp32, fp16, int8 or pcaK (e.g. pca64)")
    return text, None


class FeatureCodec:
    """Encode/decode (pooled) features ``(..., C, hp, wp)`` float32."""

    def __init__(self, name: str, basis: np.ndarray | None = None, mean: np.ndarray | None = None):
        if name not in FEATURE_CODECS:
            raise SchemaError(f"unknown features codec {name!r}; choose one of {', '.join(FEATURE_CODECS)}")
        if name == "pca" and (basis is None or mean is None):
            raise SchemaError("the pca features codec needs its basis and mean")
        self.name = name
        self.basis = None if basis is None else np.asarray(basis, np.float32)  # (k, C)
        self.mean = None if mean is None else np.asarray(mean, np.float32)  # (C,)

    def parts(self, c: int, hp: int, wp: int) -> dict[str, Part]:
        n = self.name
        if n in ("fp32", "fp16"):
            return {"data": Part((c, hp, wp), "float32" if n == "fp32" else "float16")}
        if n == "int8":
            return {
                "q": Part((c, hp, wp), "uint8"),
                "lo": Part((c,), "float32"),
                "step": Part((c,), "float32"),
            }
        k = self.basis.shape[0]  # type: ignore[union-attr]
        return {"data": Part((k, hp, wp), "float16")}

    def encode(self, f: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        f = np.asarray(f, dtype=np.float32)
        n = self.name
        if n == "fp32":
            return {"data": f.copy()}, 0
        if n == "fp16":
            data, over = _to_f16(f)
            return {"data": data}, over
        if n == "int8":
            return _affine_u8(f, (-2, -1)), 0
        # (..., C, hp, wp) -> (..., k, hp, wp)
        centred = f - self.mean[:, None, None]  # type: ignore[index]
        coeff = np.einsum("kc,...chw->...khw", self.basis, centred, optimize=True)
        data, over = _to_f16(coeff)
        return {"data": data}, over

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        n = self.name
        if n in ("fp32", "fp16"):
            return parts["data"].astype(np.float32)
        if n == "int8":
            lo = parts["lo"][..., :, None, None]
            step = parts["step"][..., :, None, None]
            return lo + parts["q"].astype(np.float32) * step
        coeff = parts["data"].astype(np.float32)
        rec = np.einsum("kc,...khw->...chw", self.basis, coeff, optimize=True)
        return rec + self.mean[:, None, None]  # type: ignore[index]


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


def make_logit_codec(name: str, **params) -> LogitCodec:
    return LogitCodec(name, **params)


def make_feature_codec(name: str, basis: np.ndarray | None = None, mean: np.ndarray | None = None) -> FeatureCodec:
    return FeatureCodec(name, basis=basis, mean=mean)
