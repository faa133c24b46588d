"""Stage one: run a teacher once over a dataset and write a cache.

The build is a three-stage pipeline:

1. DataLoader workers read and hash image files, decode them, check labels and cut views;
2. the main process runs the teacher (on CUDA when present, CPU otherwise, at ``precision``: fp32
   unless asked) and pools the distillation feature into the stored cells;
3. a small thread pool behind a bounded queue encodes, checksums and measures each entry and
   writes each shard whole as soon as its last entry is encoded, so writing overlaps compute.

Resumable: shards whose done markers are all set are skipped; re-running the same command after
a crash continues, re-running it on a complete store does nothing (the store is left byte for byte
as it is), and any other configuration on an existing store needs ``overwrite``. A teacher output
that is not finite stops the build before anything of that image is stored.

Teacher precision is recorded and measured: the store's ``build`` provenance names it
(``precision``) and, for anything but fp32, holds its error against an fp32 forward on the first
entries of the fidelity sample (``precision_error``, :func:`measure_precision`), beside the codec's
``fidelity``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cache_tools.codecs import FeatureCodec, LogitCodec, fit_pca, parse_feature_codec
from cache_tools.datasets import SegDataset, open_dataset
from cache_tools.entries import encode_entry, write_encoded_shard
from cache_tools.errors import ConfigError, ConfigMismatchError, DatasetError, ModelError, SchemaError, SkdError
from cache_tools.fidelity import compose_nodes, entry_fidelity, official_kernel, summarize
from cache_tools.options import MAX_SEED, MAX_SIDE, check_options, option
from cache_tools.schema import (
    FIDELITY_COLUMNS,
    LOGIT_CODECS,
    POOLS,
    CacheSchema,
    Compressor,
    DatasetStamp,
    DenseParams,
    TargetLayout,
    View,
    ViewsParams,
    ids_digest,
)
from cache_tools.storage import is_remote, local_path, remove_store
from cache_tools.store import CacheWriter, prepare_cache
from cache_tools.workers import start_workers

from .inference import PRECISIONS, check_precision, output_grid, pick_device, pool_cells, run_teacher, slide_teacher
from .teachers import Teacher
from .views import OFFICIAL_SCALES, apply_view, sample_views

__all__ = [
    "BuildConfig",
    "BuildProgress",
    "BuildResult",
    "NonFiniteTeacherError",
    "already_complete",
    "build_cache",
    "build_shards",
    "measure_precision",
    "plan_build",
    "prepare_build",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """Everything ``skdcache build`` needs; each field is one ``skdcache build`` flag.

    Choices and ranges live on the fields (:func:`cache_tools.options.option`): a library caller gets
    the same one-line :class:`ConfigError` as a CLI user, and the CLI tests check every flag's
    default and help against them. Fields marked ``internal`` have no flag on purpose.
    """

    data: str
    out: str
    teacher: str | None = None  # None: the model recognised from --weights (pipeline.recognize)
    weights: str | None = None
    random_weights: bool = False
    seed: int = option(0, lo=0, hi=MAX_SEED)
    weights_format: str = option("auto", choices=("auto", "skd", "official"))
    # the teacher sanity gate (pipeline.sanity): mIoU on labelled images before anything is cached
    teacher_check: bool = option(True, flag="--no-teacher-check")
    check_split: str | None = None  # None: the cached split(s)
    check_images: int = option(8, lo=1, hi=100_000)
    splits: tuple[str, ...] = option(("train",), flag="--split")
    mode: str = option("dense", choices=("dense", "views"))
    # views mode
    views: int = option(4, lo=1, hi=1024)
    crop: tuple[int, int] = option((512, 512), lo=1, hi=MAX_SIDE)
    view_seed: int = option(0, lo=0, hi=MAX_SEED)
    scales: tuple[float, ...] = option(OFFICIAL_SCALES, lo=0, lo_open=True, hi=16)
    flip: bool = option(True, flag="--no-flip")
    # dense mode
    dense_flip: bool = False
    inference: str = option("whole", choices=("whole", "slide"))
    tile: tuple[int, int] | None = option(None, lo=1, hi=MAX_SIDE)
    overlap: float = option(1.0 / 3.0, lo=0, hi=0.99)
    # what is stored and how
    logits_codec: str = option("gap-u8", choices=LOGIT_CODECS)
    logits_clip: float | None = option(None, lo=0, lo_open=True, hi=1000)  # None: the codec's own (48 / 64)
    features: bool = option(True, flag="--no-features")
    features_codec: str = "fp16"
    features_pool: str = option("max", choices=POOLS)
    features_block: tuple[int, int] | None = option(None, lo=1, hi=1024)
    compressor: str = "zstd:1"
    shard_images: int | None = option(None, flag="--shard-size", lo=1, hi=65536)
    # execution
    batch_size: int = option(8, lo=1, hi=4096)
    loader_workers: int = option(2, lo=0, hi=256)
    writer_threads: int = option(2, lo=1, hi=256)
    queue_size: int = option(8, lo=1, hi=4096)
    device: str = "auto"
    precision: str = option("fp32", choices=PRECISIONS)
    amp: bool = option(True, flag="--no-amp")  # deprecated: --no-amp is --precision fp32 (the default)
    fidelity_samples: int = option(64, lo=0, hi=1_000_000)
    pca_samples: int = option(16, lo=1, hi=100_000)
    skip_unreadable: bool = False
    overwrite: bool = False
    storage_options: dict = option(default_factory=dict, flag="--storage-option")  # noqa: RUF009 (a field specifier)
    threads: int | None = option(None, lo=1, hi=4096)

    def __post_init__(self) -> None:
        check_options(self)
        if self.inference == "slide" and self.tile is None:
            raise ConfigError("--inference slide needs --tile HxW")
        if self.weights and self.random_weights:
            raise ConfigError("give either --weights or --random-weights, not both")
        if self.random_weights and self.teacher is None:
            raise ConfigError("--random-weights needs --teacher NAME (skdcache teachers lists them)")
        if not self.scales:
            raise ConfigError("--scales needs at least one number")
        try:  # the codec and compressor names and their parameters
            LogitCodec(self.logits_codec, clip=self.logits_clip)
            parse_feature_codec(self.features_codec)
            Compressor.parse(self.compressor)
        except SchemaError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def entries_per_image(self) -> int:
        return self.views if self.mode == "views" else (2 if self.dense_flip else 1)


@dataclass
class BuildProgress:
    """Passed to the progress callback after each written shard and every teacher batch."""

    entries_done: int
    entries_total: int
    bytes_written: int
    seconds: float
    stage: str = "build"


@dataclass
class BuildResult:
    """What a build did.

    Attributes:
        already_complete: the destination already held a complete cache of this configuration;
            nothing was run or written (the store is byte for byte as it was).
    """

    url: str
    schema: CacheSchema
    resumed: bool
    entries_written: int
    seconds: float
    teacher_seconds: float
    bytes_encoded: int
    skipped_images: list[str] = field(default_factory=list)
    already_complete: bool = False
    recognised: dict | None = None  # what --weights holds (Recognition.to_dict()), None without --weights
    teacher_check: dict | None = None  # the sanity gate's measurement, None when skipped


class NonFiniteTeacherError(ModelError):
    """The teacher produced NaN or infinite values; nothing of that image was stored."""


def _check_finite(plan: BuildPlan, images: Sequence[int], per_image: int, **outputs: torch.Tensor) -> None:
    """Refuse teacher outputs (first axis: ``per_image`` entries per image) that are not all finite."""
    for what, value in outputs.items():
        if value is None or bool(torch.isfinite(value).all()):
            continue
        bad = ~torch.isfinite(value.reshape(value.shape[0], -1)).all(dim=1)
        first = int(torch.nonzero(bad)[0, 0]) // per_image
        raise NonFiniteTeacherError(
            f"the teacher's {what} for image {plan.ids[images[first]]} hold NaN or infinite values; nothing of "
            "it was stored and the cache stays incomplete. Likely causes: weights that were not loaded or are "
            "broken (check --weights), input normalisation that does not match the teacher, or overflow in "
            "reduced precision (try --no-amp / --precision fp32)"
        )


# --------------------------------------------------------------------------------------------------
# planning: everything that can fail on bad input happens here, before the store is touched


@dataclass
class BuildPlan:
    config: BuildConfig
    dataset: SegDataset
    records: list[int]  # dataset record indices in store order
    ids: list[str]
    sizes: np.ndarray  # (I, 2)
    teacher: Teacher
    device: torch.device
    views: list[View]
    grids: np.ndarray  # (E, 2)
    schema: CacheSchema
    skipped: list[str]
    precision: str = "fp32"
    precision_error: dict = field(default_factory=dict)  # measure_precision(), filled by prepare_build
    recognised: dict | None = None  # Recognition.to_dict() of --weights
    teacher_check: dict | None = None  # the sanity gate's result (or the one the store recorded); None: skipped


def _teacher_precision(config: BuildConfig, device: torch.device) -> str:
    """The teacher's precision on ``device``; ``--no-amp`` (deprecated) is another name for fp32."""
    if not config.amp and config.precision != "fp32":
        raise ConfigError(
            f"--no-amp (deprecated) means --precision fp32 and contradicts --precision {config.precision}; "
            "drop --no-amp"
        )
    check_precision(device, config.precision)
    return config.precision


