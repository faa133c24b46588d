"""A picture of what a cache holds (``skdcache preview``): one PNG a person can look at.

Each row is one entry (a whole image in a dense store, one view in a views store):

1. the image (with ``--dataset``), with the view's crop box drawn on it;
2. the teacher's argmax, upsampled to the view's pixels (bilinear on the logits, the official
   ``align_corners=True`` grid convention), in the dataset palette over the view's pixels, and its
   agreement with the label when the dataset has labels;
3. the teacher's uncertainty: softmax entropy / log K (0 = certain, 1 = uniform);
4. the stored distillation feature cells projected to RGB by PCA (fitted jointly over the rows, so
   colours compare across rows), drawn as the cells the pair-wise loss pools.

A legend lists the classes present. Rendered with matplotlib's Agg canvas (no pyplot, no GUI).
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import CacheError, DatasetError
from .schema import CacheSchema, View
from .store import CacheEntry, CacheReader, open_cache

__all__ = ["PreviewReport", "class_palette", "render_preview", "select_entries"]

#: Rows a sheet may hold (a bigger sheet is unreadable anyway).
MAX_ROWS = 16
_PANEL_W = 4.2  # inches per panel
_DISPLAY_W = 640  # pixels per panel at most


@dataclass
class PreviewReport:
    """What :func:`render_preview` drew."""

    out: str
    entries: list[int]
    image_ids: list[str]
    with_images: bool
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def class_palette(schema: CacheSchema, dataset: Any = None) -> np.ndarray:
    """(K, 3) uint8 colours: the dataset's own, Cityscapes' for a cityscapes store, else a VOC-style map."""
    k = schema.dataset.num_classes
    pal = getattr(dataset, "palette", None)
    if pal is not None and len(pal) >= k:
        return np.asarray(pal[:k], dtype=np.uint8)
    from .datasets import CITYSCAPES_CLASS_NAMES, CITYSCAPES_PALETTE

    cityscapes = schema.dataset.name == "cityscapes" or tuple(schema.dataset.class_names) == CITYSCAPES_CLASS_NAMES
    if cityscapes and k == len(CITYSCAPES_PALETTE):
        return np.asarray(CITYSCAPES_PALETTE, dtype=np.uint8)
    from .datasets.folder import default_palette

    return default_palette(k)


def select_entries(
    reader: CacheReader,
    *,
    indices: list[int] | None = None,
    ids: list[str] | None = None,
    sheet: int | None = None,
) -> list[int]:
    """Entries to draw: explicit entry indices, all entries of some image ids, or ``sheet`` entries
    spread evenly over the store (default: entry 0)."""
    n = reader.num_entries
    out: list[int] = []
    for i in indices or []:
        if not -n <= int(i) < n:
            raise CacheError(f"entry index {i} is out of range: the cache holds entries 0..{n - 1}")
        out.append(int(i) % n)
    for image_id in ids or []:
        out.extend(reader.entries_of_image(reader.image_index(image_id)))
    if sheet is not None:
        if sheet < 1:
            raise CacheError("--sheet needs at least 1 entry")
        done = np.flatnonzero(reader.done)
        if not len(done):
            raise CacheError(f"{reader.url} holds no written entry yet")
        picks = np.linspace(0, len(done) - 1, min(sheet, len(done))).round().astype(int)
        out.extend(int(done[p]) for p in picks)
    if not out:
        out = [int(np.flatnonzero(reader.done)[0])] if reader.done.any() else [0]
    seen: list[int] = []
    for e in out:
        if e not in seen:
            seen.append(e)
    if len(seen) > MAX_ROWS:
        raise CacheError(f"a preview shows at most {MAX_ROWS} entries, {len(seen)} were asked for")
    return seen


# ------------------------------------------------------------------------------------------------
# geometry (numpy; mirrors pipeline.views.apply_view closely enough for a picture)


def _display_size(h: int, w: int, max_w: int = _DISPLAY_W, max_h: int = 480) -> tuple[int, int]:
    f = min(1.0, max_w / w, max_h / h)
    return max(2, round(h * f)), max(2, round(w * f))


def _align_coords(n_out: int, n_in: int) -> np.ndarray:
    """Positions of ``n_out`` output pixels on an input grid of ``n_in`` nodes (align_corners=True)."""
    if n_out == 1 or n_in == 1:
        return np.zeros(n_out)
    return np.arange(n_out) * ((n_in - 1) / (n_out - 1))


def _bilinear(m: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(C, h, w) -> (C, out_h, out_w), bilinear with aligned corners."""
    _, h, w = m.shape
    gy, gx = _align_coords(out_h, h), _align_coords(out_w, w)
    y0 = np.clip(np.floor(gy).astype(int), 0, h - 1)
    x0 = np.clip(np.floor(gx).astype(int), 0, w - 1)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy = (gy - y0).astype(np.float32)[None, :, None]
    wx = (gx - x0).astype(np.float32)[None, None, :]
    rows = m[:, y0] * (1 - wy) + m[:, y1] * wy
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx


