"""A procedural street-scene dataset in the Cityscapes layout, for the demo and the tests.

``write_sample_dataset(root)`` writes ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` and
``gtFine/{split}/{city}/*_gtFine_labelIds.png`` (Cityscapes label *ids*, mapped to train ids by the
reader like real Cityscapes). Scenes are rendered in a one-point perspective: a road with lane
markings running to a vanishing point, sidewalks and terrain strips, building facades with window
grids, walls, fences and hedges along the street, a distant skyline, a sky gradient with clouds,
trees, poles with traffic signs and lights, cars, persons, street clutter, and sometimes an ego
vehicle hood and a dark rectification border (void classes, mapped to 255).

Colours are drawn per image from deliberately overlapping ranges (road / sidewalk / wall / fence /
pole / overcast sky greys; vegetation vs terrain greens; building vs wall), then class textures, cast
shadows, lighting and colour jitter and blur are applied, so local colour alone does not decide the
class and a larger receptive field pays off.

Everything is vectorised numpy driven by one ``numpy.random.Generator`` per image, seeded from
``(seed, split, index)``: the same seed writes byte-identical files, and adding images does not
change the earlier ones.

``num_extra=N`` also writes an unlabelled split like Cityscapes' ``train_extra``: N images under
``leftImg8bit/train_extra/{city}/`` and no ``gtFine/train_extra`` (the reader treats the split as
images without labels). Its scenes come from their own seeds ``(seed, 2, index)``, so adding extra
images changes no train or val file, and ``num_extra=0`` (the default) writes exactly what it did
before the option existed.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from ..errors import DatasetError
from .cityscapes import ID_TO_TRAIN_ID, IMAGE_SUFFIX, LABEL_SUFFIX

__all__ = [
    "SAMPLE_CLASS_IDS",
    "SAMPLE_TRAIN_IDS",
    "SAMPLE_CITIES",
    "EXTRA_SPLIT",
    "render_scene",
    "write_sample_dataset",
]

# Cityscapes label ids used by the generator
UNLABELED, EGO, STATIC = 0, 1, 4
ROAD, SIDEWALK, BUILDING, WALL, FENCE = 7, 8, 11, 12, 13
POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = 17, 19, 20, 21, 22, 23
PERSON, CAR = 24, 26

#: Cityscapes label id -> name of every class the generator draws (0, 1 and 4 map to ignore).
SAMPLE_CLASS_IDS: dict[int, str] = {
    UNLABELED: "unlabeled",
    EGO: "ego vehicle",
    STATIC: "static",
    ROAD: "road",
    SIDEWALK: "sidewalk",
    BUILDING: "building",
    WALL: "wall",
    FENCE: "fence",
    POLE: "pole",
    LIGHT: "traffic light",
    SIGN: "traffic sign",
    VEGETATION: "vegetation",
    TERRAIN: "terrain",
    SKY: "sky",
    PERSON: "person",
    CAR: "car",
}
#: Train ids (0..18) that can appear in the sample dataset's labels (the other 6 of 19 never do).
SAMPLE_TRAIN_IDS: tuple[int, ...] = tuple(sorted({int(ID_TO_TRAIN_ID[i]) for i in SAMPLE_CLASS_IDS} - {255}))
#: Cities per split; train images alternate between its cities.
SAMPLE_CITIES: dict[str, tuple[str, ...]] = {
    "train": ("synthtown", "procville"),
    "val": ("valburg",),
    "train_extra": ("extraheim", "moreton"),
}
#: The unlabelled split ``num_extra`` writes (images only, like Cityscapes' train_extra).
EXTRA_SPLIT = "train_extra"

MARKER = "skd_sample.json"
_COUNT_ARG = {"train": "num_train", "val": "num_val", EXTRA_SPLIT: "num_extra"}
_GENERATOR = "skd-sample-v1"
_SPLIT_CODE = {"train": 0, "val": 1, EXTRA_SPLIT: 2}
_FRAME = 19

# per-class texture amplitudes (high-frequency additive grey, mid-frequency multiplicative)
_HF = np.zeros(256, np.float32)
_MF = np.zeros(256, np.float32)
for _i, (_hf, _mf) in {
    ROAD: (7, 0.10),
    SIDEWALK: (6, 0.08),
    BUILDING: (6, 0.10),
    WALL: (7, 0.12),
    FENCE: (8, 0.08),
    POLE: (4, 0.05),
    LIGHT: (4, 0.05),
    SIGN: (4, 0.05),
    VEGETATION: (20, 0.30),
    TERRAIN: (12, 0.22),
    SKY: (1.5, 0.03),
    PERSON: (6, 0.08),
    CAR: (4, 0.05),
    UNLABELED: (3, 0.05),
    EGO: (3, 0.05),
    STATIC: (6, 0.10),
}.items():
    _HF[_i], _MF[_i] = _hf, _mf


# ------------------------------------------------------------------------------------------------
# helpers


@functools.lru_cache(maxsize=64)
def _interp(n: int, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell index, smoothstep weight and 1 - weight of n pixel centres over g noise cells."""
    f = (np.arange(n, dtype=np.float32) + 0.5) * np.float32(g / n)
    i = np.minimum(f.astype(np.int64), g)
    t = f - i
    t = t * t * (3 - 2 * t)
    for a in (i, t):
        a.flags.writeable = False
    return i, t, 1 - t