def _readable(dataset: SegDataset, i: int) -> str | None:
    """None when record ``i``'s image passes the checks a build applies (header, mode, full decode), else why not."""
    try:
        dataset.image_size(i)
        dataset.read_image(i)
    except SkdError as exc:
        return str(exc)
    return None


def _default_shard_images(entry_bytes: int, per_image: int, num_images: int) -> int:
    target = 32 * 2**20  # ~32 MB of encoded values per shard object
    n = max(1, min(256, target // max(1, entry_bytes * per_image)))
    return min(n, num_images)


def plan_build(config: BuildConfig) -> BuildPlan:
    """Validate the inputs and work out the store layout. Touches nothing on the destination."""
    dataset = open_dataset(config.data, splits=config.splits)
    records, skipped = _readable_records(config, dataset)
    ids = [dataset.records[i].id for i in records]
    sizes = np.array([dataset.image_size(i) for i in records], dtype=np.int64)  # refuses what load() would

    device = pick_device(config.device)
    precision = _teacher_precision(config, device)
    teacher, recognised = _make_teacher(config, dataset, device)
    info = teacher.info
    teacher_check = _recorded_check(config, info.weights_sha256) or run_teacher_check(
        config, teacher, dataset, device, precision
    )
    views, grids, canvas = _plan_entries(config, teacher.model, sizes)
    logits_layout, features_layout = _plan_layouts(config, dataset.num_classes, info.feature_channels, canvas)
    k = config.entries_per_image
    entry_bytes = canvas[0] * canvas[1] * (dataset.num_classes + 2)
    if features_layout is not None:
        hp, wp = features_layout.cells
        entry_bytes += hp * wp * features_layout.depth * 2
    shard_images = config.shard_images or _default_shard_images(entry_bytes, k, len(records))
    if shard_images < 1:
        raise ConfigError("--shard-size must be at least 1 image")

    schema = CacheSchema(
        mode=config.mode,
        teacher=info,
        dataset=DatasetStamp(
            name=dataset.name,
            splits=tuple(config.splits),
            num_images=len(ids),
            ids_sha256=ids_digest(ids),
            class_names=tuple(dataset.class_names),
            ignore_index=dataset.ignore_index,
        ).with_labels([dataset.has_label(i) for i in records]),  # which images have labels
        num_entries=len(views),
        entries_per_image=k,
        shard_entries=shard_images * k,
        id_bytes=max(16, max(len(s.encode()) for s in ids)),
        logits=logits_layout,
        features=features_layout,
        views=(
            ViewsParams(per_image=k, seed=config.view_seed, crop=config.crop, scales=config.scales, flip=config.flip)
            if config.mode == "views"
            else None
        ),
        dense=(
            DenseParams(flip=config.dense_flip, inference=config.inference, tile=config.tile, overlap=config.overlap)
            if config.mode == "dense"
            else None
        ),
        build=_provenance(precision, recognised, teacher_check, slide=config.inference == "slide"),
    )
    return BuildPlan(
        config,
        dataset,
        records,
        ids,
        sizes,
        teacher,
        device,
        views,
        grids,
        schema,
        skipped,
        precision,
        recognised=recognised,
        teacher_check=teacher_check,
    )


def _readable_records(config: BuildConfig, dataset: SegDataset) -> tuple[list[int], list[str]]:
    """The dataset records to cache and the ids skipped as unreadable (``--skip-unreadable`` only)."""
    records = list(range(len(dataset)))
    if not config.skip_unreadable:
        return records, []
    keep, skipped = [], []
    for i in records:
        rec = dataset.records[i]
        problem = _readable(dataset, i)
        if problem is None:
            keep.append(i)
        else:
            skipped.append(rec.id)
            logger.warning("skipping unreadable image %s: %s", rec.id, problem)
    if not keep:
        raise DatasetError(f"no readable images under {config.data}")
    return keep, skipped


def _plan_entries(
    config: BuildConfig, model: torch.nn.Module, sizes: np.ndarray
) -> tuple[list[View], np.ndarray, tuple[int, int]]:
    """The entries' views, their teacher grids ``(E, 2)`` and the canvas (the largest grid)."""
    k = config.entries_per_image
    if config.mode == "views":
        views = sample_views(config.view_seed, [tuple(s) for s in sizes], k, config.crop, config.scales, config.flip)
        grid = output_grid(model, *config.crop)
        return views, np.tile(np.array(grid, dtype=np.int64), (len(views), 1)), grid
    views = []
    for i, (h, w) in enumerate(sizes):
        views.append(View.identity(i, (int(h), int(w))))
        if config.dense_flip:
            views.append(View.identity(i, (int(h), int(w)), flip=True))
    grid_of = {(h, w): output_grid(model, h, w) for h, w in {(int(h), int(w)) for h, w in sizes}}
    grids = np.array([grid_of[(int(sizes[v.image][0]), int(sizes[v.image][1]))] for v in views], dtype=np.int64)
    return views, grids, (int(grids[:, 0].max()), int(grids[:, 1].max()))


def _plan_layouts(
    config: BuildConfig, num_classes: int, feature_channels: int, canvas: tuple[int, int]
) -> tuple[TargetLayout, TargetLayout | None]:
    """How the logits and (unless ``--no-features``) the feature are stored."""
    logit_codec = LogitCodec(config.logits_codec, clip=config.logits_clip)
    comp = Compressor.parse(config.compressor)
    logits = TargetLayout(
        codec=logit_codec.name, channels=num_classes, grid=canvas, compressor=comp, params=logit_codec.params
    )
    if not config.features:
        return logits, None
    fname, k_pca = parse_feature_codec(config.features_codec)
    if config.features_block is not None:
        block = config.features_block
    elif config.mode == "views":
        block = official_kernel(*canvas)
    else:
        block = (8, 8)
    if k_pca is not None and k_pca > feature_channels:
        raise ConfigError(f"--features-codec pca{k_pca} keeps more channels than the teacher has ({feature_channels})")
    features = TargetLayout(
        codec=fname,
        channels=feature_channels,
        grid=canvas,
        compressor=comp,
        pool=config.features_pool,
        block=tuple(block),  # type: ignore[arg-type]
        stored_channels=k_pca,
        params={"components": k_pca} if k_pca else {},
    )
    return logits, features


def _provenance(precision: str, recognised: dict | None, teacher_check: dict | None, slide: bool = False) -> dict:
    """The ``build`` provenance written when the store is created (a resume must use the same)."""
    out: dict = {"precision": precision}
    if slide:
        out["tile_stride"] = TILE_STRIDE
    if recognised is not None:
        out["recognised"] = recognised["description"]
    if teacher_check is not None:
        out["teacher_check"] = teacher_check
    return out


def _recorded_check(config: BuildConfig, weights_sha256: str | None) -> dict | None:
    """The sanity check an existing store at ``--out`` recorded for these same weights (a resume skips it)."""
    if config.weights is None or not config.teacher_check or config.overwrite:
        return None
    from cache_tools.store import open_cache

    try:
        existing = open_cache(config.out, storage_options=config.storage_options or None, allow_incomplete=True)
    except Exception:  # noqa: BLE001 - nothing (readable) there: the check runs
        return None
    recorded = existing.schema.build.get("teacher_check")
    if existing.schema.teacher.weights_sha256 != weights_sha256 or not isinstance(recorded, dict):
        return None
    logger.info("teacher check recorded in %s (resume): not run again", config.out)
    return recorded


def _make_teacher(config: BuildConfig, dataset: SegDataset, device: torch.device) -> tuple[Teacher, dict | None]:
    """The teacher ``--teacher`` names, or the one recognised from ``--weights``; says what it chose."""
    from .recognize import load_teacher

    teacher, name, rec = load_teacher(  # reads --weights once
        config.weights,
        config.teacher,
        dataset.num_classes,
        random_weights=config.random_weights,
        seed=config.seed,
        weights_format=config.weights_format,
        device=str(device),
    )
    if rec is not None:
        chosen = "as given" if config.teacher else "recognised"
        logger.info("teacher %s (%s): %s", name, chosen, rec.describe())
    if rec is None or rec.family == "unknown":  # a custom teacher's own layout: nothing to report
        return teacher, None
    return teacher, {**rec.to_dict(), "chosen": name, "given": config.teacher}


def run_teacher_check(
    config: BuildConfig, teacher: Teacher, dataset: SegDataset, device: torch.device, precision: str
) -> dict | None:
    """The sanity gate on labelled images before caching (None when skipped: no weights, or --no-teacher-check).

    Raises:
        WeightsError: the teacher is near chance or collapsed (the message names the likely causes).
        DatasetError: ``--check-split`` has other classes than the cached split, or no labelled image.
    """
    from .sanity import check_teacher

    cfg = config
    if cfg.weights is None or not cfg.teacher_check:  # random weights are at chance by design: no gate
        return None
    check_ds = open_dataset(cfg.data, splits=(cfg.check_split,)) if cfg.check_split else dataset
    if tuple(check_ds.class_names) != tuple(dataset.class_names):
        raise DatasetError(
            f"--check-split {cfg.check_split} has other classes than the cached split(s); check on a split of the "
            "same dataset"
        )
    report = teacher.report
    result = check_teacher(
        teacher.model,
        check_ds,
        cfg.check_images,
        device,
        precision=precision,
        load_summary=report.summary() if report is not None else None,
    )
    logger.info("%s", result.line())
    return {**result.to_dict(), "split": cfg.check_split or ",".join(cfg.splits)}


# --------------------------------------------------------------------------------------------------
# stage 1: reading images (DataLoader workers)


class _ImageSource(Dataset):
    """Yields, per image, the inputs of all its entries: (image index, sha256, crops (k, 3, h, w))."""

    def __init__(self, dataset: SegDataset, records: list[int], views: list[View], per_image: int, images: list[int]):
        self.dataset = dataset
        self.records = records
        self.views = views
        self.per_image = per_image
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, n: int) -> tuple[int, bytes, torch.Tensor] | _WorkerFailure:
        if torch.utils.data.get_worker_info() is None:
            return self.load(n)
        try:
            return self.load(n)
        except SkdError as exc:  # carried to the main process as one line, not a worker traceback
            return _WorkerFailure(exc)

    def load(self, n: int) -> tuple[int, bytes, torch.Tensor]:
        """The inputs of the ``n``-th image's entries (raises DatasetError for a bad image)."""
        img = self.images[n]
        image, _label, sha = self.dataset.load(self.records[img])  # load() checks the label too
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # (3, H, W) uint8
        entries = self.views[img * self.per_image : (img + 1) * self.per_image]
        crops = torch.stack([apply_view(x, None, v)[0] for v in entries])  # a dense entry is the identity view
        return img, bytes.fromhex(sha), crops


class _WorkerFailure:
    """A user error raised in a loader worker, re-raised in the main process with its type and message."""

    def __init__(self, exc: SkdError):
        self.cls = type(exc)
        self.message = str(exc)


def _collate(batch):
    for item in batch:
        if isinstance(item, _WorkerFailure):
            return item  # re-raised by the main process (_run_pipeline)
    return batch


# --------------------------------------------------------------------------------------------------
# stage 3: encoding and writing (thread pool)


class _ShardWriter:
    """Encodes entries, buffers them per shard and writes each shard whole when it is complete."""

    def __init__(
        self,
        writer: CacheWriter,
        schema: CacheSchema,
        logit_codec: LogitCodec,
        feature_codec: FeatureCodec | None,
        sample_every: int,
    ):
        self.writer = writer
        self.schema = schema
        self.logit_codec = logit_codec
        self.feature_codec = feature_codec
        self.sample_every = sample_every
        self.lock = threading.Lock()
        self.buffers: dict[int, dict] = {}
        self.bytes_written = 0
        self.entries_written = 0
        self.error: BaseException | None = None

    def add(self, img: int, sha: bytes, entries: list[int], logits: np.ndarray, cells, grids) -> None:
        encoded = [
            encode_entry(
                logits[j],
                None if cells is None else cells[j],
                grids[j],
                logit_codec=self.logit_codec,
                feature_codec=self.feature_codec,
                features=self.schema.features,
                measure=e % self.sample_every == 0,
            )
            for j, e in enumerate(entries)
        ]
        k = self.schema.entries_per_image
        shard = entries[0] // self.schema.shard_entries
        a, b = self.schema.shard_range(shard)
        with self.lock:
            buf = self.buffers.setdefault(shard, {"entries": {}, "sha": {}})
            for e, enc in zip(entries, encoded, strict=True):
                buf["entries"][e] = enc
            buf["sha"][img] = sha
            complete = len(buf["entries"]) == b - a
            if complete:
                del self.buffers[shard]
        if not complete:
            return
        sha_rows = np.stack([np.frombuffer(buf["sha"][i], dtype=np.uint8) for i in range(a // k, b // k)])
        n = write_encoded_shard(self.writer, shard, [buf["entries"][e] for e in range(a, b)], sha_rows)
        with self.lock:
            self.bytes_written += n
            self.entries_written += b - a


def _teacher_outputs(
    plan: BuildPlan, crops: torch.Tensor, img: int, precision: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher on one image's crops at ``precision`` (default: the build's)."""
    cfg = plan.config
    model, device = plan.teacher.model, plan.device
    precision = precision or plan.precision
    if cfg.mode == "dense" and cfg.inference == "slide":
        grid = tuple(plan.grids[img * cfg.entries_per_image])
        outs = [slide_teacher(model, c[None], grid, cfg.tile, cfg.overlap, device, precision) for c in crops]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    return run_teacher(model, crops, device, precision)


def _fit_pca(plan: BuildPlan, k: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA basis of the stored (pooled) feature vectors, fitted on the first few images."""
    cfg = plan.config
    layout = plan.schema.features
    assert layout is not None
    source = _ImageSource(plan.dataset, plan.records, plan.views, cfg.entries_per_image, list(range(len(plan.ids))))
    vectors = []
    for n in range(min(cfg.pca_samples, len(source))):
        img, _sha, crops = source[n]
        _, feat = _teacher_outputs(plan, crops, img)
        _check_finite(plan, [img], len(crops), features=feat)
        cells = pool_cells(feat, layout.block, layout.pool)
        vectors.append(cells.permute(0, 2, 3, 1).reshape(-1, cells.shape[1]).cpu().numpy())
    basis, mean, kept = fit_pca(np.concatenate(vectors), k)
    logger.info("PCA to %d of %d channels keeps %.2f%% of the variance", k, layout.channels, 100 * kept)
    return basis, mean


def _refuse_out_over_data(config: BuildConfig) -> None:
    """--out must not be the dataset or a folder holding it (--overwrite would delete the images)."""
    if is_remote(config.out) or is_remote(config.data):
        return
    out, data = local_path(config.out).resolve(), local_path(config.data).resolve()
    if data == out or out in data.parents:
        raise ConfigError(f"--out {config.out} holds the dataset --data {config.data}; choose another --out")


def prepare_build(config: BuildConfig) -> tuple[BuildPlan, CacheWriter, bool]:
    """Plan and create (or reopen for resume) the store; a new ``pca`` store gets its basis fitted.

    A resumed store keeps the basis it holds: the fit (which runs the teacher) happens only when
    the store is created.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    _refuse_out_over_data(config)
    plan = plan_build(config)
    schema = plan.schema
    fitted = None
    if schema.features is not None and schema.features.codec == "pca":
        depth = schema.features.depth

        def fitted() -> FeatureCodec:
            return FeatureCodec("pca", *_fit_pca(plan, depth))

    def prepare() -> tuple[CacheWriter, bool]:
        return prepare_cache(
            config.out,
            schema,
            image_ids=plan.ids,
            image_sizes=plan.sizes,
            views=plan.views,
            grids=plan.grids,
            feature_codec=fitted,
            overwrite=config.overwrite,
            storage_options=config.storage_options or None,
        )

    writer, resumed = prepare()
    if resumed and (_mixed_tiling(writer.schema, config) or _other_precision(writer.schema, plan.precision, config)):
        remove_store(config.out, config.storage_options or None)  # skd's own cache, replaced with --overwrite
        writer, resumed = prepare()
    if writer.schema.status != "complete":
        plan.precision_error = measure_precision(plan)
    return plan, writer, resumed


#: The slide-tile stride rule this build uses, recorded in slide stores: ``ceil(tile * (1 - overlap))``,
#: as the official ``predict_sliding``. Builds before it was recorded used ``int(...)``.
TILE_STRIDE = "ceil"


def _mixed_tiling(existing: CacheSchema, config: BuildConfig) -> bool:
    """True when ``existing`` is an unfinished slide store started with the earlier ``int`` stride and
    ``--overwrite`` replaces it: finishing it with ``ceil`` would mix two tilings.

    Raises:
        ConfigMismatchError: the two rules place this store's tiles differently (its finished entries
            would disagree with the rest); ``--overwrite`` rebuilds it.
    """
    dense = existing.dense
    if existing.status == "complete" or dense is None or dense.inference != "slide" or dense.tile is None:
        return False
    if existing.build.get("tile_stride") == TILE_STRIDE:
        return False
    if all(int(t * (1 - dense.overlap)) == math.ceil(t * (1 - dense.overlap)) for t in dense.tile):
        return False  # both rules give the same stride: nothing would differ
    if config.overwrite:
        return True
    raise ConfigMismatchError(
        f"{config.out} is an unfinished slide-inference cache started by an earlier skd, whose tiles stepped by "
        f"int(tile x (1 - overlap)) where this one uses the official ceil(...); finishing it would mix two "
        f"tilings: pass --overwrite to rebuild it, or choose another --out"
    )


def _other_precision(existing: CacheSchema, precision: str, config: BuildConfig) -> bool:
    """True when ``existing`` was built at another teacher precision and ``--overwrite`` replaces it.

    Precision changes the stored values, so a store is resumed (or found complete) only at the
    precision it records; stores from before the choice existed record none and are taken as they are.

    Raises:
        ConfigMismatchError: another precision, without ``--overwrite``.
    """
    recorded = existing.build.get("precision")
    if recorded is None or recorded == precision:
        return False
    if config.overwrite:
        return True
    raise ConfigMismatchError(
        f"{config.out} already holds a cache built with --precision {recorded} (now {precision}); re-run with "
        f"--precision {recorded} to resume it, pass --overwrite to replace it, or choose another --out"
    )


#: Entries (the first of the fidelity sample) the teacher's precision is measured on: each costs two
#: teacher forwards.
PRECISION_SAMPLES = 4


def measure_precision(plan: BuildPlan) -> dict:
    """The build precision's error against an fp32 forward of the same teacher on the same crops.

    Measured on the first ``min(4, fidelity_samples)`` entries of the codec's fidelity sample, with
    the codec fidelity's columns (KL at T=1 and T=4, argmax agreement, pair-wise cosine error of the
    stored nodes), plus the largest logit difference and, under ``stored_vs_fp32``, the stored
    (precision + codec) targets against the fp32 teacher. fp32 itself is exact and not run.

    Raises:
        NonFiniteTeacherError: either forward is not finite.
    """
    if plan.precision == "fp32":
        return {"reference": "fp32", "exact": True}
    t0 = time.perf_counter()
    cfg, schema = plan.config, plan.schema
    total, k = schema.num_entries, schema.entries_per_image
    every = max(1, total // max(1, cfg.fidelity_samples))  # the codec fidelity's sample (build_shards)
    entries = list(range(0, total, every))[: min(PRECISION_SAMPLES, cfg.fidelity_samples)]
    source = _ImageSource(plan.dataset, plan.records, plan.views, k, list(range(len(plan.ids))))
    codec = LogitCodec.from_params(schema.logits.codec, schema.logits.params)
    rows, stored, max_diff = [], [], 0.0
    for e in entries:
        img = e // k
        crop = source[img][2][e % k : e % k + 1]
        ref = _teacher_outputs(plan, crop, img, "fp32")
        got = _teacher_outputs(plan, crop, img)
        for outs in (ref, got):
            _check_finite(plan, [img], 1, logits=outs[0], features=outs[1])
        h, w = (int(x) for x in plan.grids[e])
        z_ref, z_got = (o[0][0, :, :h, :w].cpu().numpy() for o in (ref, got))
        rows.append(entry_fidelity(z_ref, z_got, *_precision_nodes(schema, ref[1], got[1], (h, w))))
        stored.append(entry_fidelity(z_ref, codec.decode(codec.encode(z_got)[0])))
        max_diff = max(max_diff, float(np.abs(z_ref - z_got).max()))
    out = {"reference": "fp32", "exact": False, **summarize(np.stack(rows) if rows else _no_rows())}
    if rows:
        keep = ("kl_t1_mean", "kl_t1_max", "argmax_agreement")
        out["max_abs_logit_diff"] = max_diff
        out["stored_vs_fp32"] = {key: v for key, v in summarize(np.stack(stored)).items() if key in keep}
    out["seconds"] = round(time.perf_counter() - t0, 3)
    logger.info("teacher precision %s vs fp32: %s", plan.precision, out)
    return out


def _no_rows() -> np.ndarray:
    return np.empty((0, len(FIDELITY_COLUMNS)), dtype=np.float32)


def _precision_nodes(schema: CacheSchema, ref: torch.Tensor, got: torch.Tensor, grid: tuple[int, int]):
    """The pair-wise loss's nodes of two feature maps, as the codec fidelity composes them (or None, None)."""
    layout = schema.features
    if layout is None:
        return None, None
    kernel = official_kernel(*grid)
    cells = (pool_cells(f, layout.block, layout.pool)[0].cpu().numpy() for f in (ref, got))
    return tuple(compose_nodes(c, layout.block, grid, kernel, layout.pool) for c in cells)


def shard_images(schema: CacheSchema, shards: Sequence[int]) -> list[int]:
    """The images whose entries make up ``shards``."""
    k = schema.entries_per_image
    return [i for s in shards for i in range(schema.shard_range(s)[0] // k, schema.shard_range(s)[1] // k)]


def build_shards(
    plan: BuildPlan,
    writer: CacheWriter,
    shards: Sequence[int],
    progress: Callable[[BuildProgress], None] | None = None,
    t0: float | None = None,
) -> tuple[int, int, float]:
    """Run the teacher on the images of ``shards`` and write those shards whole.

    Returns:
        (entries written, bytes of encoded values, seconds spent in the teacher).
    """
    schema = writer.schema
    images = shard_images(schema, shards)
    if not images:
        return 0, 0, 0.0
    total = schema.num_entries
    already = total - len(images) * schema.entries_per_image
    logit_codec = LogitCodec.from_params(schema.logits.codec, schema.logits.params)
    sample_every = max(1, total // max(1, plan.config.fidelity_samples))
    sink = _ShardWriter(writer, schema, logit_codec, writer.feature_codec(), sample_every)
    start = time.perf_counter() if t0 is None else t0
    teacher_seconds = _run_pipeline(plan, schema, images, sink, already, total, start, progress)
    return sink.entries_written, sink.bytes_written, teacher_seconds


def build_info(plan: BuildPlan, seconds: float, teacher_seconds: float, **extra) -> dict:
    info = {
        "device": str(plan.device),
        "precision": plan.precision,
        "precision_error": plan.precision_error,
        "batch_size": plan.config.batch_size,
        "seconds": round(seconds, 3),
        "teacher_seconds": round(teacher_seconds, 3),
        **extra,
    }
    if plan.skipped:
        info["skipped_images"] = len(plan.skipped)
    return info


def build_cache(config: BuildConfig, progress: Callable[[BuildProgress], None] | None = None) -> BuildResult:
    """Run the teacher over the dataset and write (or resume) the cache at ``config.out``."""
    t0 = time.perf_counter()
    plan, writer, resumed = prepare_build(config)
    if writer.schema.status == "complete":
        return already_complete(plan, writer, time.perf_counter() - t0)
    written, nbytes, teacher_seconds = build_shards(plan, writer, writer.pending_shards(), progress, t0)
    final = writer.finalize(build_info(plan, time.perf_counter() - t0, teacher_seconds))
    # the result reports what this store records (a resumed one: its check, not a fresh measurement)
    return BuildResult(
        url=config.out,
        schema=final,
        resumed=resumed,
        entries_written=written,
        seconds=time.perf_counter() - t0,
        teacher_seconds=teacher_seconds,
        bytes_encoded=nbytes,
        skipped_images=plan.skipped,
        recognised=plan.recognised,
        teacher_check=final.build.get("teacher_check"),
    )


def already_complete(plan: BuildPlan, writer: CacheWriter, seconds: float) -> BuildResult:
    """The result of a build whose destination is already a complete cache of its configuration.

    Nothing is run or written: re-finalising would rewrite the provenance (and so the root
    document that copies and read-through caches are keyed on).
    """
    logger.info("%s is already a complete cache of this configuration; nothing to do", writer.url)
    return BuildResult(
        url=plan.config.out,
        schema=writer.schema,
        resumed=True,
        entries_written=0,
        seconds=seconds,
        teacher_seconds=0.0,
        bytes_encoded=0,
        skipped_images=plan.skipped,
        already_complete=True,
        recognised=plan.recognised,
        teacher_check=writer.schema.build.get("teacher_check"),
    )


def _run_pipeline(
    plan: BuildPlan,
    schema: CacheSchema,
    images: list[int],
    sink: _ShardWriter,
    already: int,
    total: int,
    t0: float,
    progress: Callable[[BuildProgress], None] | None,
) -> float:
    """Read (loader workers), run the teacher (here) and encode/write (writer threads) ``images``.

    Returns:
        seconds spent in the teacher.
    """
    cfg = plan.config
    k = schema.entries_per_image
    layout = schema.features
    source = _ImageSource(plan.dataset, plan.records, plan.views, k, images)
    images_per_batch = max(1, cfg.batch_size // k) if cfg.mode == "views" else 1
    loader = DataLoader(
        source,
        batch_size=images_per_batch,
        shuffle=False,
        num_workers=cfg.loader_workers,
        collate_fn=_collate,
        pin_memory=plan.device.type == "cuda",
        multiprocessing_context="forkserver" if cfg.loader_workers > 0 else None,
        persistent_workers=False,
        prefetch_factor=4 if cfg.loader_workers > 0 else None,
    )
    teacher_seconds = 0.0
    done = 0
    with _writer_threads(sink, cfg.writer_threads, cfg.queue_size) as jobs:
        for batch in start_workers(loader):
            if isinstance(batch, _WorkerFailure):
                raise batch.cls(batch.message)
            if sink.error is not None:
                break
            crops = torch.cat([c for _, _, c in batch])
            tt = time.perf_counter()
            logits, feature = _teacher_outputs(plan, crops, batch[0][0])
            _check_finite(plan, [img for img, _, _ in batch], k, logits=logits, features=feature)
            cells = pool_cells(feature, layout.block, layout.pool) if layout is not None else None
            logits_np = logits.cpu().numpy()
            cells_np = None if cells is None else cells.cpu().numpy()
            teacher_seconds += time.perf_counter() - tt
            for j, (img, sha, _) in enumerate(batch):
                sl = slice(j * k, (j + 1) * k)
                entries = list(range(img * k, (img + 1) * k))
                grids = [tuple(plan.grids[e]) for e in entries]
                z = _pad_to(logits_np[sl], schema.logits.grid)
                f = None if cells_np is None else _pad_to(cells_np[sl], layout.cells)
                jobs.put((img, sha, entries, z, f, grids))
            done += len(batch) * k
            if progress is not None:
                progress(
                    BuildProgress(already + done, total, sink.bytes_written, time.perf_counter() - t0, stage="teacher")
                )
    if sink.error is not None:
        raise sink.error
    if progress is not None:
        progress(BuildProgress(total, total, sink.bytes_written, time.perf_counter() - t0, stage="written"))
    return teacher_seconds


@contextlib.contextmanager
def _writer_threads(sink: _ShardWriter, count: int, queue_size: int) -> Iterator[queue.Queue]:
    """``count`` threads handing the queued jobs to ``sink.add``, joined on exit.

    The first error is kept in ``sink.error`` (re-raised by the main thread) and the jobs after it
    are dropped.
    """
    jobs: queue.Queue = queue.Queue(maxsize=queue_size)

    def work() -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            if sink.error is not None:
                continue
            try:
                sink.add(*job)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                sink.error = exc

    threads = [threading.Thread(target=work, daemon=True, name=f"skd-writer-{i}") for i in range(count)]
    for t in threads:
        t.start()
    try:
        yield jobs
    finally:
        for _ in threads:
            jobs.put(None)
        for t in threads:
            t.join()


def _pad_to(x: np.ndarray, hw: Sequence[int]) -> np.ndarray:
    """Zero-pad (N, C, h, w) maps to the store's canvas (entries/grid records the valid part)."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(hw):
        return x
    out = np.zeros((*x.shape[:-2], hw[0], hw[1]), dtype=x.dtype)
    out[..., :h, :w] = x
    return out
