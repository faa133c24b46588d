"""How close are dense-replayed targets to the online teacher, per crop scale? (issue 14, item 2)

For every scale ``f`` of the official augmentation (``0.7 + randint(0, 14) / 10``) and a few random
crops per image, compare on the same crop:

* **online**: the teacher run on the crop itself (image resized by ``f``, cropped, mirrored), its
  logits on the crop's grid and its pair-wise nodes pooled from its feature, as ``skdstudent train
  --teacher`` computes them;
* **dense@1.0**: what a dense cache replays for that crop: the teacher run once on the whole image
  at scale 1, logits and pooled feature cells passed through the store's codecs, then logits
  resampled at the crop's grid nodes and pair-wise nodes gathered from the cells
  (:func:`pipeline.views.view_grid_coords`, :func:`~pipeline.views.resample_map`,
  :func:`~pipeline.views.gather_nodes`, called as ``student.data.SegTrainData`` calls them);
* **dense+flip**: the same with ``skdcache build --dense-flip`` (a mirrored view replays the
  mirrored image's map, 2x storage and teacher cost);
* **nearest-of-S / interp-of-S**: a multi-scale dense option, measured without building a store:
  whole-image maps at the scales ``S``, replayed from the nearest one, or blended linearly (in
  scale) between the two that bracket ``f``.

Metrics (online is the reference): argmax agreement over the nodes inside the image (%), KL(T=1)
mean over those nodes (KL(online || replay), the pixel-wise loss's direction), and the pair-wise
error max |Δcos| of the official similarity matrices (:func:`student.functional.similarity`).
Each option also gets its storage per image (codec bytes of its maps before the compressor,
relative to single-scale dense) and its teacher cost (pixels through the teacher, relative).

``--cross-check`` builds a real dense cache with :func:`pipeline.build.build_cache`, reads samples
through :class:`student.data.SegTrainData` and checks that this script's dense@1.0 and dense+flip
replays equal what training reads (they do, bit for bit).

Runs (``PRESETS``; CPU times for one thread, defaults 4 images x 15 scales x 2 crops)::

    python benchmarks/dense_agreement.py --preset demo --images 8 --cross-check  # ~30 s
    python benchmarks/dense_agreement.py --preset proxy    # trained proxy at 1024x2048: ~4 min (+ training it once)
    python benchmarks/dense_agreement.py --preset psp101 --weights teacher.pth   # a trained psp101 (GPU advised)

No trained psp101 can be had on this machine. Two untrained stand-ins exist, and neither stands in:
``--random-weights`` (noise-calibrated BN; logits with std ~140, so its KL says nothing) and
``--weights fitted-head``: the random backbone's BatchNorm statistics set from real training crops
and its 1x1 classifier fitted to the crops' labels by multinomial logistic regression on the
teacher's own features (``--fit-images`` images not among those measured). Validated against the
trained demo teacher on its own architecture and geometry, the fitted stand-in agrees with its own
online outputs on 59 % of nodes where the trained teacher agrees on 92 %: an untrained backbone
leans on the pyramid's global context far more than a trained one, so such a stand-in overstates
the dense replay's error and is kept only to show that (docs/benchmarks.md §11).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from common import OUT, save

from cache_tools.codecs import FeatureCodec, LogitCodec
from cache_tools.datasets import open_dataset, write_sample_dataset
from cache_tools.errors import SkdError
from cache_tools.fidelity import kl_per_pixel, pool_cells
from cache_tools.schema import View
from pipeline.inference import output_grid, run_teacher
from pipeline.teachers import calibrate_batchnorm, create_teacher
from pipeline.views import (
    OFFICIAL_SCALES,
    apply_view,
    gather_nodes,
    resample_map,
    resized_size,
    sample_view,
    student_convention,
    view_grid_coords,
)
from student import functional as SF
from student.train import valid_on_grid

#: Default multi-scale set. Geometric steps of at most 1.5x cover the official 0.7-2.1 range (every
#: crop scale is within ~15 % of a stored one), and 1.0 is in it, so single-scale dense is a subset.
DEFAULT_S = (0.75, 1.0, 1.5, 2.0)

#: ``--weights`` token: a random psp101-style backbone with data-set BN statistics and a fitted head.
FITTED = "fitted-head"

ROOT = Path(__file__).resolve().parent.parent
DEMO_WEIGHTS = ROOT / "pipeline" / "demo_assets" / "psp34_mini_sample.safetensors"

#: teacher, weights (None: random), image size, crop. The student crop of the official SKD recipe is
#: 512x512 (skd_spec.md, "Data"); 769x769 is the teacher's own training crop.
PRESETS: dict[str, dict] = {
    "demo": {"teacher": "psp34_mini", "weights": str(DEMO_WEIGHTS), "size": (128, 256), "crop": (128, 128)},
    "proxy": {"teacher": "psp34_mini", "weights": "proxy", "size": (1024, 2048), "crop": (512, 512)},
    "psp101": {"teacher": "psp101", "weights": None, "size": (1024, 2048), "crop": (512, 512)},
}


@dataclass(frozen=True)
class Store:
    """How a dense store keeps its maps (the build's defaults)."""

    logits_codec: str = "gap-u8"
    features_codec: str = "fp16"
    block: tuple[int, int] = (8, 8)
    pool: str = "max"


@dataclass
class ScaleMap:
    """A whole-image teacher map at one scale, as a dense store would hand it back (decoded)."""

    scale: float
    flipped: bool  # the teacher ran on the mirrored image (--dense-flip's second entry)
    resized: tuple[int, int]
    grid: tuple[int, int]
    logits: torch.Tensor  # (K, h, w)
    cells: torch.Tensor  # (C, hp, wp)
    nbytes: int  # codec bytes of logits + cells


@dataclass
class Targets:
    logits: torch.Tensor  # (K, gh, gw)
    nodes: torch.Tensor  # (C, nh, nw)


@dataclass
class Tally:
    """Sums over crops for one (scale, option)."""

    agree: float = 0.0
    kl: float = 0.0
    nodes: int = 0
    pair: list[float] = field(default_factory=list)

    def add(self, ref: Targets, got: Targets, inside: torch.Tensor) -> None:
        ref_z, got_z = ref.logits.numpy(), got.logits.numpy()
        mask = inside.numpy()
        self.agree += float((ref_z.argmax(0) == got_z.argmax(0))[mask].sum())
        self.kl += float(kl_per_pixel(ref_z, got_z, 1.0)[mask].sum())
        self.nodes += int(mask.sum())
        err = SF.similarity(ref.nodes[None]) - SF.similarity(got.nodes[None])
        self.pair.append(float(err.abs().max()))

    def row(self) -> dict:
        n = max(self.nodes, 1)
        return {
            "agreement_pct": 100.0 * self.agree / n,
            "kl_t1_mean": self.kl / n,
            "pair_cos_err_max_mean": float(np.mean(self.pair)) if self.pair else float("nan"),
            "pair_cos_err_max": float(np.max(self.pair)) if self.pair else float("nan"),
            "nodes": self.nodes,
            "crops": len(self.pair),
        }


def whole_maps(
    model, image: torch.Tensor, scale: float, store: Store, device: torch.device, flips: Sequence[bool] = (False,)
) -> list[ScaleMap]:
    """The teacher on the whole image resized by ``scale``, once per entry of ``flips`` (mirrored when
    True) in one batch as the build batches an image's entries, each through the store's codecs."""
    h, w = image.shape[-2:]
    hs, ws = resized_size(h, w, scale)
    x = torch.stack([apply_view(image, None, View(0, scale, (hs, ws), (0, 0, hs, ws), f))[0] for f in flips])
    logits, feature = run_teacher(model, x, device)
    cells = pool_cells(feature, store.block, store.pool)
    grid = tuple(int(v) for v in logits.shape[-2:])
    z_codec, f_codec = LogitCodec(store.logits_codec), FeatureCodec(store.features_codec)
    maps = []
    for k, flip in enumerate(flips):
        z_parts, _ = z_codec.encode(logits[k].cpu().numpy())
        f_parts, _ = f_codec.encode(cells[k].cpu().numpy())
        z, f = torch.from_numpy(z_codec.decode(z_parts)), torch.from_numpy(f_codec.decode(f_parts))
        nbytes = sum(p.nbytes for p in z_parts.values()) + sum(p.nbytes for p in f_parts.values())
        maps.append(ScaleMap(scale, flip, (hs, ws), grid, z, f, nbytes))
    return maps


def replay(m: ScaleMap, view: View, grid: tuple[int, int], kernel: tuple[int, int], store: Store) -> Targets:
    """A view's targets from a whole-image map, as SegTrainData._dense_targets computes them.

    The map's image is the original resized by ``m.scale``: a crop pixel goes back through the view's
    resize onto the map's resized image (the half-pixel maps compose), so ``image_size`` is ``m.resized``.
    """
    gy, gx = view_grid_coords(view, m.resized, m.grid, grid, m.flipped, out_align_corners=True, map_align_corners=True)
    logits = resample_map(m.logits, gy, gx, valid=m.grid)
    nodes = gather_nodes(m.cells, store.block, gy, gx, kernel, store.pool, valid=m.grid)
    return Targets(logits, nodes)


def online(model, crop: torch.Tensor, grid: tuple[int, int], device: torch.device, pool: str) -> Targets:
    """The teacher on the crop itself, nodes pooled as the online pair-wise loss pools them."""
    logits, feature = run_teacher(model, crop[None], device)
    got = tuple(int(v) for v in logits.shape[-2:])
    if got != grid:
        raise ValueError(f"the teacher's grid {got} on this crop is not the student grid {grid}: use an skd teacher")
    nodes = SF.pool_nodes(feature, SF.pair_kernel(*grid), pool)
    return Targets(logits[0].cpu(), nodes[0].cpu())


def nearest(scales: Sequence[float], f: float) -> float:
    """The stored scale closest to ``f`` (a tie goes to the larger one: more resolution)."""
    return min(scales, key=lambda s: (abs(s - f), -s))


def bracket(scales: Sequence[float], f: float) -> tuple[float, float, float]:
    """(s_lo, s_hi, weight of s_hi) for a linear blend in scale; outside the range: the end scale."""
    s = sorted(scales)
    if f <= s[0] or f >= s[-1]:
        end = s[0] if f <= s[0] else s[-1]
        return end, end, 0.0
    hi = next(x for x in s if x >= f)
    lo = max(x for x in s if x <= f)
    return (lo, hi, 0.0) if lo == hi else (lo, hi, (f - lo) / (hi - lo))


def off_lattice(size: tuple[int, int], scales: Sequence[float]) -> list[float]:
    """Scales whose resized image has a side that is neither 8k nor 8k+1 pixels.

    The replay places a map's nodes by the ``align_corners=True`` convention (node j of n over L
    pixels at ``j (L-1)/(n-1)``), while a stride-8 network's node j looks at pixel ~8j: the two agree
    within a pixel only when L is 8k or 8k+1. On the demo geometry, maps at such scales (0.85, 1.2,
    1.4, 1.7, 2.1 of 128x256) replayed worse than maps 0.1 further away on the lattice.
    """
    return [s for s in scales if any(v % 8 not in (0, 1) for v in resized_size(size[0], size[1], s))]


def blend(a: Targets, b: Targets, w: float) -> Targets:
    return a if w == 0.0 else Targets((1 - w) * a.logits + w * b.logits, (1 - w) * a.nodes + w * b.nodes)


#: dense@1.0: a default dense store; dense+flip: with --dense-flip (mirrored views replay the
#: mirrored image's map); nearest / interp: the multi-scale set S (unmirrored maps).
OPTIONS = ("dense@1.0", "dense+flip", "nearest", "interp")


def measure(
    model,
    images: Sequence[torch.Tensor],
    crop: tuple[int, int],
    *,
    crop_scales: Sequence[float] = OFFICIAL_SCALES,
    multi: Sequence[float] = DEFAULT_S,
    crops_per_scale: int = 1,
    flip: bool = True,
    seed: int = 0,
    store: Store | None = None,
    device: torch.device | None = None,
) -> dict:
    """Agreement of each option with the online teacher, per crop scale, plus storage and teacher cost.

    Args:
        model: the frozen teacher (eval mode).
        images: (3, H, W) uint8 images.
        crop: the student crop (h, w).
        crop_scales: the crop scales to measure (the official ones by default).
        multi: the multi-scale set S (1.0 is added for dense@1.0 if absent).
        crops_per_scale: random crops per image and scale (sample_view, with flips when ``flip``).

    Returns:
        {"per_scale": {scale: {option: metrics}}, "all": {option: metrics}, "cost": {option: {...}}}.
    """
    store = store or Store()
    device = device or torch.device("cpu")
    grid = student_convention(None)[1](crop)
    kernel = SF.pair_kernel(*grid)
    tallies = {f: {o: Tally() for o in OPTIONS} for f in crop_scales}
    overall = {o: Tally() for o in OPTIONS}
    stored = sorted(set(multi) | {1.0})
    bytes_at: dict[float, list[int]] = {s: [] for s in stored}
    pixels_at: dict[float, int] = dict.fromkeys(stored, 0)
    for i, image in enumerate(images):
        maps = {s: whole_maps(model, image, s, store, device)[0] for s in stored}
        mirrored = whole_maps(model, image, 1.0, store, device, (True,))[0]
        for s, m in maps.items():
            bytes_at[s].append(m.nbytes)
            pixels_at[s] += m.resized[0] * m.resized[1]
        size = tuple(image.shape[-2:])
        rng = np.random.default_rng([seed, i])
        for f in crop_scales:
            for _ in range(crops_per_scale):
                view = sample_view(rng, i, size, crop, (f,), flip)
                x, _ = apply_view(image, None, view)
                ref = online(model, x, grid, device, store.pool)
                inside = valid_on_grid(torch.isnan(x[0])[None].to(torch.uint8), grid, 1)[0]
                lo, hi, w = bracket(multi, f)
                got = {
                    "dense@1.0": replay(maps[1.0], view, grid, kernel, store),
                    "dense+flip": replay(mirrored if view.flip else maps[1.0], view, grid, kernel, store),
                    "nearest": replay(maps[nearest(multi, f)], view, grid, kernel, store),
                    "interp": blend(
                        replay(maps[lo], view, grid, kernel, store), replay(maps[hi], view, grid, kernel, store), w
                    ),
                }
                for o in OPTIONS:
                    tallies[f][o].add(ref, got[o], inside)
                    overall[o].add(ref, got[o], inside)
    return {
        "per_scale": {f"{f:.1f}": {o: t.row() for o, t in row.items()} for f, row in tallies.items()},
        "all": {o: t.row() for o, t in overall.items()},
        "cost": _costs(multi, bytes_at, pixels_at),
        "S_off_lattice": off_lattice(tuple(images[0].shape[-2:]), multi),
    }


def _costs(multi: Sequence[float], bytes_at: dict, pixels_at: dict) -> dict:
    """Storage per image and teacher pixels of each option, absolute and relative to dense@1.0."""
    one_bytes, one_pixels = float(np.mean(bytes_at[1.0])), pixels_at[1.0]
    multi_bytes = sum(float(np.mean(bytes_at[s])) for s in multi)
    multi_pixels = sum(pixels_at[s] for s in multi)
    single = {"bytes_per_image": one_bytes, "storage_x": 1.0, "teacher_pixels_x": 1.0}
    several = {
        "bytes_per_image": multi_bytes,
        "storage_x": multi_bytes / one_bytes,
        "teacher_pixels_x": multi_pixels / one_pixels,
    }
    flipped = {"bytes_per_image": 2 * one_bytes, "storage_x": 2.0, "teacher_pixels_x": 2.0}
    return {"dense@1.0": single, "dense+flip": flipped, "nearest": several, "interp": dict(several)}


def cross_check(
    data: str,
    teacher: str,
    weights: str | None,
    crop: tuple[int, int],
    out: Path,
    draws: int = 4,
    seed: int = 0,
    store: Store | None = None,
    dense_flip: bool = False,
) -> dict:
    """Build a real dense store, read samples through SegTrainData, compare with :func:`replay`.

    With ``dense_flip`` the store holds the mirrored image's maps too (the ``dense+flip`` option).

    Returns the largest absolute differences of logits and nodes over ``draws`` samples.
    """
    from pipeline.build import BuildConfig, build_cache
    from student.data import PairSpec, SegTrainData

    store = store or Store()
    url = out / "dense.zarr"
    build_cache(
        BuildConfig(
            data=data,
            out=str(url),
            teacher=teacher,
            weights=weights,
            random_weights=weights is None,
            device="cpu",
            loader_workers=0,
            writer_threads=1,
            fidelity_samples=0,
            teacher_check=False,
            overwrite=True,
            logits_codec=store.logits_codec,
            features_codec=store.features_codec,
            features_block=store.block,
            features_pool=store.pool,
            dense_flip=dense_flip,
        )
    )
    ds = SegTrainData(data, ("train",), crop, cache=str(url), pair=PairSpec(), seed=seed)
    model = _teacher(teacher, weights).model
    grid = ds.teacher_grid
    kernel = SF.pair_kernel(*grid)
    dz = dn = 0.0
    flips = 0
    cpu = torch.device("cpu")
    for d in range(draws):
        sample = ds[d]
        n = d % len(ds)
        image = torch.from_numpy(np.ascontiguousarray(ds.dataset.load(n)[0])).permute(2, 0, 1)
        view = sample_view(np.random.default_rng([seed, d]), n, tuple(image.shape[-2:]), crop, ds.scales, ds.flip)
        flips += int(view.flip)
        m = whole_maps(model, image, 1.0, store, cpu, (False, True) if dense_flip else (False,))[
            view.flip and dense_flip
        ]
        mine = replay(m, view, grid, kernel, store)
        dz = max(dz, float((mine.logits - sample.teacher_logits).abs().max()))
        dn = max(dn, float((mine.nodes - sample.teacher_nodes).abs().max()))
    return {"draws": draws, "mirrored": flips, "logits_max_abs_diff": dz, "nodes_max_abs_diff": dn}


def fitted_head(
    name: str,
    images: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    crop: tuple[int, int],
    *,
    crops_per_image: int = 8,
    steps: int = 100,
    seed: int = 1,
):
    """A random-backbone teacher whose BN statistics come from real crops and whose classifier is fitted.

    Like a trained teacher, it learns from crops: ``crops_per_image`` random official-augmentation
    views of ``crop`` size per image (scale 0.7-2.1, mirrored at random). BN: every BatchNorm's
    running statistics are reset and set from those crops as one train-mode batch (the pyramid's 1x1
    bin has one value per crop). Head: the model's 1x1 ``head`` conv is replaced by the multinomial
    logistic regression (L-BFGS, ``steps`` iterations, weight decay 1e-3 on standardised features) of
    the crops' labels (nearest train id at each output node, 255 ignored) on the teacher's feature
    there. Returns the eval-mode model and the fit's node accuracy (%).
    """
    model = _teacher(name, None).model
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        for _ in range(crops_per_image):
            view = sample_view(rng, i, tuple(image.shape[-2:]), crop)
            x, y = apply_view(image, label, view)
            xs.append(x)
            ys.append(y)
    batch = torch.stack(xs)
    calibrate_batchnorm(model, batch)
    feats, targets = [], []
    for x, label in zip(batch.split(4), torch.stack(ys).split(4), strict=True):
        _, feature = run_teacher(model, x, torch.device("cpu"))
        y = torch.nn.functional.interpolate(label[:, None].float(), size=feature.shape[-2:], mode="nearest")
        keep = y.flatten() != 255
        feats.append(feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1])[keep])
        targets.append(y.flatten()[keep].long())
    x, y = torch.cat(feats), torch.cat(targets)
    mean, std = x.mean(0), x.std(0) + 1e-6
    lin = torch.nn.Linear(x.shape[1], model.head.out_channels)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    z = (x - mean) / std

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(z), y) + 1e-3 * lin.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # fold the standardisation into the 1x1 conv: W (f - m) / s + b
        w = lin.weight / std
        model.head.weight.copy_(w[:, :, None, None])
        model.head.bias.copy_(lin.bias - w @ mean)
        accuracy = 100.0 * float(lin(z).argmax(1).eq(y).float().mean())
    return model, accuracy