def _smooth_noise(rng: np.random.Generator, h: int, w: int, gh: int, gw: int) -> np.ndarray:
    """(h, w) float32 value noise: a (gh+2, gw+2) normal grid, smoothstep-interpolated."""
    gh, gw = max(1, int(gh)), max(1, int(gw))
    g = rng.standard_normal((gh + 2, gw + 2), dtype=np.float32)
    iy, ty, sy = _interp(h, gh)
    ix, tx, sx = _interp(w, gw)
    rows = g[iy] * sy[:, None]
    rows += g[iy + 1] * ty[:, None]  # (h, gw + 2)
    out = rows[:, ix]
    out *= sx
    right = rows[:, ix + 1]
    right *= tx
    out += right
    return out


def _hash01(a: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random value in [0, 1) per integer cell (vectorised)."""
    a = a.astype(np.uint32)
    a = (a ^ np.uint32(61)) ^ (a >> np.uint32(16))
    a = a * np.uint32(9)
    a = a ^ (a >> np.uint32(4))
    a = a * np.uint32(0x27D4EB2D)
    a = a ^ (a >> np.uint32(15))
    return (a & np.uint32(0xFFFF)).astype(np.float32) / np.float32(65536.0)


def _frac(a: np.ndarray) -> np.ndarray:
    return a - np.floor(a)


def _grey(level: float, tint: np.ndarray | None = None) -> np.ndarray:
    c = np.full(3, level, np.float32)
    return c if tint is None else c * tint


class _Canvas:
    """Label ids and float RGB being painted, plus the scene geometry."""

    def __init__(self, h: int, w: int, rng: np.random.Generator) -> None:
        self.h, self.w, self.rng = h, w, rng
        self.lab = np.full((h, w), SKY, np.uint8)
        self.img = np.zeros((h, w, 3), np.float32)
        self.ys = np.arange(h, dtype=np.float32) + 0.5
        self.xs = np.arange(w, dtype=np.float32) + 0.5

    def box(self, y0: float, y1: float, x0: float, x1: float):
        """Integer slices of a float box clipped to the canvas, with local pixel centres; None if empty."""
        iy0, iy1 = max(0, int(np.floor(y0))), min(self.h, int(np.ceil(y1)))
        ix0, ix1 = max(0, int(np.floor(x0))), min(self.w, int(np.ceil(x1)))
        if iy1 <= iy0 or ix1 <= ix0:
            return None
        return (slice(iy0, iy1), slice(ix0, ix1)), self.ys[iy0:iy1, None], self.xs[None, ix0:ix1]

    def fill(self, sl, mask: np.ndarray, lid: int, color: np.ndarray) -> None:
        lab, img = self.lab[sl], self.img[sl]
        mask = np.broadcast_to(mask, lab.shape)
        lab[mask] = lid
        if color.ndim == 1:
            img[mask] = color
        else:
            img[mask] = np.broadcast_to(color, img.shape)[mask]


# ------------------------------------------------------------------------------------------------
# the scene


def render_scene(
    size: tuple[int, int] = (256, 512), seed: int | np.random.Generator | None = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Render one street scene: ((H, W, 3) uint8 RGB, (H, W) uint8 Cityscapes label ids)."""
    h, w = int(size[0]), int(size[1])
    if h < 8 or w < 8:
        raise DatasetError(f"sample image size must be at least 8x8, got {h}x{w}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return _Scene(h, w, rng).render()


class _Scene:
    def __init__(self, h: int, w: int, rng: np.random.Generator) -> None:
        self.c = _Canvas(h, w, rng)
        self.h, self.w, self.rng = h, w, rng
        u = rng.uniform
        self.yh = h * u(0.36, 0.48)  # horizon
        self.vx = w * u(0.38, 0.62)  # vanishing point
        self.road_l, self.road_r = -u(1.8, 3.4), u(1.8, 3.4)
        self.n_lanes = int(rng.integers(2, 4))
        self.walk = (u(1.0, 2.6), u(1.0, 2.6))
        self.terr = tuple(u(0.6, 3.0) if rng.random() < 0.55 else 0.0 for _ in range(2))
        # lateral position (camera heights, signed) of the sidewalk's outer edge and the facade line
        self.walk_out = (self.road_l - self.walk[0], self.road_r + self.walk[1])
        self.facade = (self.walk_out[0] - self.terr[0], self.walk_out[1] + self.terr[1])
        # per-image colour choices with deliberately overlapping ranges
        tint = lambda s: 1 + rng.normal(0, s, 3).astype(np.float32)  # noqa: E731
        self.col_road = _grey(u(70, 125), tint(0.03))
        self.col_walk = _grey(u(95, 165), tint(0.06))
        self.col_curb = _grey(u(120, 185), tint(0.03))
        self.col_wall = _grey(u(95, 170), tint(0.07))
        self.col_veg = np.array([u(35, 90), u(70, 125), u(20, 65)], np.float32)
        self.col_terr = np.array([u(80, 130), u(95, 140), u(45, 90)], np.float32)
        self.overcast = rng.random() < 0.35

    # ---------------------------------------------------------------------------- background

    def sky(self) -> None:
        c, rng = self.c, self.rng
        r1 = min(self.h, int(np.floor(self.yh)) + 2)  # rows below are covered by the ground
        t = np.clip(c.ys[:r1] / max(self.yh, 1.0), 0, 1)[:, None]
        if self.overcast:
            top = _grey(rng.uniform(150, 200), 1 + rng.normal(0, 0.03, 3).astype(np.float32))
            bot = top * rng.uniform(1.0, 1.15)
        else:
            top = np.array([rng.uniform(40, 90), rng.uniform(90, 140), rng.uniform(170, 230)], np.float32)
            bot = np.array([rng.uniform(160, 210), rng.uniform(180, 220), rng.uniform(205, 240)], np.float32)
        clouds = _smooth_noise(rng, r1, self.w, 3, 8) + 0.5 * _smooth_noise(rng, r1, self.w, 8, 20)
        thr = rng.uniform(0.2, 1.0)
        a = np.clip((clouds - thr) * 0.8, 0, 0.85)  # (r1, W) cloud cover
        grad = top * (1 - t) + bot * t  # (r1, 3) gradient per row
        cloud = _grey(rng.uniform(200, 245))
        # img = grad * (1 - a) + cloud * a
        c.img[:r1] = grad[:, None, :]
        c.img[:r1] += a[..., None] * (cloud - grad)[:, None, :]

    def skyline(self) -> None:
        c, rng, h, w = self.c, self.rng, self.h, self.w
        x = 0.0
        while x < w:
            sw = w * rng.uniform(0.03, 0.12)
            sh = h * rng.uniform(0.01, 0.14)
            b = c.box(self.yh - sh, self.yh + 1, x, x + sw)
            x += sw
            if b is None or rng.random() < 0.15:
                continue
            sl, yy, _ = b
            if rng.random() < 0.7:
                col = _grey(rng.uniform(90, 190), 1 + rng.normal(0, 0.06, 3).astype(np.float32))
                c.fill(sl, np.ones((1, 1), bool), BUILDING, col * 0.9)
            else:
                top = self.yh - sh * (0.6 + 0.4 * _smooth_noise(rng, 1, sl[1].stop - sl[1].start, 1, 3) ** 2)
                c.fill(sl, yy >= np.minimum(top, self.yh), VEGETATION, self.col_veg * 0.85)

    def ground(self) -> None:
        c, rng, h, w = self.c, self.rng, self.h, self.w
        r0 = min(h, max(0, int(np.floor(self.yh)) + 1))
        if r0 >= h:
            return
        d = (c.ys[r0:] - self.yh)[:, None]  # camera height in pixels at that row
        u = (c.xs[None, :] - self.vx) / d  # lateral position in camera heights
        z = h / d  # depth in camera heights (roughly)
        lab, img = c.lab[r0:], c.img[r0:]
        rl, rr = self.road_l, self.road_r
        wl, wr = self.walk_out
        road = (u >= rl) & (u <= rr)
        walk = ~road & (u >= wl) & (u <= wr)
        # asphalt with lane markings (solid edges sometimes, dashed lane separators)
        lane_w = (rr - rl) / self.n_lanes
        lw = rng.uniform(0.06, 0.12)
        dash = _frac(z * rng.uniform(0.12, 0.25) + rng.random()) < rng.uniform(0.3, 0.6)
        lane_pos = (np.arange(1, self.n_lanes) * lane_w + rl).astype(np.float32)
        k = np.clip(np.rint((u - rl) / lane_w), 1, max(1, self.n_lanes - 1))
        mark = (np.abs(u - (rl + k * lane_w)) < lw) & dash if lane_pos.size else np.zeros(u.shape, bool)
        if rng.random() < 0.6:
            mark |= (np.abs(u - (rl + 0.25)) < lw * 0.8) | (np.abs(u - (rr - 0.25)) < lw * 0.8)
        mark &= road
        # sidewalk paving joints and curb
        tile = rng.uniform(0.5, 1.0)
        joint = walk & ((_frac(u / tile) < 0.06) | (_frac(z / tile) < 0.06))
        curb = walk & ((np.abs(u - rl) < 0.18) | (np.abs(u - rr) < 0.18))
        # colour code per pixel -> palette lookup (one gather instead of many masked writes)
        code = road.astype(np.uint8)  # 0 terrain, 1 road
        code[mark] = 2
        code[walk] = 3
        code[joint] = 4
        code[curb] = 5
        pal = np.stack(
            [
                self.col_terr,
                self.col_road,
                _grey(rng.uniform(170, 230)),
                self.col_walk,
                self.col_walk * 0.85,
                self.col_curb,
            ]
        ).astype(np.float32)
        img[:] = pal[code]
        lab[:] = np.array([TERRAIN, ROAD, ROAD, SIDEWALK, SIDEWALK, SIDEWALK], np.uint8)[code]
        # terrain patches (dry / green)
        ter = code == 0
        if ter.any():
            patch = _smooth_noise(rng, h - r0, w, 4, 8)[ter][:, None]
            img[ter] = self.col_terr * (1 + 0.12 * patch) + np.array([12, -8, -6], np.float32) * patch

    # ---------------------------------------------------------------------------- street-side planes

    def _plane(self, u_plane: float):
        """Per column: camera height t (pixels) of the vertical plane at lateral u_plane, depth, valid."""
        t = (self.c.xs - self.vx) / u_plane
        valid = t > 0.3
        t = np.where(valid, t, 1.0)
        return t, self.h / t, valid

    def facades(self, side: int) -> None:
        c, rng, h = self.c, self.rng, self.h
        t, z, valid = self._plane(self.facade[side])
        n = 48
        lengths = rng.uniform(4, 14, n)
        bounds = np.cumsum(lengths) + rng.uniform(-4, 2)
        seg = np.minimum(np.searchsorted(bounds, z), n - 1)
        gap = rng.random(n) < 0.12
        height = np.where(gap, 0.0, rng.uniform(3.5, 14, n))
        kind = rng.random(n)
        base = np.empty((n, 3), np.float32)
        greys = rng.uniform(80, 190, n)
        base[:] = greys[:, None]
        beige = kind < 0.35
        base[beige] *= np.array([1.08, 1.0, 0.86], np.float32)
        brick = (kind >= 0.35) & (kind < 0.5)
        base[brick] = np.stack([rng.uniform(120, 170, n), rng.uniform(60, 90, n), rng.uniform(45, 70, n)], 1)[brick]
        base *= 1 + rng.normal(0, 0.04, (n, 3)).astype(np.float32)
        glass = np.stack([rng.uniform(25, 70, n)] * 3, 1) * np.array([0.9, 1.0, 1.15], np.float32)
        pz, ph = rng.uniform(1.4, 3.0, n), rng.uniform(1.8, 2.5, n)
        wx, wy = rng.uniform(0.35, 0.6, n), rng.uniform(0.35, 0.6, n)
        gf = rng.uniform(1.2, 2.4, n)

        top = self.yh + (1 - height[seg]) * t
        bot = self.yh + t
        valid &= (height[seg] > 0) & (top < h) & (bot > 0)
        if not valid.any():
            return
        cols = np.flatnonzero(valid)
        x0, x1 = int(cols[0]), int(cols[-1]) + 1
        y0 = max(0, int(np.floor(top[x0:x1][valid[x0:x1]].min())))
        y1 = min(h, int(np.ceil(bot[x0:x1][valid[x0:x1]].max())))
        if y1 <= y0:
            return
        sg, tt, zz, vv = seg[x0:x1], t[x0:x1], z[x0:x1], valid[x0:x1]
        top_c, bot_c = np.where(vv, top[x0:x1], h + 1), bot[x0:x1]
        yy = c.ys[y0:y1, None]
        m = (yy >= top_c) & (yy < bot_c)
        hgt = (yy - self.yh) * (-1 / tt)
        hgt += 1  # height above ground, camera heights
        ph_c, gf_c, hmax = ph[sg], gf[sg], height[sg] - 0.4
        q = hgt / ph_c
        fq = q - np.floor(q)
        wcol = (_frac(zz / pz[sg]) < wx[sg]) & (tt * pz[sg] * wx[sg] > 1.5)  # no sub-pixel windows
        win = (fq < wy[sg]) & wcol & (hgt > gf_c) & (hgt < hmax) & m
        shop = (hgt > 0.15) & (hgt < gf_c * 0.8) & (_frac(zz / (pz[sg] * 2)) < 0.7) & m
        sl = (slice(y0, y1), slice(x0, x1))
        c.lab[sl][m] = BUILDING
        img = c.img[sl]
        np.copyto(img, base[sg][None, :, :], where=m[..., None])
        img[shop] *= 0.55
        if win.any():
            wy_, wx_ = np.nonzero(win)
            cell = np.floor(q[wy_, wx_]).astype(np.int64) * 7 + np.floor(zz / pz[sg]).astype(np.int64)[wx_] * 131
            shade = 0.6 + 0.9 * _hash01((cell + sg[wx_] * 977) & 0xFFFFFFF)
            img[wy_, wx_] = glass[sg[wx_]] * shade[:, None]

    def low_structure(self, side: int, kind: int, u_plane: float, z0: float, z1: float, height: float) -> None:
        c, rng = self.c, self.rng
        t, z, valid = self._plane(u_plane)
        valid &= (z >= z0) & (z <= z1)
        if not valid.any():
            return
        cols = np.flatnonzero(valid)
        x0, x1 = cols[0], cols[-1] + 1
        tt, zz = t[x0:x1], z[x0:x1]
        if kind == VEGETATION:  # hedge with a wavy top
            wob = 0.15 * _smooth_noise(rng, 1, x1 - x0, 1, max(2, (x1 - x0) // 6))[0]
        else:
            wob = 0.0
        top = self.yh + (1 - height - wob) * tt
        bot = self.yh + tt
        y0 = max(0, int(np.floor(top.min())))
        y1 = min(self.h, int(np.ceil(bot.max())) + 1)
        if y1 <= y0:
            return
        yy = c.ys[y0:y1, None]
        m = (yy >= top[None, :]) & (yy < bot[None, :]) & valid[None, x0:x1]
        hgt = 1 - (yy - self.yh) / tt[None, :]
        sl = (slice(y0, y1), slice(x0, x1))
        if kind == WALL:
            col = np.broadcast_to(self.col_wall, (*m.shape, 3)).copy()
            col[hgt > height - 0.12] *= 1.12  # cap stones
            c.fill(sl, m, WALL, col)
        elif kind == FENCE:
            wood = rng.random() < 0.4
            base = np.array([125, 100, 78], np.float32) if wood else _grey(rng.uniform(85, 155))
            post = (_frac(zz / rng.uniform(1.5, 3.0)) < 0.12)[None, :]
            rail = np.abs(hgt - height * 0.85) < 0.05
            mesh = _frac(zz[None, :] * 6 + hgt * 6) < 0.35
            col = np.broadcast_to(base * 0.8, (*m.shape, 3)).copy()
            col[mesh] = base * 1.0
            col[post | rail] = base * 1.15
            c.fill(sl, m, FENCE, col)
        else:
            c.fill(sl, m, VEGETATION, self.col_veg * 0.9)

    # ---------------------------------------------------------------------------- objects

    def _at(self, u: float, z: float) -> tuple[float, float, float]:
        """Screen x of lateral u, ground y and camera height (pixels) at depth z."""
        t = self.h / z
        return self.vx + u * t, self.yh + t, t

    def tree(self, u: float, z: float) -> None:
        c, rng = self.c, self.rng
        x, gy, t = self._at(u, z)
        trunk_w = max(1.0, 0.12 * t)
        ch, r = rng.uniform(2.2, 3.6), rng.uniform(0.9, 1.9)
        cy = gy - ch * t
        b = c.box(cy, gy, x - trunk_w / 2, x + trunk_w / 2)
        trunk = np.array([rng.uniform(60, 95), rng.uniform(45, 70), rng.uniform(30, 50)], np.float32)
        if b is not None:
            c.fill(b[0], np.ones((1, 1), bool), VEGETATION, trunk)
        rr, ax = r * t, rng.uniform(0.8, 1.2)
        b = c.box(cy - rr * 1.3, cy + rr * 1.3, x - rr * ax * 1.3, x + rr * ax * 1.3)
        if b is None:
            return
        sl, yy, xx = b
        bh, bw = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        dist = np.sqrt(((xx - x) / (rr * ax)) ** 2 + ((yy - cy) / rr) ** 2)
        dist = dist + 0.3 * _smooth_noise(rng, bh, bw, 3, 3)
        leaf = 0.75 + 0.35 * _smooth_noise(rng, bh, bw, max(2, bh // 3), max(2, bw // 3))
        col = self.col_veg * rng.uniform(0.8, 1.15) * leaf[..., None]
        c.fill(sl, dist < 1.0, VEGETATION, col)

    def pole(self, u: float, z: float) -> None:
        c, rng = self.c, self.rng
        x, gy, t = self._at(u, z)
        hp = rng.uniform(2.4, 5.0)
        pw = max(1.0, 0.07 * t)
        b = c.box(gy - hp * t, gy, x - pw / 2, x + pw / 2)
        if b is None:
            return
        c.fill(b[0], np.ones((1, 1), bool), POLE, _grey(rng.uniform(85, 165)))
        top = gy - hp * t
        kind = rng.random()
        if kind < 0.5:  # traffic sign
            s = max(2.0, rng.uniform(0.35, 0.6) * t)
            cy = top + s * 0.6
            b = c.box(cy - s / 2, cy + s / 2, x - s / 2, x + s / 2)
            if b is None:
                return
            sl, yy, xx = b
            shape = rng.integers(0, 3)
            dy, dx = (yy - cy) / (s / 2), (xx - x) / (s / 2)
            if shape == 0:
                m = dx**2 + dy**2 <= 1
            elif shape == 1:
                m = np.abs(dx) + np.abs(dy) <= 1
            else:
                m = (np.abs(dx) <= 0.9) & (np.abs(dy) <= 0.9)
            scheme = rng.integers(0, 4)
            outer, inner = [
                ((200, 30, 30), (235, 235, 235)),
                ((30, 70, 170), (235, 235, 235)),
                ((220, 190, 30), (30, 30, 30)),
                ((235, 235, 235), (40, 40, 40)),
            ][scheme]
            col = np.empty((*np.broadcast_shapes(dx.shape, dy.shape), 3), np.float32)
            rim = np.maximum(np.abs(dx), np.abs(dy)) if shape == 2 else np.sqrt(dx**2 + dy**2)
            col[:] = inner
            col[rim > 0.65] = outer
            c.fill(sl, m, SIGN, col)
        elif kind < 0.7:  # traffic light
            bw_, bh_ = max(2.0, 0.25 * t), max(3.0, 0.7 * t)
            b = c.box(top, top + bh_, x - bw_ / 2, x + bw_ / 2)
            if b is None:
                return
            sl, yy, xx = b
            col = np.broadcast_to(_grey(rng.uniform(25, 55)), (*np.broadcast_shapes(yy.shape, xx.shape), 3)).copy()
            lamp = int(rng.integers(0, 3))
            ly = top + bh_ * (lamp + 0.5) / 3
            on = (yy - ly) ** 2 + (xx - x) ** 2 <= (bw_ * 0.35) ** 2
            col[np.broadcast_to(on, col.shape[:2])] = [(230, 40, 30), (240, 180, 30), (60, 220, 90)][lamp]
            c.fill(sl, np.ones((1, 1), bool), LIGHT, col)

    def car(self, u: float, z: float) -> None:
        c, rng = self.c, self.rng
        x, gy, t = self._at(u, z)
        cw, ch = rng.uniform(1.1, 1.35) * t, rng.uniform(0.9, 1.25) * t
        palette = [
            (225, 225, 228),
            (30, 30, 34),
            (160, 162, 168),
            (105, 105, 110),
            (170, 30, 30),
            (30, 50, 140),
            (35, 75, 50),
            (190, 170, 130),
        ]
        body = np.array(palette[int(rng.integers(0, len(palette)))], np.float32) * rng.uniform(0.85, 1.1)
        # shadow on the road under the car
        b = c.box(gy - 0.12 * t, gy + 0.05 * t, x - cw * 0.55, x + cw * 0.55)
        if b is not None:
            sl = b[0]
            road = c.lab[sl] == ROAD
            c.img[sl][road] *= 0.55
        b = c.box(gy - ch, gy, x - cw / 2, x + cw / 2)
        if b is None:
            return
        sl, yy, xx = b
        ry, rx = (gy - yy) / ch, (xx - x) / (cw / 2)  # 0 at ground .. 1 at roof; -1 .. 1 across
        lower = (ry >= 0.12) & (ry < 0.55) & (np.abs(rx) <= 1)
        cabin_half = 0.92 - 0.25 * np.clip((ry - 0.55) / 0.45, 0, 1)
        cabin = (ry >= 0.55) & (ry <= 1) & (np.abs(rx) <= cabin_half)
        wheels = (ry < 0.16) & (np.abs(rx) >= 0.62) & (np.abs(rx) <= 0.95)
        shape = np.broadcast_to(lower | cabin | wheels, (sl[0].stop - sl[0].start, sl[1].stop - sl[1].start))
        col = np.broadcast_to(body, (*shape.shape, 3)).copy()
        window = (ry > 0.62) & (ry < 0.93) & (np.abs(rx) <= cabin_half - 0.1)
        col[np.broadcast_to(window, shape.shape)] = _grey(rng.uniform(25, 60)) * np.array([0.9, 1.0, 1.1])
        lights = (ry > 0.4) & (ry < 0.5) & (np.abs(rx) > 0.7) & (np.abs(rx) <= 1)
        col[np.broadcast_to(lights, shape.shape)] = (200, 30, 25)
        plate = (ry > 0.2) & (ry < 0.3) & (np.abs(rx) < 0.22)
        col[np.broadcast_to(plate, shape.shape)] = (215, 215, 200)
        col[np.broadcast_to(wheels, shape.shape)] = (20, 20, 22)
        col[np.broadcast_to(lower & (ry < 0.2), shape.shape)] *= 0.7  # bumper
        c.fill(sl, shape, CAR, col)

    def person(self, u: float, z: float) -> None:
        c, rng = self.c, self.rng
        x, gy, t = self._at(u, z)
        hp = rng.uniform(1.0, 1.25) * t
        wp = rng.uniform(0.26, 0.34) * t
        b = c.box(gy - hp, gy, x - wp, x + wp)
        if b is None:
            return
        sl, yy, xx = b
        ry, rx = (gy - yy) / hp, (xx - x) / (wp / 2)
        stride = rng.uniform(0.0, 0.5)
        head = (rx * (wp / 2) / (0.07 * t)) ** 2 + ((ry - 0.92) * hp / (0.075 * t)) ** 2 <= 1
        torso = (ry >= 0.48) & (ry < 0.84) & (np.abs(rx) <= 1)
        arms = (ry >= 0.5) & (ry < 0.82) & (np.abs(rx) > 1) & (np.abs(rx) <= 1.3)
        legs = (ry < 0.48) & (np.abs(np.abs(rx) - 0.45 - stride * (0.48 - ry)) <= 0.28)
        shape = np.broadcast_to(head | torso | arms | legs, (sl[0].stop - sl[0].start, sl[1].stop - sl[1].start))
        shirt = rng.uniform(20, 230, 3).astype(np.float32)
        pants = _grey(rng.uniform(20, 90)) * np.array([1.0, 1.0, rng.uniform(1.0, 1.8)], np.float32)
        skin = np.array([210, 160, 125], np.float32) * rng.uniform(0.45, 1.05)
        col = np.empty((*shape.shape, 3), np.float32)
        col[:] = shirt
        col[np.broadcast_to(legs, shape.shape)] = pants
        col[np.broadcast_to(head | arms & (ry < 0.6), shape.shape)] = skin
        c.fill(sl, shape, PERSON, col)

    def clutter(self, u: float, z: float) -> None:
        c, rng = self.c, self.rng
        x, gy, t = self._at(u, z)
        bw, bh = rng.uniform(0.25, 0.6) * t, rng.uniform(0.35, 0.8) * t
        b = c.box(gy - bh, gy, x - bw / 2, x + bw / 2)
        if b is not None:
            col = _grey(rng.uniform(50, 150), 1 + rng.normal(0, 0.15, 3).astype(np.float32))
            c.fill(b[0], np.ones((1, 1), bool), STATIC, col)

    # ---------------------------------------------------------------------------- void + finishing

    def ego_and_border(self) -> None:
        c, rng, h, w = self.c, self.rng, self.h, self.w
        if rng.random() < 0.55:
            eh = h * rng.uniform(0.05, 0.12)
            cx = w * rng.uniform(0.4, 0.6)
            top = h - eh * (1 - 0.6 * ((c.xs - cx) / (w / 2)) ** 2)
            y0 = max(0, int(np.floor(top.min())))
            yy = c.ys[y0:, None]
            m = yy >= top[None, :]
            shine = np.clip((yy - top[None, :]) / max(eh, 1.0), 0, 1)[..., None]
            base = _grey(rng.uniform(20, 80), 1 + rng.normal(0, 0.1, 3).astype(np.float32))
            col = base * (1.6 - 0.8 * shine)
            c.fill((slice(y0, h), slice(None)), m, EGO, col)
        if rng.random() < 0.35:
            bw = max(1, int(w * rng.uniform(0.005, 0.02)))
            side = slice(0, bw) if rng.random() < 0.5 else slice(w - bw, w)
            c.fill((slice(None), side), np.ones((1, 1), bool), UNLABELED, _grey(rng.uniform(0, 20)))

    def finish(self) -> np.ndarray:
        c, rng, h, w = self.c, self.rng, self.h, self.w
        lab, img = c.lab, c.img
        # class textures (mid-frequency multiplicative, high-frequency additive), cast shadows (not on
        # the sky), smooth lighting, colour cast, brightness and contrast, folded into two (H, W) maps
        shade = _smooth_noise(rng, h, w, max(2, h // 12), max(2, w // 12))
        shade *= _MF[lab]
        shade += 1
        grain = rng.random((h, w), dtype=np.float32)
        grain -= 0.5
        grain *= 3.4641  # unit variance
        grain *= _HF[lab]
        shadow = _smooth_noise(rng, h, w, 3, 6)
        shadow -= np.float32(rng.uniform(-0.2, 1.0))
        shadow *= 3
        np.clip(shadow, 0, 1, out=shadow)
        shadow *= np.float32(-rng.uniform(0.25, 0.5))
        shadow += 1  # 1 - shadow strength
        shadow[lab == SKY] = 1
        light = _smooth_noise(rng, h, w, 2, 4)
        light *= 0.1
        light += 1
        light *= shadow
        contrast = np.float32(rng.uniform(0.8, 1.2))
        gain = (1 + rng.normal(0, 0.06, 3)).astype(np.float32) * np.float32(rng.uniform(0.75, 1.2))
        light *= contrast
        shade *= light
        grain *= light
        img *= shade[..., None]
        img += grain[..., None]
        img += 110 * (1 - contrast)
        # blur: 0-2 passes of a separable 3-tap kernel (a, 1 - 2a, a) with a random a
        passes = int(rng.integers(0, 3 if min(h, w) >= 128 else 2))  # small images: at most one pass
        buf = np.empty_like(img) if passes and h >= 3 and w >= 3 else None
        for _ in range(passes):
            a = rng.uniform(0.12, 0.25)
            r, k = np.float32(a / (1 - 2 * a)), np.float32(1 - 2 * a)
            if buf is None:
                break
            # interior = (1 - 2a) * (centre + a / (1 - 2a) * (previous + next)); borders stay as they are
            np.add(img[:-2], img[2:], out=buf[1:-1])
            buf[1:-1] *= r
            img[1:-1] += buf[1:-1]
            img[1:-1] *= k
            np.add(img[:, :-2], img[:, 2:], out=buf[:, 1:-1])
            buf[:, 1:-1] *= r
            img[:, 1:-1] += buf[:, 1:-1]
            img[:, 1:-1] *= k
        np.clip(img, 0, 255, out=img)
        img += 0.5
        # colour cast and gamma through one per-channel lookup table on the quantised image
        gamma = rng.uniform(0.85, 1.15)
        # (scalar libm pow, not numpy's SIMD one, so the table is the same on every CPU)
        lut = [min(255, int(255 * (min(v * float(g), 255.0) / 255) ** gamma + 0.5)) for g in gain for v in range(256)]
        out = Image.fromarray(img.astype(np.uint8), "RGB").point(lut)
        return np.array(out, dtype=np.uint8)

    def render(self) -> tuple[np.ndarray, np.ndarray]:
        rng, u = self.rng, self.rng.uniform
        self.sky()
        self.skyline()
        self.ground()
        for side in (0, 1):
            self.facades(side)
        sgn = (-1.0, 1.0)
        # low structures along the sidewalk's outer edge / in front of the facades
        for side in (0, 1):
            for _ in range(int(rng.integers(0, 4))):
                kind = (WALL, FENCE, VEGETATION)[int(rng.choice(3, p=[0.4, 0.4, 0.2]))]
                at_facade = self.terr[side] > 0 and rng.random() < 0.5
                up = self.facade[side] - sgn[side] * 0.1 if at_facade else self.walk_out[side] + sgn[side] * 0.05
                z0 = u(1.5, 40)
                hgt = {WALL: u(0.5, 1.6), FENCE: u(0.6, 1.3), VEGETATION: u(0.4, 1.1)}[kind]
                self.low_structure(side, kind, up, z0, z0 + u(4, 40), hgt)
        objects: list[tuple[float, int, str, float]] = []

        def add(kind: str, uu: float, zz: float) -> None:
            objects.append((zz, len(objects), kind, uu))

        for side in (0, 1):
            road_edge = (self.road_l, self.road_r)[side]
            walk = self.walk[side]
            z = u(1.5, 8)
            while z < 90:  # trees on the sidewalk or the terrain strip
                if rng.random() < 0.6:
                    if self.terr[side] > 0 and rng.random() < 0.5:
                        uu = self.walk_out[side] + sgn[side] * u(0.2, 0.8) * self.terr[side]
                    else:
                        uu = road_edge + sgn[side] * walk * u(0.5, 0.9)
                    add("tree", uu, z)
                z += u(6, 20)
            z = u(2, 12)
            while z < 70:  # poles near the curb
                add("pole", road_edge + sgn[side] * u(0.25, 0.5), z)
                z += u(8, 30)
            for _ in range(int(rng.integers(0, 4))):
                add("person", road_edge + sgn[side] * walk * u(0.15, 0.9), u(2.2, 40))
            for _ in range(int(rng.integers(0, 2))):
                add("clutter", road_edge + sgn[side] * walk * u(0.3, 0.9), u(2.5, 30))
            if rng.random() < 0.5:  # parked cars along the curb
                z = u(2.5, 10)
                while z < 60:
                    add("car", road_edge - sgn[side] * u(0.6, 0.8), z)
                    z += u(4.5, 12)
        lane_w = (self.road_r - self.road_l) / self.n_lanes
        for _ in range(int(rng.integers(1, 6))):
            lane = int(rng.integers(0, self.n_lanes))
            add("car", self.road_l + (lane + 0.5 + u(-0.15, 0.15)) * lane_w, u(2.6, 60))
        for zz, _, kind, uu in sorted(objects, key=lambda o: (-o[0], o[1])):
            getattr(self, kind)(uu, zz)
        self.ego_and_border()
        return self.finish(), self.c.lab


# ------------------------------------------------------------------------------------------------
# writing a dataset


def _png_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


_SAMPLE_FILE = re.compile(r"(leftImg8bit|gtFine)/[a-z_]+/[a-z]+/[a-z]+_\d{6}_\d{6}_(leftImg8bit|gtFine_labelIds)\.png")


def _clean_previous(root: Path, marker: dict) -> None:
    """Remove the files a previous run listed in the marker (and nothing else), then empty folders."""
    files = marker.get("files", [])
    if not isinstance(files, list):
        files = []
    dirs: set[Path] = set()
    for rel in files:
        if not isinstance(rel, str) or not _SAMPLE_FILE.fullmatch(rel) or ".." in rel:
            continue
        p = root.joinpath(*PurePosixPath(rel).parts)
        if p.is_file() and not p.is_symlink():
            p.unlink()
        dirs.update(p.parents[i] for i in range(3))
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        try:
            if d != root and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        except OSError:
            pass


def _check_arguments(size: tuple[int, int], seed: int, counts: dict[str, int]) -> tuple[int, int]:
    """(H, W) of valid arguments; DatasetError naming the first bad one."""
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise DatasetError(f"sample size must be (H, W), got {size!r}") from None
    if h < 8 or w < 8:
        raise DatasetError(f"sample image size must be at least 8x8, got {h}x{w}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DatasetError(f"sample seed must be a non-negative integer, got {seed!r}")
    for key, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise DatasetError(f"sample image counts must be non-negative integers, got {_COUNT_ARG[key]}={n!r}")
    if sum(counts.values()) == 0:
        given = ", ".join(f"{_COUNT_ARG[k]}={n}" for k, n in counts.items())
        raise DatasetError(f"need at least one sample image, got {given}")
    return h, w


def _clear_target(root: Path) -> None:
    """Refuse a non-empty ``root`` that is not an earlier sample dataset; remove that one's files."""
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root} exists and is not a folder; choose a new folder for the sample dataset")
    marker_path = root / MARKER
    if root.is_dir() and any(root.iterdir()):
        marker = None
        if marker_path.is_file():
            try:
                marker = json.loads(marker_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                marker = None
        if not isinstance(marker, dict) or marker.get("generator") != _GENERATOR:
            raise DatasetError(
                f"{root} is not empty and is not a sample dataset written by skd; "
                "choose a new or empty folder (nothing was written)"
            )
        _clean_previous(root, marker)


def _plan(counts: dict[str, int]) -> list[tuple[str, int, str, str]]:
    """(split, index, city, stem) of every image, cities alternating within a split."""
    plan = []
    for split, n in counts.items():
        cities = SAMPLE_CITIES[split]
        for i in range(n):
            city = cities[i % len(cities)]
            plan.append((split, i, city, f"{city}_{i // len(cities):06d}_{_FRAME:06d}"))
    return plan


def write_sample_dataset(
    root: str | Path,
    *,
    num_train: int = 32,
    num_val: int = 8,
    size: tuple[int, int] = (256, 512),
    seed: int = 0,
    num_extra: int = 0,
) -> dict:
    """Write a procedural Cityscapes-layout dataset under ``root`` and return a summary.

    ``root`` must be new, empty, or a sample dataset written earlier (whose files are replaced;
    nothing else is ever deleted). Same arguments -> byte-identical files. ``num_extra`` images go
    to the unlabelled split ``train_extra`` (images only, no gtFine files).
    """
    root = Path(root).expanduser()
    counts = {"train": num_train, "val": num_val, EXTRA_SPLIT: num_extra}
    h, w = _check_arguments(size, seed, counts)
    _clear_target(root)
    counts = {k: int(v) for k, v in counts.items()}
    plan = _plan(counts)
    files = []
    for split, _, city, stem in plan:
        files.append(f"leftImg8bit/{split}/{city}/{stem}{IMAGE_SUFFIX}")
        if split != EXTRA_SPLIT:
            files.append(f"gtFine/{split}/{city}/{stem}{LABEL_SUFFIX}")
    summary = {
        "root": str(root.absolute()),
        "splits": {k: v for k, v in counts.items() if v > 0},
        "size": [h, w],
        "seed": int(seed),
    }
    try:
        root.mkdir(parents=True, exist_ok=True)
        # the marker goes first, so an interrupted run can be redone in place
        marker = {"generator": _GENERATOR, **summary, "files": files}
        marker["root"] = "."
        (root / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        for split, i, city, stem in plan:
            rng = np.random.default_rng([int(seed), _SPLIT_CODE[split], i])
            image, label = _Scene(h, w, rng).render()
            outputs = [("leftImg8bit", IMAGE_SUFFIX, image), ("gtFine", LABEL_SUFFIX, label)]
            for sub, suffix, arr in outputs[:1] if split == EXTRA_SPLIT else outputs:
                d = root / sub / split / city
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{stem}{suffix}").write_bytes(_png_bytes(arr))
    except OSError as e:
        raise DatasetError(f"cannot write the sample dataset to {root}: {' '.join(str(e).split())}") from None
    return summary
