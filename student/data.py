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
import math
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
from pipeline.views import (
    OFFICIAL_SCALES,
    View,
    apply_view,
    gather_nodes,
    resample_map,
    sample_view,
    student_convention,
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
        labelled: False for an image without a label (its ``label`` is all ignore, explicitly).
        teacher_feature: (C, gh, gw) the teacher's feature map at this crop's grid (IFVD), or None.
    """

    image: Tensor
    label: Tensor
    teacher_logits: Tensor | None
    teacher_nodes: Tensor | None
    teacher_grid: tuple[int, int]
    draw: int
    teacher_image: Tensor | None = None
    labelled: bool = True
    teacher_feature: Tensor | None = None


@dataclass
class TrainBatch:
    image: Tensor  # (B, 3, h, w)
    label: Tensor  # (B, h, w)
    teacher_logits: Tensor | None  # (B, K, gh, gw)
    teacher_nodes: Tensor | None  # (B, C, nh, nw)
    teacher_grid: tuple[int, int]
    draws: Tensor  # (B,)
    teacher_image: Tensor | None = None  # (B, 3, h, w) un-jittered, for an online teacher
    labelled: Tensor | None = None  # (B,) bool; None: every sample is labelled
    teacher_feature: Tensor | None = None  # (B, C, gh, gw), for IFVD

    def _map(self, fn) -> TrainBatch:
        """The batch with ``fn`` applied to every tensor that travels to the device (draws stay put)."""
        names = ("image", "label", "teacher_logits", "teacher_nodes", "teacher_image", "labelled", "teacher_feature")
        moved = {n: None if getattr(self, n) is None else fn(getattr(self, n)) for n in names}
        return TrainBatch(teacher_grid=self.teacher_grid, draws=self.draws, **moved)

    def pin_memory(self) -> TrainBatch:
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device) -> TrainBatch:
        nb = device.type == "cuda"
        return self._map(lambda t: t.to(device, non_blocking=nb))


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
        labelled=torch.tensor([s.labelled for s in samples], dtype=torch.bool),
        teacher_feature=stack("teacher_feature"),
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
        need_feature: produce the teacher's feature map at each crop's grid (IFVD; a cache must
            store the full map, ``--features-block 1x1``).
        scales, flip: the official augmentation (dense and no-cache modes).
        photometric: colour jitter strength applied to the student's input only (0 = off).
        seed: the draw seed.
        student: the student model, or its registered name: teacher targets are delivered on ITS
            grid for the crop, at its node positions (``docs/architecture.md``, "Teacher and student
            of different families"). None: an ``skd`` student (8k+1 grid, ``align_corners=True``).
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
        need_feature: bool = False,
        scales: Sequence[float] = OFFICIAL_SCALES,
        flip: bool = True,
        photometric: float = 0.0,
        seed: int = 0,
        storage_options: dict | None = None,
        cache_dir: str | None = None,
        student: torch.nn.Module | str | None = None,
    ):
        self.data_root = str(data_root)
        self.splits = tuple(splits)
        self.crop = tuple(crop)
        self.cache_url = cache
        self.pair = pair
        self.need_logits = need_logits
        self.need_feature = need_feature
        self.scales = tuple(scales)
        self.flip = flip
        self.photometric = float(photometric)
        self.seed = int(seed)
        self.storage_options = storage_options
        self.cache_dir = cache_dir
        self.dataset = open_dataset(self.data_root, splits=self.splits)
        # targets are delivered on the student's grid (views stores: see _views_targets)
        self._student_ac, grid_of = student_convention(student)
        self._student_given = student is not None
        self._teacher_ac = True  # the cache teacher's node convention (TeacherStamp.align_corners)
        self._resample_views = False
        self.teacher_grid = grid_of(self.crop)
        self.mode = "none"
        self._reader: CacheReader | None = None
        self._cache_image: list[int] = []
        self._sha: list[str] = []
        self._length = len(self.dataset)
        #: per sample index: whether its image has a label (the sampler's --labelled-share reads it)
        self.labelled = np.asarray(self.dataset.labelled, dtype=bool)
        if cache is not None:
            reader = self._open()
            self.mode = reader.schema.mode
            self._cache_image = check_cache_matches(reader, self.dataset)
            self._teacher_ac = reader.schema.teacher.align_corners
            if self.mode == "views":
                self._views_targets(reader, grid_of)
            self._check_targets(reader)
            features = reader.schema.features
            if need_feature and (features is None or tuple(features.block) != (1, 1)):
                stored = "no features" if features is None else f"{features.block[0]}x{features.block[1]} cells"
                raise ConfigError(
                    f"the teacher's full feature map is needed (ifvd), but the cache {cache} stores {stored}: "
                    "rebuild with skdcache build --features-block 1x1"
                )
            if self.mode == "views":
                # one sample per stored view of the training images
                wanted = set(self._cache_image)
                self._entries = [e for e in range(reader.num_entries) if int(reader.entry_image[e]) in wanted]
                self._length = len(self._entries)
                self._record_of_image = {img: i for i, img in enumerate(self._cache_image)}
                records = [self._record_of_image[int(reader.entry_image[e])] for e in self._entries]
                self.labelled = np.array([self.dataset.has_label(r) for r in records], dtype=bool)
            self._reader = None  # workers open their own

    # -- cache ------------------------------------------------------------------------------------
    def _open(self) -> CacheReader:
        if self._reader is None:
            assert self.cache_url is not None
            self._reader = open_cache(self.cache_url, storage_options=self.storage_options, cache_dir=self.cache_dir)
            self._sha = self._reader.image_sha256()
        return self._reader

    def _views_targets(self, reader: CacheReader, grid_of) -> None:
        """The crop (the stored views') and the grid a views store's targets are delivered on.

        A student on the teacher's grid and node convention gets the stored maps as they are. A
        student of another convention gets them resampled onto its own grid's nodes. Without a
        student (an ``skd`` one assumed) a teacher with ``align_corners=True`` keeps its grid: the
        losses resample the student's maps onto it, which places nodes the same way.
        """
        crop_v = tuple(reader.schema.views.crop)  # type: ignore[union-attr]
        if crop_v != self.crop:
            logger.info("views store: crops are the stored %sx%s views", *crop_v)
            self.crop = crop_v
        stored = tuple(int(v) for v in reader.entry_grid[0])
        own = grid_of(self.crop)
        if not self._student_given and self._teacher_ac == self._student_ac:
            self.teacher_grid = stored
            return
        self.teacher_grid = own
        self._resample_views = own != stored or self._teacher_ac != self._student_ac
        if self._resample_views:
            logger.info(
                "views store: teacher targets on its %sx%s grid (align_corners=%s) are resampled onto the "
                "student's %sx%s grid (align_corners=%s)",
                *stored,
                self._teacher_ac,
                *own,
                self._student_ac,
            )

    def _target_coords(self, view: View, size: tuple[int, int], map_grid, map_flipped: bool = False):
        """Where the student's grid nodes of ``view`` fall on a teacher map's grid (both conventions)."""
        return view_grid_coords(
            view,
            size,
            map_grid,
            self.teacher_grid,
            map_flipped,
            out_align_corners=self._student_ac,
            map_align_corners=self._teacher_ac,
        )

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
            if s.mode == "views" and not self._resample_views:  # resampled nodes are gathered (approximate)
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
        """The image and its label; an unlabelled image gets an all-ignore label, explicitly."""
        img, label, sha = self.dataset.load(record)
        if label is None:
            label = np.full(img.shape[:2], self.dataset.ignore_index, dtype=np.uint8)
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
            sample = self._views_sample(draw, n, rng)
            sample.labelled = bool(self.labelled[n])
            return sample
        image_idx = self._cache_image[n] if self.mode == "dense" else None
        x, y = self._load(n, image_idx)
        view = sample_view(rng, n, tuple(x.shape[1:]), self.crop, self.scales, self.flip)
        crop, label = apply_view(x, y, view)
        logits = nodes = feature = None
        if self.mode == "dense":
            logits, nodes, feature = self._dense_targets(image_idx, view, tuple(x.shape[1:]))
        jittered = self._jitter(crop, rng)
        # no cache: an online teacher runs on this crop, and must see it as a cache's teacher would
        clean = crop if self.mode == "none" and jittered is not crop else None
        return TrainSample(
            jittered, label, logits, nodes, self.teacher_grid, draw, clean, bool(self.labelled[n]), feature
        )

    def _views_feature(self, entry) -> Tensor:
        """A stored view's full feature map (at block 1x1 the cells are the map), on the grid its logits use."""
        if self._resample_views:  # another student convention: resampled at its nodes, as the logits are
            gy, gx = self._target_coords(View.identity(0, self.crop), self.crop, entry.grid)
            return resample_map(torch.from_numpy(entry.feature), gy, gx, valid=entry.grid)
        gh, gw = entry.grid
        return torch.from_numpy(np.ascontiguousarray(entry.feature[:, :gh, :gw])).float()

    def _dense_targets(
        self, image: int, view: View, size: tuple[int, int]
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(logits, pair-wise nodes, full feature map) of the view, from ONE read of its entry."""
        reader = self._open()
        s = reader.schema
        use_flipped = view.flip and s.entries_per_image == 2
        entry = reader.read_entry(image * s.entries_per_image + (1 if use_flipped else 0))
        grid = entry.grid
        gy, gx = self._target_coords(view, size, grid, use_flipped)
        logits = resample_map(torch.from_numpy(entry.logits), gy, gx, valid=grid) if self.need_logits else None
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
        # the full map (block 1x1), resampled at the view's grid nodes as the logits are
        feature = resample_map(torch.from_numpy(entry.feature), gy, gx, valid=grid) if self.need_feature else None
        return logits, nodes, feature

    def _views_sample(self, draw: int, n: int, rng: np.random.Generator) -> TrainSample:
        reader = self._open()
        e = self._entries[n]
        entry = reader.read_entry(e)
        record = self._record_of_image[entry.image_index]
        x, y = self._load(record, entry.image_index)
        crop, label = apply_view(x, y, entry.view)
        feature = self._views_feature(entry) if self.need_feature else None
        if self._resample_views:
            # the teacher ran on this very crop: its map is resampled at the student's nodes of the crop
            return TrainSample(
                self._jitter(crop, rng),
                label,
                *self._resampled_view(reader, entry),
                self.teacher_grid,
                draw,
                teacher_feature=feature,
            )
        logits = torch.from_numpy(entry.logits) if self.need_logits else None
        nodes = None
        if self.pair is not None and entry.feature is not None:
            layout = reader.schema.features
            cells = entry.feature
            nodes = torch.from_numpy(
                compose_nodes(cells, layout.block, entry.grid, self.pair.kernel(entry.grid), layout.pool)  # type: ignore[union-attr]
            )
        return TrainSample(self._jitter(crop, rng), label, logits, nodes, entry.grid, draw, teacher_feature=feature)

    def _resampled_view(self, reader: CacheReader, entry) -> tuple[Tensor | None, Tensor | None]:
        """A stored view's targets on the student's grid: logits resampled, nodes gathered over the same regions."""
        gy, gx = self._target_coords(View.identity(0, self.crop), self.crop, entry.grid)
        logits = resample_map(torch.from_numpy(entry.logits), gy, gx, valid=entry.grid) if self.need_logits else None
        nodes = None
        if self.pair is not None and entry.feature is not None:
            layout = reader.schema.features
            kernel = self.pair.kernel(self.teacher_grid)
            cells = torch.from_numpy(entry.feature)
            nodes = gather_nodes(cells, layout.block, gy, gx, kernel, layout.pool, valid=entry.grid)  # type: ignore[union-attr]
        return logits, nodes

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

    With ``share`` (``--labelled-share``) every batch of ``batch_size`` holds exactly
    ``round(share * batch_size)`` labelled samples (``labelled`` flags each index) first, then
    unlabelled ones. Each pool is its own endless stream of seeded per-epoch permutations, and
    the batches of all ranks are dealt from them in step order, so the stream is as deterministic,
    rank-aware and resumable as the plain one. A pool's draw is ``epoch * n + index`` as above:
    ``draw % n`` is the sample and draws never repeat.
    """

    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
        labelled: np.ndarray | None = None,
        share: float | None = None,
        batch_size: int = 1,
    ):
        if n < 1:
            raise ConfigError("the training set is empty")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world, self.start = rank, world, start
        self.share, self.batch_size = share, batch_size
        self.pools: tuple[np.ndarray, np.ndarray] | None = None
        if share is not None:
            flags = np.ones(n, dtype=bool) if labelled is None else np.asarray(labelled, dtype=bool)
            self.pools = (np.flatnonzero(flags), np.flatnonzero(~flags))
            self.per_batch = labelled_per_batch(share, batch_size)
            for pool, count, what in ((0, self.per_batch, "labelled"), (1, batch_size - self.per_batch, "unlabelled")):
                if count and not len(self.pools[pool]):
                    raise ConfigError(
                        f"--labelled-share {share:g} puts {count} {what} sample(s) in each batch of {batch_size}, "
                        f"but the training splits have no {what} images: change --labelled-share or --split"
                    )
            if start % batch_size:
                raise ValueError("a mixed-share stream starts at a batch boundary")

    def __iter__(self) -> Iterator[int]:
        if self.pools is not None:
            yield from self._mixed()
            return
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

    def _mixed(self) -> Iterator[int]:
        """Batches of ``per_batch`` labelled then ``batch_size - per_batch`` unlabelled draws."""
        counts = (self.per_batch, self.batch_size - self.per_batch)
        step = self.start // self.batch_size
        perms: list[dict[int, np.ndarray]] = [{}, {}]
        while True:
            batch_index = step * self.world + self.rank  # the global batch this rank takes at this step
            for pool, count in enumerate(counts):
                for j in range(count):
                    yield self._pool_draw(pool, batch_index * count + j, perms[pool])
            step += 1

    def _pool_draw(self, pool: int, position: int, cache: dict[int, np.ndarray]) -> int:
        members = self.pools[pool]  # type: ignore[index]
        e, i = divmod(position, len(members))
        if e not in cache:
            cache.clear()  # positions only grow: one epoch's order is kept at a time
            order = np.random.default_rng([self.seed, pool + 1, e]).permutation(len(members))
            cache[e] = order if self.shuffle else np.arange(len(members))
        return int(e * self.n + members[cache[e][i]])

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of epoch ``epoch``: a permutation of ``range(n)`` seeded by ``(seed, epoch)``."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)


def labelled_per_batch(share: float, batch_size: int) -> int:
    """How many labelled samples a batch of ``batch_size`` holds at ``--labelled-share share`` (rounded)."""
    return int(math.floor(share * batch_size + 0.5))
