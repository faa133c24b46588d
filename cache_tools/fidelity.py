"""Fidelity of stored targets against the teacher's exact outputs, and the one cell pooling.

numpy only: torch is imported only to pool a torch tensor (:func:`pool_cells`).

The build measures these on a sample of entries and stores them per entry and as a summary; the
numbers answer "what does this codec cost the losses": KL of the softmax at T=1 and T=4 (what the
pixel-wise loss sees), argmax agreement, and the error of the pair-wise loss's cosine matrix.

Node windows follow the official pair-wise loss: ``MaxPool2d(kernel=(floor(h*s), floor(w*s)),
stride=kernel, ceil_mode=True)`` with ``s = 0.5``, so a 65x65 grid gives windows
[0:32], [32:64], [64:65] per axis (9 nodes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ConfigError
from .schema import FIDELITY_COLUMNS

__all__ = [
    "compose_nodes",
    "cosine_matrix",
    "entry_fidelity",
    "kl_per_pixel",
    "log_softmax",
    "node_windows",
    "official_kernel",
    "pool_cells",
    "summarize",
]


def log_softmax(z: np.ndarray, axis: int = 0) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def kl_per_pixel(ref: np.ndarray, approx: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """KL(softmax(ref/T) || softmax(approx/T)) for logits (K, h, w) -> (h, w), in float64."""
    lr = log_softmax(ref.astype(np.float64) / temperature)
    la = log_softmax(approx.astype(np.float64) / temperature)
    return np.maximum((np.exp(lr) * (lr - la)).sum(axis=0), 0.0)


def node_windows(size: int, kernel: int) -> list[tuple[int, int]]:
    """Window bounds ``[start, end)`` along one axis of a ceil-mode pooling with stride = kernel, no padding.

    This is the partition ``MaxPool2d(kernel, stride=kernel, padding=0, ceil_mode=True)`` uses: windows
    of ``kernel`` cells, the last one clipped to the map. 65 cells with kernel 32 give
    ``[(0, 32), (32, 64), (64, 65)]``.
    """
    if size < 1 or kernel < 1:
        raise ValueError(f"size and kernel must be >= 1, got size={size}, kernel={kernel}")
    return [(start, min(start + kernel, size)) for start in range(0, size, kernel)]


def official_kernel(h: int, w: int, pool_scale: float = 0.5) -> tuple[int, int]:
    """The official node kernel: half the map (floor), at least 1."""
    return max(1, int(h * pool_scale)), max(1, int(w * pool_scale))


def pool_cells(feature: Any, block: int | tuple[int, int], mode: str = "max") -> Any:
    """Ceil-mode pooling with kernel = stride = ``block``, no padding: ``(..., C, h, w)`` ->
    ``(..., C, ceil(h/bh), ceil(w/bw))``, the windows of :func:`node_windows`.

    The one cell pooling of skd: the build's stored cells, the test stores' cells and the student's
    pair-wise nodes (``MaxPool2d(kernel, stride=kernel, ceil_mode=True)`` in the official code).
    ``avg`` averages each window over its real extent (a clipped last window is not zero-padded).
    A torch tensor is pooled by torch on its device (gradients flow); a numpy array by numpy, so
    that cache tools and test stores need no torch.

    Raises:
        ConfigError: ``mode`` is neither "max" nor "avg".
    """
    if mode not in ("max", "avg"):
        raise ConfigError(f"pool mode must be 'max' or 'avg', got {mode!r}")
    kh, kw = (block, block) if isinstance(block, int) else block
    if not isinstance(feature, np.ndarray):
        return _pool_torch(feature, (kh, kw), mode)
    *lead, h, w = feature.shape
    rows, cols = node_windows(h, kh), node_windows(w, kw)
    out = np.empty((*lead, len(rows), len(cols)), dtype=np.float32)
    reduce = np.max if mode == "max" else np.mean
    for i, (a, b) in enumerate(rows):
        for j, (p, q) in enumerate(cols):
            out[..., i, j] = reduce(feature[..., a:b, p:q], axis=(-2, -1))
    return out


def _pool_torch(feature: Any, block: tuple[int, int], mode: str) -> Any:
    import torch.nn.functional as F

    if block == (1, 1):
        return feature
    if mode == "max":
        return F.max_pool2d(feature, block, stride=block, padding=0, ceil_mode=True)
    return F.avg_pool2d(feature, block, stride=block, padding=0, ceil_mode=True, count_include_pad=False)


def compose_nodes(
    cells: np.ndarray,
    block: tuple[int, int],
    grid: tuple[int, int],
    kernel: tuple[int, int],
    mode: str = "max",
) -> np.ndarray:
    """Nodes of the pair-wise loss computed from stored pooled cells.

    Max-pooling composes: when every window boundary falls on a cell boundary the result equals
    pooling the full map directly. Average pooling composes with area weights. Windows that cut a
    cell take the whole cell (an approximation, exact for aligned grids).

    Args:
        cells: (C, hp, wp) map pooled with ``block`` on a grid of size ``grid``.
        kernel: node window size on that grid.
    """
    h, w = grid
    rows, cols = node_windows(h, kernel[0]), node_windows(w, kernel[1])
    cell_rows, cell_cols = node_windows(h, block[0]), node_windows(w, block[1])
    out = np.empty((cells.shape[0], len(rows), len(cols)), dtype=np.float32)
    for i, (a, b) in enumerate(rows):
        ri = range(a // block[0], -(-b // block[0]))
        for j, (p, q) in enumerate(cols):
            ci = range(p // block[1], -(-q // block[1]))
            sub = cells[:, ri.start : ri.stop, ci.start : ci.stop]
            if mode == "max":
                out[:, i, j] = sub.max(axis=(1, 2))
            else:
                area = np.outer(
                    [cell_rows[r][1] - cell_rows[r][0] for r in ri],
                    [cell_cols[c][1] - cell_cols[c][0] for c in ci],
                )
                out[:, i, j] = (sub * area).sum(axis=(1, 2)) / area.sum()
    return out


def cosine_matrix(nodes: np.ndarray) -> np.ndarray:
    """(C, nh, nw) nodes -> (N, N) cosine similarities, with the official 1e-8 in the norm."""
    v = nodes.reshape(nodes.shape[0], -1).astype(np.float64)
    v = v / (np.linalg.norm(v, axis=0, keepdims=True) + 1e-8)
    return v.T @ v


def entry_fidelity(
    ref_logits: np.ndarray,
    dec_logits: np.ndarray,
    ref_nodes: np.ndarray | None = None,
    dec_nodes: np.ndarray | None = None,
) -> np.ndarray:
    """One row of :data:`~cache_tools.schema.FIDELITY_COLUMNS` for one entry (valid region only)."""
    kl1 = kl_per_pixel(ref_logits, dec_logits, 1.0)
    kl4 = kl_per_pixel(ref_logits, dec_logits, 4.0)
    agree = float((ref_logits.argmax(0) == dec_logits.argmax(0)).mean())
    if ref_nodes is not None and dec_nodes is not None:
        err = np.abs(cosine_matrix(ref_nodes) - cosine_matrix(dec_nodes))
        pe_mean, pe_max = float(err.mean()), float(err.max())
    else:
        pe_mean = pe_max = float("nan")
    row = [kl1.mean(), kl1.max(), kl4.mean(), kl4.max(), agree, pe_mean, pe_max, kl1.size]
    return np.asarray(row, dtype=np.float32)


def summarize(rows: np.ndarray) -> dict:
    """Aggregate per-entry rows (NaN rows = not sampled) into the store's ``fidelity`` attribute."""
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != len(FIDELITY_COLUMNS):
        raise ValueError("fidelity rows have the wrong shape")
    rows = rows[~np.isnan(rows[:, 0])]
    if not len(rows):
        return {"sampled_entries": 0}
    col = {name: rows[:, i] for i, name in enumerate(FIDELITY_COLUMNS)}
    w = col["valid_pixels"]
    out = {
        "sampled_entries": len(rows),
        "kl_t1_mean": float(np.average(col["kl_t1_mean"], weights=w)),
        "kl_t1_max": float(col["kl_t1_max"].max()),
        "kl_t4_mean": float(np.average(col["kl_t4_mean"], weights=w)),
        "kl_t4_max": float(col["kl_t4_max"].max()),
        "argmax_agreement": float(np.average(col["argmax_agreement"], weights=w)),
    }
    pe = col["pair_cos_err_mean"]
    if not np.isnan(pe).all():
        out["pair_cos_err_mean"] = float(np.nanmean(pe))
        out["pair_cos_err_max"] = float(np.nanmax(col["pair_cos_err_max"]))
    return out