def _cells_nearest(
    cells: np.ndarray, block: tuple[int, int], grid: tuple[int, int], out_h: int, out_w: int
) -> np.ndarray:
    """(C, hp, wp) pooled cells -> (C, out_h, out_w): each pixel shows the cell of its nearest node."""
    gy = np.rint(_align_coords(out_h, grid[0])).astype(int) // block[0]
    gx = np.rint(_align_coords(out_w, grid[1])).astype(int) // block[1]
    gy = np.clip(gy, 0, cells.shape[1] - 1)
    gx = np.clip(gx, 0, cells.shape[2] - 1)
    return cells[:, gy][:, :, gx]


def _view_pixels(image: np.ndarray, view: View) -> np.ndarray:
    """The view's crop of an (H, W, 3) uint8 image: (h, w, 3) float32, NaN in the padding."""
    from PIL import Image

    hs, ws = view.resized
    y0, x0, ch, cw = view.box
    if image.shape[:2] != (hs, ws):
        image = np.asarray(Image.fromarray(image).resize((ws, hs), Image.Resampling.BILINEAR))
    out = np.full((ch, cw, 3), np.nan, dtype=np.float32)
    rows, cols = max(0, min(ch, hs - y0)), max(0, min(cw, ws - x0))
    if rows and cols:
        out[:rows, :cols] = image[y0 : y0 + rows, x0 : x0 + cols]
    return out[:, ::-1] if view.flip else out


def _view_label(label: np.ndarray, view: View, ignore: int) -> np.ndarray:
    """The view's crop of a label map (nearest, like the official loader), ``ignore`` in the padding."""
    h, w = label.shape
    hs, ws = view.resized
    y0, x0, ch, cw = view.box
    out = np.full((ch, cw), ignore, dtype=label.dtype)
    rows, cols = max(0, min(ch, hs - y0)), max(0, min(cw, ws - x0))
    if rows and cols:
        sy = np.minimum((np.arange(y0, y0 + rows) * (h / hs)).astype(int), h - 1)
        sx = np.minimum((np.arange(x0, x0 + cols) * (w / ws)).astype(int), w - 1)
        out[:rows, :cols] = label[sy][:, sx]
    return out[:, ::-1] if view.flip else out


def _resize(arr: np.ndarray, h: int, w: int, nearest: bool = False) -> np.ndarray:
    from PIL import Image

    if arr.shape[:2] == (h, w):
        return arr
    mode = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(arr).resize((w, h), mode))


