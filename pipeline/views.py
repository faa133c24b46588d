"""View geometry: the official augmentation, its exact replay, and its replay on dense teacher maps.

The official SKD loader scales an image by ``f = 0.7 + randint(0, 14) / 10`` (OpenCV INTER_LINEAR
for the image, INTER_NEAREST for the label), pads bottom/right to the crop (image 0 after mean
subtraction, label 255), cuts a random crop and mirrors it with p = 0.5. A :class:`View` records
one such draw. :func:`apply_view` computes only the crop, never the whole resized image, and is
used both by the cache build (to feed the teacher) and by stage two (to feed the student), so a
replayed view is bit-identical to what the teacher saw.

For dense caches (one teacher map per whole image) :func:`view_grid_coords` maps the nodes of a
view's stride-8 grid back onto the image's grid, where the stored maps are resampled
(:func:`resample_map`) and pooled feature cells are gathered into pair-wise nodes
(:func:`gather_nodes`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from cache_tools.fidelity import node_windows
from cache_tools.schema import View

from .models.base import grid_size

__all__ = [
    "OFFICIAL_SCALES",
    "View",
    "resized_size",
    "sample_view",
    "sample_views",
    "apply_view",
    "node_positions",
    "student_convention",
    "view_grid_coords",
    "resample_map",
    "gather_nodes",
]

#: {0.7, 0.8, ..., 2.1}: the official ``0.7 + randint(0, 14) / 10``.
OFFICIAL_SCALES: tuple[float, ...] = tuple(round(0.7 + i / 10, 1) for i in range(15))


def resized_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """Size after scaling by ``scale`` (OpenCV's ``fx=fy=scale``: rounded, at least 1)."""
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def sample_view(
    rng: np.random.Generator,
    image: int,
    size: tuple[int, int],
    crop: tuple[int, int],
    scales: Sequence[float] = OFFICIAL_SCALES,
    flip: bool = True,
) -> View:
    """Draw one view of an image of ``size`` = (H, W) with the official distribution."""
    scale = float(scales[int(rng.integers(len(scales)))])
    hs, ws = resized_size(size[0], size[1], scale)
    ch, cw = crop
    y0 = int(rng.integers(0, max(hs, ch) - ch + 1))
    x0 = int(rng.integers(0, max(ws, cw) - cw + 1))
    mirrored = bool(rng.integers(2)) if flip else False
    return View(image, scale, (hs, ws), (y0, x0, ch, cw), mirrored)


def sample_views(
    seed: int,
    sizes: Sequence[tuple[int, int]],
    per_image: int,
    crop: tuple[int, int],
    scales: Sequence[float] = OFFICIAL_SCALES,
    flip: bool = True,
) -> list[View]:
    """``per_image`` views for every image; image ``i`` draws from its own stream ``(seed, i)``.

    Per-image streams make the draw independent of how the build is split across workers.
    """
    views = []
    for i, size in enumerate(sizes):
        rng = np.random.default_rng([seed, i])
        views += [sample_view(rng, i, (int(size[0]), int(size[1])), crop, scales, flip) for _ in range(per_image)]
    return views


def _linear_taps(out_start: int, out_len: int, in_len: int, out_total: int) -> tuple[Tensor, Tensor, Tensor]:
    """Source taps of a bilinear resize (half-pixel centres, no antialias, like INTER_LINEAR)."""
    scale = in_len / out_total
    dst = torch.arange(out_start, out_start + out_len, dtype=torch.float64)
    src = ((dst + 0.5) * scale - 0.5).clamp(min=0.0)
    lo = src.floor().long().clamp(max=in_len - 1)
    hi = (lo + 1).clamp(max=in_len - 1)
    return lo, hi, (src - lo.double()).clamp(0.0, 1.0).float()


def apply_view(image: Tensor, label: Tensor | None, view: View) -> tuple[Tensor, Tensor | None]:
    """Cut ``view`` out of an image.

    Args:
        image: (3, H, W) raw RGB, uint8 or float (0–255).
        label: (H, W) train ids, or None.
        view: the view; its ``resized`` size is the scaled image size.

    Returns:
        (crop, label_crop): (3, h, w) float32 with NaN in the padding (models turn NaN into the
        official zero padding), rounded to integers as OpenCV's uint8 resize does; (h, w) int64
        labels with 255 in the padding.
    """
    _, h_in, w_in = image.shape
    hs, ws = view.resized
    y0, x0, ch, cw = view.box
    img = image.float()
    # the part of the box that lies inside the resized image; the rest is padding
    rows = max(0, min(ch, hs - y0))
    cols = max(0, min(cw, ws - x0))
    out = torch.full((3, ch, cw), float("nan"))
    if rows and cols:
        ylo, yhi, wy = _linear_taps(y0, rows, h_in, hs)
        xlo, xhi, wx = _linear_taps(x0, cols, w_in, ws)
        if hs == h_in and ws == w_in:  # scale 1: plain crop, no arithmetic
            part = img[:, y0 : y0 + rows, x0 : x0 + cols]
        else:
            wy_, wx_ = wy.view(1, -1, 1), wx.view(1, 1, -1)
            r = img[:, ylo] * (1 - wy_) + img[:, yhi] * wy_  # (3, rows, W)
            part = (r[:, :, xlo] * (1 - wx_) + r[:, :, xhi] * wx_).round_().clamp_(0, 255)
        out[:, :rows, :cols] = part
    lab = None
    if label is not None:
        lab = torch.full((ch, cw), 255, dtype=torch.int64)
        if rows and cols:
            sy = (torch.arange(y0, y0 + rows, dtype=torch.float64) * (h_in / hs)).floor().long().clamp(max=h_in - 1)
            sx = (torch.arange(x0, x0 + cols, dtype=torch.float64) * (w_in / ws)).floor().long().clamp(max=w_in - 1)
            lab[:rows, :cols] = label.long()[sy][:, sx]
    if view.flip:
        out = out.flip(-1)
        lab = None if lab is None else lab.flip(-1)
    return out, lab


def node_positions(n: int, length: int, align_corners: bool = True) -> Tensor:
    """Pixel coordinates of the ``n`` nodes of a grid over ``length`` pixels (float64).

    ``align_corners=True`` (skd, CIRKD): node ``j`` at ``j (L-1)/(n-1)``, the first and last nodes on
    the first and last pixels. ``False`` (mmseg): node ``j`` at ``(j + 1/2) L/n - 1/2``, the centre of
    its ``L/n`` pixels. Each is where that family's bilinear resize of logits to pixels puts the nodes.
    """
    j = torch.arange(n, dtype=torch.float64)
    if align_corners:
        return j * ((length - 1) / max(n - 1, 1))
    return (j + 0.5) * (length / n) - 0.5


def _grid_coords(p: Tensor, n: int, length: int, align_corners: bool) -> Tensor:
    """Grid coordinates of pixel coordinates ``p`` (the inverse of :func:`node_positions`)."""
    if align_corners:
        return p * ((n - 1) / max(length - 1, 1))
    return (p + 0.5) * (n / length) - 0.5


def student_convention(
    student: torch.nn.Module | str | None,
) -> tuple[bool, Callable[[tuple[int, int]], tuple[int, int]]]:
    """``(align_corners, grid of a crop)`` of a student model (or a registered name: built on the meta device).

    None is an ``skd`` student (``align_corners=True``, the 8k+1 grid of :func:`grid_size`).
    """
    if student is None:
        return True, lambda crop: (grid_size(crop[0]), grid_size(crop[1]))
    from .families import family_of
    from .inference import output_grid
    from .registry import create_model

    if isinstance(student, str):
        with torch.device("meta"):
            student = create_model(student)
    model = student
    sizes: dict[tuple[int, int], tuple[int, int]] = {}

    def grid_of(crop: tuple[int, int]) -> tuple[int, int]:
        key = (int(crop[0]), int(crop[1]))
        if key not in sizes:
            sizes[key] = tuple(int(v) for v in output_grid(model, *key))  # type: ignore[assignment]
        return sizes[key]

    return family_of(model).align_corners, grid_of


def view_grid_coords(
    view: View,
    image_size: tuple[int, int],
    map_grid: tuple[int, int],
    out_grid: tuple[int, int] | None = None,
    map_flipped: bool = False,
    *,
    out_align_corners: bool = True,
    map_align_corners: bool = True,
) -> tuple[Tensor, Tensor]:
    """Where the nodes of a view's grid fall on a whole-image map's grid.

    The view's nodes sit on the crop's pixels by the student's convention (``out_align_corners``,
    :func:`node_positions`); a crop pixel goes back through the flip, the crop offset and the resize
    (half-pixel centres) to an image pixel, then onto the map's grid by the teacher's convention
    (``map_align_corners``). With both True (skd's): node ``j`` of ``n`` over ``L`` pixels at ``j (L-1)/(n-1)``.
    The identity view of a crop maps a student's grid onto a teacher's grid of the same crop.

    Args:
        view: the student's view.
        image_size: (H, W) of the image.
        map_grid: (h0, w0) grid of the stored whole-image map.
        out_grid: (hc, wc) grid of the view; default ``grid_size`` of the crop.
        map_flipped: the map is the teacher's output on the mirrored image.
        out_align_corners: where the view's (student's) nodes sit on the crop.
        map_align_corners: where the map's (teacher's) nodes sit on the image.

    Returns:
        (gy, gx): float64 coordinates on the map's grid, shapes (hc,) and (wc,).
    """
    H, W = image_size
    h0, w0 = map_grid
    hs, ws = view.resized
    y0, x0, ch, cw = view.box
    hc, wc = out_grid or (grid_size(ch), grid_size(cw))
    yc = node_positions(hc, ch, out_align_corners)
    xc = node_positions(wc, cw, out_align_corners)
    if view.flip:
        xc = (cw - 1) - xc
    yo = (y0 + yc + 0.5) * (H / hs) - 0.5
    xo = (x0 + xc + 0.5) * (W / ws) - 0.5
    if map_flipped:
        xo = (W - 1) - xo
    return _grid_coords(yo, h0, H, map_align_corners), _grid_coords(xo, w0, W, map_align_corners)


def resample_map(m: Tensor, gy: Tensor, gx: Tensor, valid: tuple[int, int] | None = None) -> Tensor:
    """Bilinear samples of a (C, h, w) map at rows ``gy`` x columns ``gx`` (clamped to the valid grid)."""
    h, w = valid or m.shape[-2:]

    def taps(g: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
        g = g.clamp(0, n - 1)
        lo = g.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        return lo, hi, (g - lo.double()).float()

    ylo, yhi, wy = taps(gy, h)
    xlo, xhi, wx = taps(gx, w)
    m = m.float()
    wy_, wx_ = wy.view(1, -1, 1), wx.view(1, 1, -1)
    r = m[:, ylo] * (1 - wy_) + m[:, yhi] * wy_
    return r[:, :, xlo] * (1 - wx_) + r[:, :, xhi] * wx_


def gather_nodes(
    cells: Tensor,
    block: tuple[int, int],
    gy: Tensor,
    gx: Tensor,
    kernel: tuple[int, int],
    mode: str = "max",
    valid: tuple[int, int] | None = None,
) -> Tensor:
    """Pair-wise nodes of a view from a whole-image map stored as pooled cells.

    Each node window of the view's grid (``kernel``, ceil mode, as the official loss) covers a
    span of the image grid; the node is the max (or mean) of the stored cells that span touches.
    Exact when the windows fall on cell boundaries (scale 1, aligned crop); otherwise a close
    over-approximation of the window.

    Args:
        cells: (C, hp, wp) pooled map with ``block`` on the image grid.
        gy, gx: node coordinates of the view on the image grid (:func:`view_grid_coords`).
        kernel: (kh, kw) node window on the view's grid.
        valid: valid (h, w) of the image grid (for padded canvases).

    Returns:
        (C, nh, nw) nodes.
    """
    h, w = valid or (cells.shape[-2] * block[0], cells.shape[-1] * block[1])
    hp, wp = -(-h // block[0]), -(-w // block[1])

    def spans(g: Tensor, kernel_len: int, limit: int, b: int, ncells: int) -> list[tuple[int, int]]:
        out = []
        for a, z in node_windows(len(g), kernel_len):
            seg = g[a:z].clamp(0, limit - 1)
            lo = int(math.floor(float(seg.min()) + 0.5))
            hi = int(math.floor(float(seg.max()) + 0.5))
            out.append((min(lo // b, ncells - 1), min(hi // b, ncells - 1) + 1))
        return out

    rows = spans(gy, kernel[0], h, block[0], hp)
    cols = spans(gx, kernel[1], w, block[1], wp)
    out = cells.new_empty((cells.shape[0], len(rows), len(cols)), dtype=torch.float32)
    for i, (a, b) in enumerate(rows):
        for j, (p, q) in enumerate(cols):
            sub = cells[:, a:b, p:q].float()
            out[:, i, j] = sub.amax(dim=(1, 2)) if mode == "max" else sub.mean(dim=(1, 2))
    return out
