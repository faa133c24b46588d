"""Helpers for tests (ours and users'): synthetic caches written through the real writer, no torch.

``make_synthetic_cache`` writes a store with smooth, teacher-like logits and features so that
tools that only need *a* cache (info, verify, copy, subset, merge, diff) can be tested without
running a model.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .codecs import FeatureCodec, LogitCodec, fit_pca
from .entries import encode_entry, write_encoded_shard
from .fidelity import pool_cells
from .schema import (
    CacheSchema,
    Compressor,
    DatasetStamp,
    DenseParams,
    TargetLayout,
    TeacherStamp,
    View,
    ViewsParams,
    ids_digest,
)
from .store import CacheWriter, prepare_cache

__all__ = ["synthetic_maps", "synthetic_schema", "make_synthetic_cache", "write_entries"]


def synthetic_maps(rng: np.random.Generator, k: int, c: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth logits (k, h, w) with a confident argmax field, and a (c, h, w) feature map."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    logits = np.empty((k, h, w), np.float32)
    for i in range(k):
        a, b, p = rng.normal(size=3)
        logits[i] = 6 * np.sin(3 * a * yy + 2 * b * xx + p) + rng.normal(scale=0.3, size=(h, w))
    feat = np.maximum(np.einsum("kc,khw->chw", rng.normal(size=(k, c)), logits) / k, -0.01).astype(np.float32)
    return logits, feat


def synthetic_schema(
    *,
    mode: str = "dense",
    num_images: int = 6,
    num_classes: int = 5,
    feature_channels: int = 8,
    grid: tuple[int, int] = (9, 17),
    per_image: int = 1,
    shard_images: int = 2,
    logits_codec: str = "gap-u8",
    features_codec: str | None = "fp16",
    block: tuple[int, int] = (4, 4),
    ids: list[str] | None = None,
    splits: tuple[str, ...] = ("train",),
) -> CacheSchema:
    ids = ids or [f"train/town/town_{i:06d}" for i in range(num_images)]
    codec = LogitCodec(logits_codec)
    features = None
    if features_codec is not None:
        features = TargetLayout(
            codec=features_codec, channels=feature_channels, grid=grid, pool="max", block=block, compressor=Compressor()
        )
    return CacheSchema(
        mode=mode,
        teacher=TeacherStamp(
            name="synthetic",
            architecture="synthetic maps",
            num_classes=num_classes,
            feature_channels=feature_channels,
            weights_sha256=None,
            random_weights=True,
            normalization={"order": "BGR", "mean": [104.0, 117.0, 123.0], "std": [1.0, 1.0, 1.0]},
            seed=0,
        ),
        dataset=DatasetStamp(
            name="synthetic",
            splits=splits,
            num_images=len(ids),
            ids_sha256=ids_digest(ids),
            class_names=tuple(f"class{i}" for i in range(num_classes)),
        ),
        num_entries=len(ids) * per_image,
        entries_per_image=per_image,
        shard_entries=shard_images * per_image,
        id_bytes=max(16, max(len(i) for i in ids)),
        logits=TargetLayout(codec=codec.name, channels=num_classes, grid=grid, params=codec.params),
        features=features,
        views=ViewsParams(per_image=per_image, seed=0, crop=(64, 64), scales=(1.0,)) if mode == "views" else None,
        dense=DenseParams(flip=per_image == 2) if mode == "dense" else None,
    )


def write_entries(
    writer: CacheWriter,
    maps: dict[int, tuple[np.ndarray, np.ndarray | None]],
    image_sha256: list[bytes],
    shards: list[int] | None = None,
) -> None:
    """Encode exact (logits, feature) maps per entry and write whole shards, as the build does."""
    schema = writer.schema
    k = schema.entries_per_image
    lc = LogitCodec.from_params(schema.logits.codec, schema.logits.params)
    fc = writer.feature_codec()
    layout = schema.features
    for s in range(schema.num_shards) if shards is None else shards:
        a, b = schema.shard_range(s)
        encoded = []
        for e in range(a, b):
            logits, feat = maps[e]
            cells = None if layout is None else pool_cells(feat, layout.block, layout.pool)
            encoded.append(
                encode_entry(logits, cells, logits.shape[-2:], logit_codec=lc, feature_codec=fc, features=layout)
            )
        sha = np.stack([np.frombuffer(image_sha256[i], np.uint8) for i in range(a // k, b // k)])
        write_encoded_shard(writer, s, encoded, sha)


def make_synthetic_cache(
    url: str,
    schema: CacheSchema | None = None,
    *,
    seed: int = 0,
    ids: list[str] | None = None,
    image_sha256: list[bytes] | None = None,
    storage_options: dict | None = None,
    shards: list[int] | None = None,
    finalize: bool = True,
    overwrite: bool = False,
) -> tuple[CacheWriter, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Write a cache of synthetic targets through the real writer.

    Args:
        shards: only these shards (to make partial stores); default all.
        image_sha256: per-image file digests to record (default: digests of the id strings).

    Returns:
        (writer, exact maps per entry) so tests can compare what they read with what was written.
    """
    schema = schema or synthetic_schema(ids=ids)
    ids = ids or [f"train/town/town_{i:06d}" for i in range(schema.num_images)]
    rng = np.random.default_rng(seed)
    k = schema.entries_per_image
    h, w = schema.logits.grid
    sizes = np.tile(np.array([[8 * (h - 1), 8 * (w - 1)]], np.int64), (schema.num_images, 1))
    if schema.mode == "views":
        ch, cw = schema.views.crop  # type: ignore[union-attr]
        views = [
            View(i, 1.0, tuple(sizes[i]), (0, 0, ch, cw), bool(j % 2))
            for i in range(schema.num_images)
            for j in range(k)
        ]
    else:
        views = [View.identity(i, tuple(sizes[i]), flip=bool(j)) for i in range(schema.num_images) for j in range(k)]
    grids = np.tile(np.array([[h, w]]), (schema.num_entries, 1))
    exact = {
        e: synthetic_maps(rng, schema.logits.channels, schema.teacher.feature_channels, h, w)
        for e in range(schema.num_entries)
    }
    writer, _ = prepare_cache(
        url,
        schema,
        image_ids=ids,
        image_sizes=sizes,
        views=views,
        grids=grids,
        feature_codec=lambda: _fitted_pca(schema, exact),
        storage_options=storage_options,
        overwrite=overwrite,
    )
    digests = image_sha256 or [hashlib.sha256(i.encode()).digest() for i in ids]
    write_entries(writer, exact, digests, shards)
    if finalize and shards is None:
        writer.finalize({"device": "cpu", "seconds": 0.0})
    return writer, exact


def _fitted_pca(schema: CacheSchema, exact: dict[int, tuple[np.ndarray, np.ndarray]]) -> FeatureCodec:
    """A ``pca`` schema's codec, fitted on the pooled cells of the synthetic maps (as the build fits it)."""
    f = schema.features
    assert f is not None and f.codec == "pca", "only a pca store keeps codec tables"
    cells = [pool_cells(feat, f.block, f.pool) for _, feat in exact.values()]
    basis, mean, _ = fit_pca(np.concatenate([c.reshape(c.shape[0], -1).T for c in cells]), f.depth)
    return FeatureCodec("pca", basis, mean)