def _checker(h: int, w: int, size: int = 8) -> np.ndarray:
    yy, xx = np.meshgrid(np.arange(h) // size, np.arange(w) // size, indexing="ij")
    return np.where(((yy + xx) % 2)[..., None] == 0, 205.0, 230.0).astype(np.float32) * np.ones(3, np.float32)


def _to_display(pixels: np.ndarray, h: int, w: int) -> np.ndarray:
    """Float crop with NaN padding -> (h, w, 3) uint8, the padding as a light checkerboard."""
    pad = np.isnan(pixels[..., 0])
    rgb = np.where(pad[..., None], _checker(*pixels.shape[:2]), np.nan_to_num(pixels))
    return _resize(np.clip(rgb, 0, 255).astype(np.uint8), h, w)


# ------------------------------------------------------------------------------------------------
# per-row data


@dataclass
class _Row:
    entry: CacheEntry
    size: tuple[int, int]  # (H, W) of the image
    disp: tuple[int, int]  # display size of the view
    argmax: np.ndarray  # (Hd, Wd)
    uncertainty: np.ndarray  # (Hd, Wd) in [0, 1]
    confidence: float  # mean max-probability
    cells: np.ndarray | None  # (C, Hd, Wd) nearest-cell feature
    view_rgb: np.ndarray | None = None  # (Hd, Wd, 3) uint8
    pad: np.ndarray | None = None  # (Hd, Wd) bool
    image_rgb: np.ndarray | None = None  # original image, display size
    label_agreement: float | None = None
    note: str = ""


def _softmax_stats(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = z - z.max(axis=0, keepdims=True)
    e = np.exp(z)
    p = e / e.sum(axis=0, keepdims=True)
    ent = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=0) / np.log(max(2, z.shape[0]))
    return p.argmax(axis=0), np.clip(ent, 0, 1), p.max(axis=0)


def _make_row(r: CacheReader, e: int, dataset: Any, warnings: list[str]) -> _Row:
    entry = r.read_entry(e)
    v = entry.view
    size = (int(r.image_sizes[entry.image_index, 0]), int(r.image_sizes[entry.image_index, 1]))
    ch, cw = v.box[2], v.box[3]
    hd, wd = _display_size(ch, cw)
    z = _bilinear(entry.logits, hd, wd)
    argmax, unc, pmax = _softmax_stats(z)
    cells = None
    if entry.feature is not None and r.schema.features is not None:
        cells = _cells_nearest(entry.feature, r.schema.features.block, entry.grid, hd, wd)
    row = _Row(entry, size, (hd, wd), argmax, unc, float(pmax.mean()), cells)
    if dataset is None:
        return row
    image_id = entry.image_id
    image, sha = dataset.read_image(dataset.resolve_id(image_id).id)
    recorded = r.image_sha256()[entry.image_index]
    if recorded and recorded != sha:
        warnings.append(f"{image_id}: the image file differs from the one the cache was built from")
        row.note = "image file changed since the build!"
    if image.shape[:2] != size:
        warnings.append(
            f"{image_id}: the image is {image.shape[0]}x{image.shape[1]}, the cache says {size[0]}x{size[1]}"
        )
        image = _resize(image, *size)
    pixels = _view_pixels(image, v)
    row.pad = _resize(np.isnan(pixels[..., 0]).astype(np.uint8), hd, wd, nearest=True).astype(bool)
    row.view_rgb = _to_display(pixels, hd, wd)
    ih, iw = _display_size(*size)
    row.image_rgb = _resize(image, ih, iw)
    try:
        label = dataset.read_label(image_id)
    except DatasetError:
        label = None
    if label is not None and label.shape == size:
        lab = _resize(_view_label(label, v, dataset.ignore_index), hd, wd, nearest=True)
        valid = lab != dataset.ignore_index
        if valid.any():
            row.label_agreement = float((lab[valid] == argmax[valid]).mean())
    return row


def _pca_rgb(rows: list[_Row]) -> tuple[list[np.ndarray | None], float]:
    """Joint PCA of every row's feature cells to 3 components, scaled to [0, 1] by robust ranges."""
    feats = [row.entry.feature for row in rows if row.entry.feature is not None]
    if not feats:
        return [None] * len(rows), 0.0
    x = np.concatenate([f.reshape(f.shape[0], -1).T for f in feats]).astype(np.float64)  # (cells, C)
    mean = x.mean(axis=0)
    xc = x - mean
    if xc.shape[0] >= 2 and np.abs(xc).max() > 0:
        _, s, vt = np.linalg.svd(xc, full_matrices=False)
        basis = vt[:3]
        var = float((s[:3] ** 2).sum() / max((s**2).sum(), 1e-30))
    else:
        basis, var = np.eye(x.shape[1])[:3], 0.0
    proj = xc @ basis.T
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    span = np.where(hi - lo > 1e-12, hi - lo, 1.0)
    out: list[np.ndarray | None] = []
    for row in rows:
        if row.cells is None:
            out.append(None)
            continue
        c, h, w = row.cells.shape
        p = (row.cells.reshape(c, -1).T - mean) @ basis.T
        rgb = np.clip((p - lo) / span, 0, 1)
        if rgb.shape[1] < 3:
            rgb = np.concatenate([rgb, np.zeros((rgb.shape[0], 3 - rgb.shape[1]))], axis=1)
        out.append(rgb.reshape(h, w, 3))
    return out, var


# ------------------------------------------------------------------------------------------------
# drawing


def _view_text(r: CacheReader, e: int, v: View, grid: tuple[int, int]) -> str:
    if r.schema.mode == "dense":
        return f"entry {e} · whole image{' (mirrored)' if v.flip else ''} · grid {grid[0]}×{grid[1]}"
    y0, x0, h, w = v.box
    k = e - r.entries_of_image(v.image).start
    return (
        f"entry {e} · view {k} · ×{v.scale:g}, crop {h}×{w} at ({y0}, {x0})"
        f"{' · mirrored' if v.flip else ''} · grid {grid[0]}×{grid[1]}"
    )


def _shade_padding(ax: Any, pad: np.ndarray | None) -> None:
    """Grey out the view's padding (outside the scaled image) over a map panel."""
    if pad is None or not pad.any():
        return
    overlay = np.zeros((*pad.shape, 4), dtype=np.float32)
    overlay[pad] = (0.85, 0.85, 0.85, 0.8)
    ax.imshow(overlay, interpolation="nearest")


def _header(r: CacheReader, url: str) -> tuple[str, str]:
    s = r.schema
    t = s.teacher
    feat = "no features"
    if s.features is not None:
        f = s.features
        feat = f"features {f.codec} ({f.pool}-pooled {f.block[0]}×{f.block[1]} cells)"
    line = (
        f"teacher {t.name} ({t.architecture}) · {s.dataset.name} {','.join(s.dataset.splits)}: "
        f"{s.num_images} images, {s.dataset.num_classes} classes · {s.mode} store, {s.entries_per_image} "
        f"entr{'y' if s.entries_per_image == 1 else 'ies'}/image · logits {s.logits.codec} · {feat}"
    )
    fid = s.fidelity
    if fid.get("sampled_entries"):
        line += f" · codec KL(T=1) {fid['kl_t1_mean']:.1e}, argmax {100 * fid['argmax_agreement']:.2f}%"
    return f"skd cache preview — {url}", line


class _Sheet:
    """The figure of one preview: a row of panels per entry, then a legend of the classes shown."""

    def __init__(self, r: CacheReader, rows: list[_Row], palette: np.ndarray, *, with_images: bool) -> None:
        self.r, self.rows, self.palette, self.with_images = r, rows, palette, with_images
        self.names = r.schema.dataset.class_names
        self.pca, self.var = _pca_rgb(rows)
        self.cols = (["image"] if with_images else []) + ["argmax", "uncertainty", "features"]
        counts = np.zeros(len(self.names), dtype=np.int64)
        for row in rows:
            shown_px = row.argmax if row.pad is None else row.argmax[~row.pad]
            counts += np.bincount(shown_px.ravel(), minlength=len(self.names))[: len(self.names)]
        self.share = counts / max(1, int(counts.sum()))
        # classes under 0.05% of the pixels shown are counted, not listed
        self.shown = [int(c) for c in np.argsort(-counts) if self.share[c] >= 0.0005]
        self.rare = int(((self.share > 0) & (self.share < 0.0005)).sum())
        self.legend_cols = min(max(1, len(self.shown)), 3 * len(self.cols))

    def draw(self, url: str, dpi: int) -> Any:
        """The whole figure: header, one row of panels per entry, the legend."""
        from matplotlib.figure import Figure

        aspects = [
            max(
                row.disp[0] / row.disp[1],
                row.image_rgb.shape[0] / row.image_rgb.shape[1] if row.image_rgb is not None else 0,
            )
            for row in self.rows
        ]
        legend_h = 0.45 + 0.2 * -(-len(self.shown) // self.legend_cols)
        panel_w = _PANEL_W * 0.9
        fig_w = _PANEL_W * len(self.cols)
        row_h = [panel_w * a + 0.6 for a in aspects]
        fig = Figure(figsize=(fig_w, sum(row_h) + legend_h + 0.9), dpi=dpi, layout="constrained")
        fig.get_layout_engine().set(w_pad=0.04, h_pad=0.06, wspace=0.06, hspace=0.02)
        title, subtitle = _header(self.r, url)
        width_chars = int(fig_w * 14)
        fig.suptitle(title + "\n" + "\n".join(textwrap.wrap(subtitle, width_chars)), fontsize=8.5, linespacing=1.45)
        grid = fig.add_gridspec(len(self.rows) + 1, len(self.cols), height_ratios=[*row_h, legend_h])
        for i, row in enumerate(self.rows):
            axes = [fig.add_subplot(grid[i, j]) for j in range(len(self.cols))]
            for ax in axes:
                ax.set_xticks([])
                ax.set_yticks([])
                for sp in ax.spines.values():
                    sp.set_color("#bbbbbb")
            if self.with_images:
                self._image_panel(axes.pop(0), row)
            self._argmax_panel(axes[0], row)
            self._uncertainty_panel(fig, axes[1], row)
            self._feature_panel(axes[2], row, self.pca[i])
        self._legend(fig.add_subplot(grid[len(self.rows), :]))
        return fig

    def _image_panel(self, ax: Any, row: _Row) -> None:
        """The image, with the view's crop box drawn on it in a views store."""
        from matplotlib.patches import Rectangle

        assert row.image_rgb is not None
        ax.imshow(row.image_rgb, interpolation="antialiased")
        views = self.r.schema.mode == "views"
        if views:
            ih, iw = row.image_rgb.shape[:2]
            fy, fx = ih / row.size[0], iw / row.size[1]
            hs, ws = row.entry.view.resized
            y0, x0, ch, cw = row.entry.view.box
            sy, sx = row.size[0] / hs, row.size[1] / ws
            top, left = y0 * sy * fy, x0 * sx * fx
            bottom = min((y0 + ch) * sy, row.size[0]) * fy
            right = min((x0 + cw) * sx, row.size[1]) * fx
            box = ((left - 0.5, top - 0.5), right - left, bottom - top)
            ax.add_patch(Rectangle(*box, fill=False, lw=2.4, ec="#ffd400"))
            ax.add_patch(Rectangle(*box, fill=False, lw=0.9, ec="black", ls=(0, (3, 3))))
        ax.set_title(row.entry.image_id, fontsize=8, loc="left")
        caption = f"{row.size[0]}×{row.size[1]} px" + (" · yellow: the view's crop" if views else "")
        ax.set_xlabel(
            caption + (f" — {row.note}" if row.note else ""),
            fontsize=7,
            color="#b00020" if row.note else "#555555",
        )

    def _argmax_panel(self, ax: Any, row: _Row) -> None:
        """The teacher's argmax in the palette, blended over the view's pixels when there are any."""
        e = row.entry
        colours = self.palette[row.argmax].astype(np.float32)
        if row.view_rgb is not None:
            blend = 0.55 * colours + 0.45 * row.view_rgb.astype(np.float32)
            blend[row.pad] = row.view_rgb[row.pad]
            ax.imshow(blend.astype(np.uint8), interpolation="nearest")
        else:
            ax.imshow(colours.astype(np.uint8), interpolation="nearest")
        where = " over the view" if self.r.schema.mode == "views" else " over the image"
        title = "teacher argmax" + (where if row.view_rgb is not None else "")
        if row.label_agreement is not None:
            title += f" · agrees with the label on {100 * row.label_agreement:.1f}%"
        ax.set_title(title, fontsize=8, loc="left")
        padded = " · padding shaded" if row.pad is not None and row.pad.any() else ""
        ax.set_xlabel(_view_text(self.r, e.index, e.view, e.grid) + padded, fontsize=7, color="#555555")
        if not self.with_images:
            ax.set_ylabel(e.image_id, fontsize=7)

    @staticmethod
    def _uncertainty_panel(fig: Any, ax: Any, row: _Row) -> None:
        """Normalised entropy with its colour bar."""
        im = ax.imshow(row.uncertainty, cmap="magma", vmin=0, vmax=1, interpolation="bilinear")
        ax.set_title(f"uncertainty: entropy / log K · mean max p {row.confidence:.2f}", fontsize=8, loc="left")
        _shade_padding(ax, row.pad)
        cax = ax.inset_axes((1.015, 0.0, 0.025, 1.0))
        cb = fig.colorbar(im, cax=cax, ticks=[0, 0.5, 1])
        cb.ax.tick_params(labelsize=6, length=2, pad=1)
        cb.outline.set_visible(False)

    def _feature_panel(self, ax: Any, row: _Row, rgb: np.ndarray | None) -> None:
        """The feature cells in joint-PCA colours, or a grey panel for a store without features."""
        if rgb is None:
            ax.set_facecolor("#f2f2f2")
            ax.set_box_aspect(row.disp[0] / row.disp[1])
            ax.text(0.5, 0.5, "no features stored", ha="center", va="center", fontsize=9, color="#777777")
            return
        ax.imshow(rgb, interpolation="nearest")
        _shade_padding(ax, row.pad)
        f, feature = self.r.schema.features, row.entry.feature
        assert f is not None and feature is not None
        ax.set_title(f"feature cells → RGB (joint PCA, {100 * self.var:.0f}% of variance)", fontsize=8, loc="left")
        ax.set_xlabel(
            f"{f.channels} channels, {f.pool}-pooled {f.block[0]}×{f.block[1]} → "
            f"{feature.shape[1]}×{feature.shape[2]} cells ({f.codec})",
            fontsize=7,
            color="#555555",
        )

    def _legend(self, lax: Any) -> None:
        """The classes present in the argmax panels, largest first, with their share of the pixels."""
        from matplotlib.patches import Patch

        lax.axis("off")
        if not self.shown:
            return
        handles = [
            Patch(
                facecolor=self.palette[c] / 255.0,
                edgecolor="#444444",
                linewidth=0.5,
                label=f"{self.names[c]} {100 * self.share[c]:.1f}%",
            )
            for c in self.shown
        ]
        what = "classes in the teacher's argmax, share of the pixels shown"
        if self.rare:
            what += f" ({self.rare} more below 0.05%)"
        lax.legend(
            handles=handles,
            loc="upper center",
            ncol=self.legend_cols,
            fontsize=7,
            frameon=False,
            title=what,
            title_fontsize=7.5,
            handlelength=1.2,
            columnspacing=1.4,
        )


def render_preview(
    url: str,
    out: str | os.PathLike,
    *,
    indices: list[int] | None = None,
    ids: list[str] | None = None,
    sheet: int | None = None,
    dataset_root: str | os.PathLike | None = None,
    storage_options: dict | None = None,
    cache_dir: str | None = None,
    dpi: int = 110,
) -> PreviewReport:
    """Draw entries of a cache into one PNG.

    Args:
        url: the cache.
        out: the PNG to write.
        indices: entry indices to draw.
        ids: image ids whose entries to draw (every view of the image in a views store).
        sheet: draw this many entries spread over the store (a contact sheet).
        dataset_root: the image dataset, to draw the images under the maps (ids are resolved through
            the dataset's index, never joined to the root as paths).
        storage_options: fsspec options for a remote URL.
        cache_dir: local read-through cache for a remote store.

    Raises:
        CacheError: bad selection, unreadable entries; DatasetError: the dataset or an image
        cannot be read, or an id of the cache is not a safe id of the dataset.
    """
    r = open_cache(url, storage_options=storage_options, cache_dir=cache_dir, allow_incomplete=True)
    entries = select_entries(r, indices=indices, ids=ids, sheet=sheet)
    dataset = None
    if dataset_root is not None:
        from .datasets import open_dataset

        dataset = open_dataset(dataset_root, splits=r.schema.dataset.splits)
    warnings: list[str] = []
    rows = [_make_row(r, e, dataset, warnings) for e in entries]
    sheet_ = _Sheet(r, rows, class_palette(r.schema, dataset), with_images=dataset is not None)
    fig = sheet_.draw(url, dpi)
    out = str(out)
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise CacheError(f"cannot write {out}: the folder {parent} does not exist")
    try:
        fig.savefig(out, dpi=dpi, facecolor="white")
    except OSError as exc:
        raise CacheError(f"cannot write {out}: {exc.strerror or exc}") from None
    return PreviewReport(
        out=out,
        entries=entries,
        image_ids=[row.entry.image_id for row in rows],
        with_images=sheet_.with_images,
        warnings=warnings,
    )
