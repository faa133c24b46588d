"""Streaming samples: joint augmentation stays aligned, views replay equals the online teacher."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from cache_tools.datasets import open_dataset
from cache_tools.errors import ConfigError, CorruptEntryError, SchemaMismatchError
from cache_tools.schema import CacheSchema, Compressor, DatasetStamp, DenseParams, TargetLayout, TeacherStamp, View
from cache_tools.store import prepare_cache
from cache_tools.testing import write_entries
from pipeline.build import BuildConfig, build_cache
from pipeline.models.base import grid_size
from pipeline.teachers import create_teacher
from pipeline.views import OFFICIAL_SCALES
from student.data import DrawSampler, PairSpec, SegTrainData, collate_samples, raise_worker_error
from student.losses import PairWiseLoss

BLOCK = 16  # label stripes: class = (y // 16 + 3 * (x // 16)) % 19


def _coordinate_dataset(root, n=3, size=(96, 160)):
    """A folder-layout dataset whose labels encode pixel coordinates."""
    h, w = size
    (root / "images" / "train").mkdir(parents=True)
    (root / "masks" / "train").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(f"c{i}" for i in range(19)))
    yy, xx = np.mgrid[0:h, 0:w]
    label = ((yy // BLOCK + 3 * (xx // BLOCK)) % 19).astype(np.uint8)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / "train" / f"im{i}.png")
        Image.fromarray(label).save(root / "masks" / "train" / f"im{i}.png")
    return open_dataset(root, splits="train")


def _coordinate_cache(url, ds, flip: bool):
    """A dense cache whose 'teacher logits' are the pixel coordinates of each grid node (fp32)."""
    h, w = np.array(Image.open(ds.records[0].image_path)).shape[:2]
    gh, gw = grid_size(h), grid_size(w)
    per = 2 if flip else 1
    schema = CacheSchema(
        mode="dense",
        teacher=TeacherStamp(
            name="coords",
            architecture="coordinates",
            num_classes=19,
            feature_channels=2,
            weights_sha256=None,
            random_weights=True,
            normalization={"order": "RGB", "mean": [0, 0, 0], "std": [1, 1, 1]},
        ),
        dataset=DatasetStamp(
            name=ds.name, splits=("train",), num_images=len(ds), ids_sha256=ds.ids_digest(), class_names=ds.class_names
        ),
        num_entries=len(ds) * per,
        entries_per_image=per,
        shard_entries=per,
        id_bytes=32,
        logits=TargetLayout(codec="fp32", channels=19, grid=(gh, gw)),
        features=TargetLayout(
            codec="fp32", channels=2, grid=(gh, gw), pool="max", block=(1, 1), compressor=Compressor()
        ),
        dense=DenseParams(flip=flip),
    )
    ys = np.arange(gh) * (h - 1) / (gh - 1)
    xs = np.arange(gw) * (w - 1) / (gw - 1)
    maps = {}
    views = []
    for i in range(len(ds)):
        for f in range(per):
            m = np.zeros((19, gh, gw), np.float32)
            m[0] = ys[:, None]
            # a mirrored-image entry is stored in the mirrored frame
            m[1] = (w - 1 - xs)[None, :] if f else xs[None, :]
            maps[i * per + f] = (m, m[:2].copy())
            views.append(View.identity(i, (h, w), flip=bool(f)))
    writer, _ = prepare_cache(
        url,
        schema,
        image_ids=ds.ids,
        image_sizes=np.array([[h, w]] * len(ds)),
        views=views,
        grids=np.array([[gh, gw]] * len(views)),
    )
    sha = [hashlib.sha256(ds.read_image_bytes(i)).digest() for i in range(len(ds))]
    write_entries(writer, maps, sha)
    writer.finalize()


@pytest.mark.parametrize("flip_entries", [False, True])
def test_dense_replay_keeps_teacher_maps_aligned_with_labels(tmp_path, flip_entries):
    ds = _coordinate_dataset(tmp_path / "data")
    url = str(tmp_path / "coords.zarr")
    _coordinate_cache(url, ds, flip_entries)
    data = SegTrainData(str(tmp_path / "data"), crop=(64, 64), cache=url, pair=PairSpec(), seed=3)
    assert data.mode == "dense" and data.teacher_grid == (9, 9)
    agree, total, flipped, scales = 0, 0, 0, set()
    for draw in range(40):
        s = data[draw]
        gh, gw = s.teacher_grid
        y, x = s.teacher_logits[0].numpy(), s.teacher_logits[1].numpy()
        predicted = ((np.floor(y + 0.5) // BLOCK + 3 * (np.floor(x + 0.5) // BLOCK)) % 19).astype(int)
        # the label under each grid node of the crop (node j sits at pixel j (L-1)/(n-1))
        py = np.round(np.arange(gh) * 63 / (gh - 1)).astype(int)
        px = np.round(np.arange(gw) * 63 / (gw - 1)).astype(int)
        label = s.label.numpy()[py][:, px]
        valid = label != 255
        agree += int((predicted[valid] == label[valid]).sum())
        total += int(valid.sum())
        # every disagreement sits within 2 source pixels of a stripe edge (nearest-label vs bilinear
        # sampling and node rounding differ by at most that); anything else is misalignment
        edge = np.minimum(np.abs((y + BLOCK / 2) % BLOCK - BLOCK / 2), np.abs((x + BLOCK / 2) % BLOCK - BLOCK / 2))
        assert (edge[valid & (predicted != label)] < 2.0).all()
        rng = np.random.default_rng([3, draw])
        scales.add(OFFICIAL_SCALES[int(rng.integers(len(OFFICIAL_SCALES)))])
        flipped += int(s.teacher_logits[1, 0, 0] > s.teacher_logits[1, 0, -1])
        # pair-wise nodes: the max of the x-coordinate channel over each node window
        assert s.teacher_nodes.shape == (2, 3, 3)
    assert total > 1000 and agree / total > 0.93, agree / total
    assert 5 < flipped < 35 and len(scales) > 3  # both flips and many scales were exercised


def test_dense_replay_detects_misalignment(tmp_path):
    """Control: the same check fails when the teacher maps are mirrored the wrong way."""
    ds = _coordinate_dataset(tmp_path / "data")
    url = str(tmp_path / "coords.zarr")
    _coordinate_cache(url, ds, False)
    data = SegTrainData(str(tmp_path / "data"), crop=(64, 64), cache=url, seed=3)
    agree = total = 0
    for draw in range(20):
        s = data[draw]
        y, x = s.teacher_logits[0].numpy(), s.teacher_logits[1].numpy()[:, ::-1]  # wrong mirror
        predicted = ((np.floor(y + 0.5) // BLOCK + 3 * (np.floor(x + 0.5) // BLOCK)) % 19).astype(int)
        idx = np.round(np.arange(9) * 63 / 8).astype(int)
        label = s.label.numpy()[idx][:, idx]
        valid = label != 255
        agree += int((predicted[valid] == label[valid]).sum())
        total += int(valid.sum())
    assert agree / total < 0.5


def test_views_replay_equals_online_teacher(sample_root, tmp_path):
    url = str(tmp_path / "v.zarr")
    build_cache(
        BuildConfig(
            teacher="psp_tiny",
            random_weights=True,
            data=str(sample_root),
            out=url,
            mode="views",
            views=2,
            crop=(48, 64),
            logits_codec="fp32",
            features_codec="fp32",
            loader_workers=0,
            batch_size=1,
        )
    )
    teacher = create_teacher("psp_tiny", num_classes=19, random_weights=True, seed=0)
    pair = PairWiseLoss.official()
    data = SegTrainData(str(sample_root), cache=url, pair=PairSpec(), seed=0)
    assert data.mode == "views" and len(data) == 12 and data.crop == (48, 64)
    for draw in range(len(data)):
        s = data[draw]
        with torch.inference_mode():
            out = teacher.model(s.image[None])
        np.testing.assert_allclose(s.teacher_logits.numpy(), out.logits[0].numpy(), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(s.teacher_nodes.numpy(), pair.nodes(out.feature)[0].numpy(), rtol=1e-5, atol=1e-4)
        assert s.teacher_grid == tuple(out.logits.shape[-2:])


def test_cache_and_dataset_must_match(sample_root, tmp_path):
    url = str(tmp_path / "d.zarr")
    build_cache(BuildConfig(teacher="psp_tiny", random_weights=True, data=str(sample_root), out=url, loader_workers=0))
    with pytest.raises(SchemaMismatchError, match="are not in the cache"):
        SegTrainData(str(sample_root), splits=("val",), cache=url)
    other = tmp_path / "other"
    _coordinate_dataset(other)
    with pytest.raises(SchemaMismatchError, match="classes"):
        SegTrainData(str(other), cache=url)
    no_features = str(tmp_path / "nf.zarr")
    build_cache(
        BuildConfig(
            teacher="psp_tiny",
            random_weights=True,
            data=str(sample_root),
            out=no_features,
            features=False,
            loader_workers=0,
        )
    )
    with pytest.raises(ConfigError, match="has none"):
        SegTrainData(str(sample_root), cache=no_features, pair=PairSpec())
    with pytest.raises(ConfigError, match="max-pooled"):
        SegTrainData(str(sample_root), cache=url, pair=PairSpec(pool="avg"))


def test_changed_image_is_caught_by_its_fingerprint(sample_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(sample_root, root)
    url = str(tmp_path / "d.zarr")
    build_cache(BuildConfig(teacher="psp_tiny", random_weights=True, data=str(root), out=url, loader_workers=0))
    first = sorted((root / "leftImg8bit" / "train").rglob("*.png"))[0]
    img = np.array(Image.open(first))
    img[0, 0] = 255 - img[0, 0]
    Image.fromarray(img).save(first)
    data = SegTrainData(str(root), cache=url, crop=(32, 32))
    index = open_dataset(root).index_of(str(first.relative_to(root / "leftImg8bit")).replace("_leftImg8bit.png", ""))
    failure = data[index]
    with pytest.raises(SchemaMismatchError, match="differs from the one the cache was built from"):
        raise_worker_error(collate_samples([failure]))


def test_a_missing_shard_object_stops_training_instead_of_teaching_fill_values(tmp_path):
    """The worker compares every entry it reads with its checksum; the failure reaches the main process."""
    import zarr

    ds = _coordinate_dataset(tmp_path / "data")
    url = tmp_path / "coords.zarr"
    _coordinate_cache(str(url), ds, False)
    for part in ("logits/data", "features/data"):
        arr = zarr.open_array(str(url / part), mode="r")
        (url / part / arr.metadata.encode_chunk_key((1,) + (0,) * (arr.ndim - 1))).unlink()  # image 1's shard
    data = SegTrainData(str(tmp_path / "data"), crop=(64, 64), cache=str(url), pair=PairSpec(), seed=0)
    batch = raise_worker_error(collate_samples([data[0], data[2]]))
    assert batch.teacher_logits.abs().max() > 1  # the other images train as before
    with pytest.raises(CorruptEntryError, match=rf"entry 1 \({ds.ids[1]}\).*is missing.*skdcache verify"):
        raise_worker_error(collate_samples([data[0], data[1]]))


def test_draw_sampler_is_rank_disjoint_and_resumable():
    a = DrawSampler(10, seed=1, rank=0, world=2)
    b = DrawSampler(10, seed=1, rank=1, world=2)
    it_a, it_b = iter(a), iter(b)
    first = [next(it_a) for _ in range(5)] + [next(it_b) for _ in range(5)]
    assert sorted(d % 10 for d in first) == list(range(10))  # one epoch split over two ranks
    full = iter(DrawSampler(10, seed=1))
    stream = [next(full) for _ in range(30)]
    resumed = iter(DrawSampler(10, seed=1, start=12))
    assert [next(resumed) for _ in range(18)] == stream[12:]