def _teacher(name: str, weights: str | None):
    return create_teacher(name, weights=weights, random_weights=weights is None)


def table(result: dict, title: str) -> str:
    """Markdown: rows = crop scale, columns = agreement / KL / pair error for each option."""
    head = "| scale | " + " | ".join(f"{o} agree % | {o} KL | {o} pair" for o in OPTIONS) + " |"
    lines = [f"### {title}", "", head, "|" + "---|" * (1 + 3 * len(OPTIONS))]
    rows = [*result["per_scale"].items(), ("all", result["all"])]
    for name, row in rows:
        cells = [
            f"{row[o]['agreement_pct']:.1f} | {row[o]['kl_t1_mean']:.4f} | {row[o]['pair_cos_err_max_mean']:.4f}"
            for o in OPTIONS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    c = result["cost"]
    lines += [
        "",
        f"storage per image: dense@1.0 {c['dense@1.0']['bytes_per_image'] / 1e3:.1f} kB; S = {result['S']}: "
        f"{c['nearest']['bytes_per_image'] / 1e3:.1f} kB ({c['nearest']['storage_x']:.2f}x, codec bytes before "
        f"the compressor); teacher pixels {c['nearest']['teacher_pixels_x']:.2f}x single-scale dense "
        "(nearest and interp need the same maps); dense+flip 2x storage and teacher pixels",
    ]
    if result["S_off_lattice"]:
        lines.append(f"note: S scales {result['S_off_lattice']} resize the image off the 8-pixel lattice (off_lattice)")
    return "\n".join(lines)


def _data(args, size: tuple[int, int]) -> str:
    """The dataset root: --data, or a seeded sample dataset written once under benchmarks/out."""
    if args.data:
        return args.data
    root = OUT / "dense_agreement" / f"data-{size[0]}x{size[1]}-{args.images + args.fit_images}"
    if not (root / "leftImg8bit").exists():
        write_sample_dataset(root, num_train=args.images + args.fit_images, num_val=1, size=size, seed=0)
    return str(root)


def _weights(preset: dict, args) -> str | None:
    if args.random_weights:
        return None
    w = args.weights or preset.get("weights")
    if w is None:
        raise SystemExit(
            "error: this preset needs --weights: a trained teacher checkpoint (none can be downloaded here); "
            f"--weights {FITTED} or --random-weights measure an untrained stand-in's geometry only"
        )
    if w == "proxy":
        path = OUT / "teacher" / "run" / "model.safetensors"
        if not path.exists():
            raise SystemExit(
                f"the proxy teacher {path} is not trained yet: run `cd benchmarks && python -c 'from common import "
                "benchmark_teacher; benchmark_teacher()'` once (~10+ CPU-minutes), or pass --weights PATH"
            )
        return str(path)
    return w


def _size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--teacher", help="registered teacher name (default: the preset's)")
    p.add_argument("--weights", help="teacher weights (default: the preset's)")
    p.add_argument("--random-weights", action="store_true", help="random, BN-calibrated weights (create_teacher)")
    p.add_argument("--data", help="dataset root (default: a sample dataset at the preset's size)")
    p.add_argument("--size", type=_size, help="HxW of the generated sample images (default: the preset's)")
    p.add_argument("--crop", type=_size, help="student crop HxW (default: the preset's)")
    p.add_argument("--images", type=int, default=4, help="train images to measure")
    p.add_argument(
        "--fit-images",
        type=int,
        default=2,
        help="with --weights fitted-head: further train images the head is fitted on",
    )
    p.add_argument("--scales", type=float, nargs="+", default=list(OFFICIAL_SCALES), help="crop scales")
    p.add_argument("--multi", type=float, nargs="+", default=list(DEFAULT_S), help="the multi-scale set S")
    p.add_argument("--crops-per-scale", type=int, default=2)
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logits-codec", default=Store.logits_codec, help="the store's logits codec (fp32: lossless)")
    p.add_argument("--features-codec", default=Store.features_codec, help="the store's features codec")
    p.add_argument("--features-block", type=_size, default=Store.block, help="the store's feature cells HxW")
    p.add_argument("--name", help="name of the JSON under benchmarks/out (default: dense_agreement_PRESET)")
    p.add_argument("--cross-check", action="store_true", help="build a real dense store and compare SegTrainData")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    preset = PRESETS[args.preset]
    teacher = args.teacher or preset["teacher"]
    weights = _weights(preset, args)
    size, crop = args.size or preset["size"], args.crop or preset["crop"]
    if weights == FITTED and args.fit_images < 2:  # before anything is written
        raise SystemExit("error: --weights fitted-head needs --fit-images 2 or more (BN statistics need a batch)")
    data = _data(args, size)
    ds = open_dataset(data, splits=("train",))
    fit = args.fit_images if weights == FITTED else 0
    n = min(args.images, len(ds) - fit)
    if n < 1:
        raise SystemExit(f"error: {data} has {len(ds)} train images; --fit-images {fit} leaves none to measure")
    loaded = [ds.load(i) for i in range(n + fit)]
    images = [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1) for im, _, _ in loaded]
    fit_note = {}
    if weights == FITTED:
        if args.cross_check:
            raise SystemExit(
                "error: --cross-check builds a store from a weights file; it cannot use --weights fitted-head"
            )
        labels = [torch.from_numpy(np.ascontiguousarray(lab)) for _, lab, _ in loaded[n:]]
        t_fit = time.perf_counter()
        model, accuracy = fitted_head(teacher, images[n:], labels, crop)
        fit_note = {"fit_images": fit, "fit_node_accuracy_pct": accuracy, "fit_seconds": time.perf_counter() - t_fit}
        print(f"fitted head on {fit} images: {accuracy:.1f} % node accuracy ({fit_note['fit_seconds']:.0f} s)")
    else:
        model = _teacher(teacher, weights).model
    images = images[:n]
    store = Store(args.logits_codec, args.features_codec, tuple(args.features_block))
    t0 = time.perf_counter()
    result = measure(
        model,
        images,
        crop,
        crop_scales=args.scales,
        multi=args.multi,
        crops_per_scale=args.crops_per_scale,
        flip=not args.no_flip,
        seed=args.seed,
        store=store,
    )
    result.update(
        **fit_note,
        teacher=teacher,
        weights=weights or "random",
        images=n,
        image_size=list(images[0].shape[-2:]),
        crop=list(crop),
        grid=list(output_grid(model, *crop)),
        S=list(args.multi),
        store={"logits_codec": args.logits_codec, "features_codec": args.features_codec, "block": args.features_block},
        seconds=time.perf_counter() - t0,
        argv=list(sys.argv[1:] if argv is None else argv),
    )
    if args.cross_check:
        where = OUT / "dense_agreement" / "store"
        result["cross_check"] = {
            kind: cross_check(data, teacher, weights, crop, where / kind, store=store, dense_flip=kind == "dense+flip")
            for kind in ("dense@1.0", "dense+flip")
        }
    h, w = images[0].shape[-2:]
    source = "random weights" if weights is None else weights if weights == FITTED else Path(weights).name
    title = f"{teacher} ({source}), {n} images {h}x{w}, crop {crop[0]}x{crop[1]}"
    print(table(result, title))
    if "cross_check" in result:
        print(f"\ncross-check against SegTrainData on a built dense store: {result['cross_check']}")
    path = save(args.name or f"dense_agreement_{args.preset}", result)
    print(f"\nraw numbers: {path} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    try:
        main()
    except SkdError as exc:  # a missing weights file, a bad dataset: one line, as the CLIs say it
        raise SystemExit(f"error: {exc}") from None
