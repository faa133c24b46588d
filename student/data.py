"""Training samples: images, labels and (optionally) cached teacher targets, streamed per worker.

Three sources feed one sample type:

* no cache (student alone, or an online teacher): the student draws its own official view;
* a **dense** cache: the student draws its own view and the stored whole-image teacher maps are
  replayed on it (logits resampled at the view's grid nodes, pair-wise nodes gathered from the
  stored pooled cells; the mirrored-image entry is used for mirrored views when the store has it);
* a **views** cache: sample ``k`` is stored view ``k``; the crop is cut exactly as the teacher saw
  it and the teacher targets are the stored ones, exact.

The cache is opened lazily inside each DataLoader worker (fsspec filesystems are not fork-safe)
and every sample reads exactly one chunk per stored part, compared with the entry's build-time
checksum in the worker: a missing or altered chunk stops training with the entry's id instead of
teaching fill values (``benchmarks/read_checks.py`` measures what the check costs). Randomness
comes from a per-draw generator seeded by ``(seed, draw)``, so samples do not depend on worker
count or order and a resumed run sees the same stream.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from cache_tools import CacheReader, open_cache
from cache_tools.datasets import SegDataset, open_dataset
from cache_tools.errors import ConfigError, SchemaMismatchError, SkdError
from cache_tools.fidelity import compose_nodes, node_windows
from pipeline.models.base import grid_size
from pipeline.views import (
    OFFICIAL_SCALES,
    View,
    apply_view,
    gather_nodes,
    resample_map,
    sample_view,
    view_grid_coords,
)

from .functional import pair_kernel

__all__ = [
    "PairSpec",
    "TrainSample",
    "TrainBatch",
    "SegTrainData",
    "DrawSampler",
    "collate_samples",
    "check_cache_matches",
    "raise_worker_error",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairSpec:
    """How the pair-wise loss pools nodes: "max"/"avg", kernel = ``pool_scale`` of the map, or fixed."""

    pool: str = "max"
    pool_scale: float = 0.5
    fixed_kernel: int | None = None

    def kernel(self, grid: tuple[int, int]) -> tuple[int, int]:
        return pair_kernel(grid[0], grid[1], self.pool_scale, self.fixed_kernel)


@dataclass
class TrainSample:
    """One training sample (a crop).

    Attributes:
        image: (3, h, w) raw RGB 0–255, NaN where padded.
        label: (h, w) int64 train ids, 255 = ignore.
        teacher_logits: (K, gh, gw) teacher logits for this crop, or None.
        teacher_nodes: (C, nh, nw) teacher pair-wise nodes for this crop, or None.
        teacher_grid: (gh, gw) teacher grid of this crop.
        draw: the sampler's draw number (for debugging and reproducibility).
        teacher_image: the crop before photometric jitter, for an online teacher (None when the
            student's input is not jittered or the targets come from a cache): a cache's teacher
            never saw the jitter, so the online A/B reference must not either.
    """

    image: Tensor
    label: Tensor
    teacher_logits: Tensor | None
    teacher_nodes: Tensor | None
    teacher_grid: tuple[int, int]
    draw: int
    teacher_image: Tensor | None = None


@dataclass
class TrainBatch:
    image: Tensor  # (B, 3, h, w)
    label: Tensor  # (B, h, w)
    teacher_logits: Tensor | None  # (B, K, gh, gw)
    teacher_nodes: Tensor | None  # (B, C, nh, nw)
    teacher_grid: tuple[int, int]
    draws: Tensor  # (B,)
    teacher_image: Tensor | None = None  # (B, 3, h, w) un-jittered, for an online teacher

    def pin_memory(self) -> TrainBatch:
        return TrainBatch(
            image=self.image.pin_memory(),
            label=self.label.pin_memory(),
            teacher_logits=None if self.teacher_logits is None else self.teacher_logits.pin_memory(),
            teacher_nodes=None if self.teacher_nodes is None else self.teacher_nodes.pin_memory(),
            teacher_grid=self.teacher_grid,
            draws=self.draws,
            teacher_image=None if self.teacher_image is None else self.teacher_image.pin_memory(),
        )

    def to(self, device: torch.device) -> TrainBatch:
        nb = device.type == "cuda"
        return TrainBatch(
            image=self.image.to(device, non_blocking=nb),
            label=self.label.to(device, non_blocking=nb),
            teacher_logits=None if self.teacher_logits is None else self.teacher_logits.to(device, non_blocking=nb),
            teacher_nodes=None if self.teacher_nodes is None else self.teacher_nodes.to(device, non_blocking=nb),
            teacher_grid=self.teacher_grid,
            draws=self.draws,
            teacher_image=None if self.teacher_image is None else self.teacher_image.to(device, non_blocking=nb),
        )


class _WorkerFailure:
    """A user error raised in a worker, carried to the main process intact (see raise_worker_error)."""

    def __init__(self, exc: SkdError):
        self.cls = type(exc)
        self.message = str(exc)


def collate_samples(samples: Sequence[TrainSample | _WorkerFailure]) -> TrainBatch | _WorkerFailure:
    for s in samples:
        if isinstance(s, _WorkerFailure):
            return s
    grids = {s.teacher_grid for s in samples}
    if len(grids) != 1:
        raise ValueError(f"samples of one batch have different teacher grids: {sorted(grids)}")

    def stack(name: str) -> Tensor | None:
        values = [getattr(s, name) for s in samples]
        return None if values[0] is None else torch.stack(values)

    return TrainBatch(
        image=torch.stack([s.image for s in samples]),
        label=torch.stack([s.label for s in samples]),
        teacher_logits=stack("teacher_logits"),
        teacher_nodes=stack("teacher_nodes"),
        teacher_grid=grids.pop(),
        draws=torch.tensor([s.draw for s in samples]),
        teacher_image=stack("teacher_image"),
    )


def raise_worker_error(batch: TrainBatch | _WorkerFailure) -> TrainBatch:
    """Re-raise a worker's user error in the main process with its own type and one-line message."""
    if isinstance(batch, _WorkerFailure):
        raise batch.cls(batch.message)
    return batch


def check_cache_matches(reader: CacheReader, dataset: SegDataset) -> list[int]:
    """Check that a cache belongs to a dataset; return each dataset record's cache image index.

    Class list, ignore index and image ids are checked here; the content fingerprint of each image
    is checked when it is read (the bytes are read then anyway).

    Raises:
        SchemaMismatchError: with the first difference and what to do.
    """
    ds = reader.schema.dataset
    if tuple(ds.class_names) != tuple(dataset.class_names):
        raise SchemaMismatchError(
            f"the cache {reader.url} has {ds.num_classes} classes ({', '.join(ds.class_names[:3])}, ...) but the "
            f"dataset at {dataset.root} has {dataset.num_classes} ({', '.join(dataset.class_names[:3])}, ...): "
            "build the cache from this dataset"
        )
    if ds.ignore_index != dataset.ignore_index:
        raise SchemaMismatchError(
            f"the cache {reader.url} uses ignore index {ds.ignore_index}, the dataset {dataset.ignore_index}"
        )
    index = {s: i for i, s in enumerate(reader.image_ids)}
    missing = [r.id for r in dataset.records if r.id not in index]
    if missing:
        raise SchemaMismatchError(
            f"{len(missing)} of {len(dataset)} images of the dataset at {dataset.root} are not in the cache "
            f"{reader.url} (e.g. {missing[0]!r}); build the cache for these splits ({', '.join(dataset.splits)}) "
            "or train on the splits it holds"
        )
    return [index[r.id] for r in dataset.records]


class SegTrainData(Dataset):
    """Random-crop training samples, with teacher targets from a cache when one is given.

    Args:
        data_root: dataset root (Cityscapes or folder layout).
        splits: dataset splits to train on.
        crop: (h, w) crop size.
        cache: cache URL (dense or views), or None.
        pair: how the pair-wise loss pools nodes (None: no teacher nodes are produced).
        need_logits: produce teacher logits (pixel-wise / holistic losses).
        scales, flip: the official augmentation (dense and no-cache modes).
        photometric: colour jitter strength applied to the student's input only (0 = off).
        seed: the draw seed.
    """

    def __init__(
        self,
        data_root: str,
        splits: Sequence[str] = ("train",),
        crop: tuple[int, int] = (512, 512),
        *,
        cache: str | None = None,
        pair: PairSpec | None = None,
        need_logits: bool = True,
        scales: Sequence[float] = OFFICIAL_SCALES,
        flip: bool = True,
        photometric: float = 0.0,
        seed: int = 0,
        storage_options: dict | None = None,
        cache_dir: str | None = None,
    ):
        self.data_root = str(data_root)
        self.splits = tuple(splits)
        self.crop = tuple(crop)
        self.cache_url = cache
        self.pair = pair
        self.need_logits = need_logits
        self.scales = tuple(scales)
        self.flip = flip
        self.photometric = float(photometric)
        self.seed = int(seed)
        self.storage_options = storage_options
        self.cache_dir = cache_dir
        self.dataset = open_dataset(self.data_root, splits=self.splits)
        self.teacher_grid = (grid_size(self.crop[0]), grid_size(self.crop[1]))
        self.mode = "none"
        self._reader: CacheReader | None = None
        self._cache_image: list[int] = []
        self._sha: list[str] = []
        self._length = len(self.dataset)
        if cache is not None:
            reader = self._open()
            self.mode = reader.schema.mode
            self._cache_image = check_cache_matches(reader, self.dataset)
            self._check_targets(reader)
            if self.mode == "views":
                # one sample per stored view of the training images
                wanted = set(self._cache_image)
                self._entries = [e for e in range(reader.num_entries) if int(reader.entry_image[e]) in wanted]
                self._length = len(self._entries)
                self._record_of_image = {img: i for i, img in enumerate(self._cache_image)}
                grids = {tuple(int(v) for v in reader.entry_grid[e]) for e in self._entries[:1]}
                self.teacher_grid = grids.pop()
                crop_v = reader.schema.views.crop  # type: ignore[union-attr]
                if tuple(crop_v) != self.crop:
                    logger.info("views store: crops are the stored %sx%s views", *crop_v)
                    self.crop = tuple(crop_v)
            self._reader = None  # workers open their own

    # -- cache ------------------------------------------------------------------------------------
    def _open(self) -> CacheReader:
        if self._reader is None:
            assert self.cache_url is not None
            self._reader = open_cache(self.cache_url, storage_options=self.storage_options, cache_dir=self.cache_dir)
            self._sha = self._reader.image_sha256()
        return self._reader

    def _check_targets(self, reader: CacheReader) -> None:
        s = reader.schema
        if self.pair is not None:
            if s.features is None:
                raise ConfigError(
                    f"the pair-wise loss needs teacher features, but the cache {reader.url} has none "
                    "(it was built with --no-features): rebuild it with features or drop 'pair' from --losses"
                )
            if s.features.pool != self.pair.pool:
                raise ConfigError(
                    f"the pair-wise loss pools nodes by {self.pair.pool}, but the cache stores {s.features.pool}-pooled "
                    "features: rebuild with --features-pool " + self.pair.pool
                )
            if s.mode == "views":
                grid = tuple(int(v) for v in reader.entry_grid[0])
                kernel = self.pair.kernel(grid)
                block = s.features.block
                for axis in range(2):
                    wins = node_windows(grid[axis], kernel[axis])
                    if any(a % block[axis] or (b % block[axis] and b != grid[axis]) for a, b in wins):
                        raise ConfigError(
                            f"the pair-wise nodes (kernel {kernel[0]}x{kernel[1]} on the {grid[0]}x{grid[1]} grid) "
                            f"do not fall on the cache's {block[0]}x{block[1]} feature cells: rebuild with "
                            f"--features-block dividing the kernel (1x1 stores the full map)"
                        )

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_reader"] = None  # never pickle a live store into a worker
        return state

    # -- samples ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._length

    def __getitem__(self, draw: int) -> TrainSample | _WorkerFailure:
        try:
            return self._sample(int(draw))
        except SkdError as exc:
            return _WorkerFailure(exc)

    def _load(self, record: int, image: int | None) -> tuple[Tensor, Tensor]:
        img, label, sha = self.dataset.load(record)
        if image is not None and self._sha and self._sha[image] and self._sha[image] != sha:
            rec = self.dataset.records[record]
            raise SchemaMismatchError(
                f"image {rec.id} differs from the one the cache was built from (sha256 {sha[:12]}… vs "
                f"{self._sha[image][:12]}…): the dataset changed since `skdcache build`; rebuild the cache"
            )
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), torch.from_numpy(label)

    def _sample(self, draw: int) -> TrainSample:
        rng = np.random.default_rng([self.seed, draw])
        n = draw % self._length
        if self.mode == "views":
            return self._views_sample(draw, n, rng)
        image_idx = self._cache_image[n] if self.mode == "dense" else None
        x, y = self._load(n, image_idx)
        view = sample_view(rng, n, tuple(x.shape[1:]), self.crop, self.scales, self.flip)
        crop, label = apply_view(x, y, view)
        logits = nodes = None
        if self.mode == "dense":
            logits, nodes = self._dense_targets(image_idx, view, tuple(x.shape[1:]))
        jittered = self._jitter(crop, rng)
        # no cache: an online teacher runs on this crop, and must see it as a cache's teacher would
        clean = crop if self.mode == "none" and jittered is not crop else None
        return TrainSample(jittered, label, logits, nodes, self.teacher_grid, draw, clean)

    def _dense_targets(self, image: int, view: View, size: tuple[int, int]) -> tuple[Tensor | None, Tensor | None]:
        reader = self._open()
        s = reader.schema
        use_flipped = view.flip and s.entries_per_image == 2
        entry = reader.read_entry(image * s.entries_per_image + (1 if use_flipped else 0))
        grid = entry.grid
        gy, gx = view_grid_coords(view, size, grid, self.teacher_grid, map_flipped=use_flipped)
        logits = resample_map(torch.from_numpy(entry.logits), gy, gx) if self.need_logits else None
        nodes = None
        if self.pair is not None and entry.feature is not None:
            layout = s.features
            nodes = gather_nodes(
                torch.from_numpy(entry.feature),
                layout.block,  # type: ignore[union-attr]
                gy,
                gx,
                self.pair.kernel(self.teacher_grid),
                layout.pool,  # type: ignore[union-attr]
                valid=grid,
            )
        return logits, nodes

    def _views_sample(self, draw: int, n: int, rng: np.random.Generator) -> TrainSample:
        reader = self._open()
        e = self._entries[n]
        entry = reader.read_entry(e)
        record = self._record_of_image[entry.image_index]
        x, y = self._load(record, entry.image_index)
        crop, label = apply_view(x, y, entry.view)
        logits = torch.from_numpy(entry.logits) if self.need_logits else None
        nodes = None
        if self.pair is not None and entry.feature is not None:
            layout = reader.schema.features
            cells = entry.feature
            nodes = torch.from_numpy(
                compose_nodes(cells, layout.block, entry.grid, self.pair.kernel(entry.grid), layout.pool)  # type: ignore[union-attr]
            )
        return TrainSample(self._jitter(crop, rng), label, logits, nodes, entry.grid, draw)

    def _jitter(self, crop: Tensor, rng: np.random.Generator) -> Tensor:
        """Photometric augmentation of the student's input only (the teacher's targets are fixed)."""
        if self.photometric <= 0:
            return crop
        s = self.photometric
        gain = 1.0 + rng.uniform(-s, s)
        bias = 255.0 * rng.uniform(-s, s) / 2
        per_channel = torch.from_numpy(1.0 + rng.uniform(-s / 2, s / 2, size=(3, 1, 1))).float()
        return (crop * gain * per_channel + bias).clamp(0, 255)  # NaN padding stays NaN


class DrawSampler(Sampler[int]):
    """An endless, seeded, rank-aware stream of draw numbers for iteration-based training.

    Epoch ``e`` is a permutation of ``range(n)`` seeded by ``(seed, e)``; draw ``d`` of the global
    stream is ``e * n + perm_e[i]``-indexed, and rank ``r`` of ``world`` takes every ``world``-th
    draw (the DistributedSampler rule). ``start`` skips the draws a resumed run already consumed.
    """

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1, start: int = 0):
        if n < 1:
            raise ConfigError("the training set is empty")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world, self.start = rank, world, start

    def __iter__(self) -> Iterator[int]:
        position = self.start * self.world + self.rank
        epoch, perm = -1, np.arange(self.n)
        while True:
            e, i = divmod(position, self.n)
            if e != epoch and self.shuffle:  # one permutation per epoch, not per draw
                perm = self.permutation(e)
            epoch = e
            # draws are unique across epochs: the rng of a sample depends on the epoch too
            yield int(epoch * self.n + perm[i])
            position += self.world

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of epoch ``epoch``: a permutation of ``range(n)`` seeded by ``(seed, epoch)``."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)
