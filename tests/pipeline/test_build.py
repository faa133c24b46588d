"""skdcache build: stored targets equal the teacher's outputs within codec bounds, both modes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr

from cache_tools import open_cache
from cache_tools.codecs import LogitCodec
from cache_tools.datasets import open_dataset
from cache_tools.errors import ConfigError, ConfigMismatchError, DatasetError, ModelError
from cache_tools.fidelity import compose_nodes, official_kernel, pool_cells
from pipeline import build as build_module
from pipeline.build import BuildConfig, NonFiniteTeacherError, build_cache, build_shards, prepare_build
from pipeline.teachers import create_teacher
from pipeline.views import apply_view
from tests.catalogue import bad_teachers
from tests.catalogue.conftest import snapshot


def _config(sample_root, out, **kw) -> BuildConfig:
    base = dict(
        teacher="psp_tiny",
        random_weights=True,
        data=str(sample_root),
        out=str(out),
        loader_workers=0,
        writer_threads=2,
        shard_images=2,
    )
    base.update(kw)
    return BuildConfig(**base)


@pytest.fixture(scope="module")
def teacher():
    return create_teacher("psp_tiny", num_classes=19, random_weights=True, seed=0)


def _teacher_on(teacher, x: torch.Tensor):
    with torch.inference_mode():
        out = teacher.model(x[None].float())
    return out.logits[0].numpy(), out.feature[0]


def test_dense_build_equals_teacher_outputs(sample_root, tmp_path, teacher):
    result = build_cache(_config(sample_root, tmp_path / "d.zarr", dense_flip=True, logits_codec="fp16"))
    assert not result.resumed and result.entries_written == 12
    r = open_cache(str(tmp_path / "d.zarr"))
    s = r.schema
    assert s.mode == "dense" and s.entries_per_image == 2 and s.teacher.random_weights
    assert s.teacher.normalization["order"] == "BGR" and s.teacher.normalization["std"] == [1.0, 1.0, 1.0]
    ds = open_dataset(sample_root)
    assert r.image_ids == ds.ids
    for img in range(len(ds)):
        image, _, sha = ds.load(img)
        assert r.image_sha256()[img] == sha
        x = torch.from_numpy(image).permute(2, 0, 1)
        for flip in (0, 1):
            entry = r.read_entry(2 * img + flip, check=True)
            assert entry.view.flip == bool(flip)
            ref, feat = _teacher_on(teacher, x.flip(-1) if flip else x)
            np.testing.assert_allclose(entry.logits, ref, rtol=2**-10, atol=1e-3)  # fp16
            cells = pool_cells(feat[None], s.features.block, "max")[0].numpy()
            np.testing.assert_allclose(entry.feature, cells, rtol=2**-10, atol=1e-3)
    fid = s.fidelity
    assert fid["sampled_entries"] >= 1 and fid["argmax_agreement"] > 0.999 and fid["kl_t1_max"] < 1e-4


def test_views_build_replays_exactly(sample_root, tmp_path, teacher):
    build_cache(
        _config(sample_root, tmp_path / "v.zarr", mode="views", views=3, crop=(48, 64), view_seed=7, batch_size=5)
    )
    r = open_cache(str(tmp_path / "v.zarr"))
    s = r.schema
    assert s.mode == "views" and s.num_entries == 18 and s.views.crop == (48, 64) and s.views.seed == 7
    codec = LogitCodec.from_params(s.logits.codec, s.logits.params)
    ds = open_dataset(sample_root)
    scales = set()
    for e in range(r.num_entries):
        entry = r.read_entry(e, check=True)
        view = entry.view
        scales.add(view.scale)
        image, label, _ = ds.load(entry.image_index)
        crop, _ = apply_view(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(label), view)
        ref, feat = _teacher_on(teacher, crop)  # the teacher on the replayed crop, batch of one
        # within the gap-u8 bound (plus fp16 rounding of the top logit and batch-size float noise)
        gap = ref.max(0, keepdims=True) - ref
        u = codec._compand(np.minimum(gap, codec.clip))
        # one quantisation level around the true gap (the level width grows with the gap)
        bound = codec._expand(np.minimum(u + 1 / 255, 1)) - codec._expand(np.maximum(u - 1 / 255, 0))
        bound = bound + np.abs(ref.max(0)) * 2**-10 + 1e-3
        inside = gap <= codec.clip
        assert np.all(np.abs(entry.logits - ref)[inside] <= bound[inside])
        assert (entry.logits.argmax(0) == ref.argmax(0)).all()
        # the stored cells are the official 3x3 node maxima of the crop's feature
        kernel = official_kernel(*ref.shape[1:])
        nodes = compose_nodes(entry.feature, s.features.block, ref.shape[1:], kernel)
        direct = torch.nn.functional.max_pool2d(feat[None], kernel, kernel, ceil_mode=True)[0].numpy()
        np.testing.assert_allclose(nodes, direct, rtol=2**-10, atol=1e-3)
    assert len(scales) > 1  # views are really drawn from the official scale set


def test_codec_and_pca_options(sample_root, tmp_path):
    cfg = _config(
        sample_root,
        tmp_path / "p.zarr",
        logits_codec="int8-pixel",
        features_codec="pca8",
        features_block=(2, 2),
        pca_samples=3,
    )
    build_cache(cfg)
    r = open_cache(str(tmp_path / "p.zarr"))
    assert r.schema.features.codec == "pca" and r.schema.features.depth == 8
    assert r.array("features/pca_basis").shape == (8, r.schema.teacher.feature_channels)
    entry = r.read_entry(0, check=True)
    assert entry.feature.shape[0] == r.schema.teacher.feature_channels
    assert "pair_cos_err_max" in r.schema.fidelity


@pytest.mark.slow
def test_slide_inference_with_a_tile_covering_the_image_equals_whole(sample_root, tmp_path):
    build_cache(_config(sample_root, tmp_path / "w.zarr", logits_codec="fp32", features_codec="fp32"))
    build_cache(
        _config(
            sample_root,
            tmp_path / "s.zarr",
            logits_codec="fp32",
            features_codec="fp32",
            inference="slide",
            tile=(64, 128),
        )
    )
    a, b = open_cache(str(tmp_path / "w.zarr")), open_cache(str(tmp_path / "s.zarr"))
    np.testing.assert_allclose(a.read_entry(0).logits, b.read_entry(0).logits, atol=1e-4)
    # smaller tiles: same grid, close values (tiles see less context)
    build_cache(
        _config(sample_root, tmp_path / "t.zarr", logits_codec="fp32", inference="slide", tile=(48, 64), overlap=0.5)
    )
    c = open_cache(str(tmp_path / "t.zarr")).read_entry(0).logits
    assert c.shape == a.read_entry(0).logits.shape and np.isfinite(c).all()


def test_slide_teacher_places_tiles_as_the_student_evaluation_does(teacher, monkeypatch):
    # 64x128 image, 48x64 tiles, overlap 1/3: strides ceil(32) = 32 and ceil(42.7) = 43 (the official
    # rule; a floor of 42 would put the middle column of tiles at 42)
    from pipeline import inference

    seen = []
    real = inference.run_teacher

    def spy(model, x, device, precision="fp32"):
        seen.append(x)
        return real(model, x, device, precision)

    monkeypatch.setattr(inference, "run_teacher", spy)
    image = torch.rand(1, 3, 64, 128) * 255
    inference.slide_teacher(teacher.model, image, (9, 17), (48, 64), 1 / 3, torch.device("cpu"))
    assert inference.tile_starts(64, 48, 1 / 3) == [0, 16] and inference.tile_starts(128, 64, 1 / 3) == [0, 43, 64]
    origins = [(y, x) for y in (0, 16) for x in (0, 43, 64)]
    assert len(seen) == len(origins)
    for crop, (y, x) in zip(seen, origins, strict=True):
        assert torch.equal(crop, image[:, :, y : y + 48, x : x + 64])


def test_resume_and_configuration_rules(sample_root, tmp_path):
    out = tmp_path / "r.zarr"
    build_cache(_config(sample_root, out))
    before = zarr.open_group(str(out))["logits/dq"][...]
    again = build_cache(_config(sample_root, out))
    assert again.resumed and again.entries_written == 0
    with pytest.raises(ConfigMismatchError, match="different configuration"):
        build_cache(_config(sample_root, out, logits_codec="fp16"))
    np.testing.assert_array_equal(zarr.open_group(str(out))["logits/dq"][...], before)
    build_cache(_config(sample_root, out, logits_codec="fp16", overwrite=True))
    assert open_cache(str(out)).schema.logits.codec == "fp16"


def test_random_weights_are_reproducible(sample_root, tmp_path):
    build_cache(_config(sample_root, tmp_path / "a.zarr"))
    build_cache(_config(sample_root, tmp_path / "b.zarr"))
    a, b = zarr.open_group(str(tmp_path / "a.zarr")), zarr.open_group(str(tmp_path / "b.zarr"))
    for path in ("logits/dq", "logits/top", "features/data", "entries/checksum"):
        np.testing.assert_array_equal(a[path][...], b[path][...])


def test_build_to_an_fsspec_url(sample_root):
    url = "memory://skd-test/d.zarr"
    build_cache(_config(sample_root, url))
    r = open_cache(url)
    assert r.schema.status == "complete" and r.read_entry(3, check=True).logits.shape[0] == 19


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(random_weights=False), ModelError, "needs --weights PATH; random targets are useless"),
        (dict(teacher="nope"), ModelError, "unknown model 'nope'"),
        (dict(mode="sparse"), ConfigError, "--mode must be one of dense, views"),
        (dict(inference="slide"), ConfigError, "needs --tile"),
        (dict(logits_codec="fp16", logits_clip=10.0), ConfigError, "fp16 logits codec takes no clip"),
        (dict(splits=("tset",)), DatasetError, "split"),
    ],
)
def test_bad_input_is_refused_before_writing(sample_root, tmp_path, kw, error, match):
    out = tmp_path / "bad.zarr"
    with pytest.raises(error, match=match):
        build_cache(_config(sample_root, out, **kw))
    assert not out.exists()


def test_bad_images_and_labels(sample_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(sample_root, root)
    images = sorted((root / "leftImg8bit" / "train").rglob("*.png"))
    images[1].write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match="cannot read image"):
        build_cache(_config(root, tmp_path / "x.zarr"))
    assert not (tmp_path / "x.zarr").exists()
    result = build_cache(_config(root, tmp_path / "y.zarr", skip_unreadable=True))
    assert len(result.skipped_images) == 1 and result.schema.num_images == 5
    # a label with ids outside the Cityscapes table
    images[1].unlink()
    labels = sorted((root / "gtFine" / "train").rglob("*_labelIds.png"))
    from PIL import Image

    lab = np.array(Image.open(labels[0]))
    lab[0, :4] = 200
    Image.fromarray(lab).save(labels[0])
    shutil.copy(images[0], images[1])  # restore an image so only the label is wrong
    with pytest.raises(DatasetError, match="not in the Cityscapes label table"):
        build_cache(_config(root, tmp_path / "z.zarr"))


def test_a_rerun_on_a_complete_cache_changes_nothing(sample_root, tmp_path):
    out = tmp_path / "c.zarr"
    build_cache(_config(sample_root, out))
    before = snapshot(out)
    for overwrite in (False, True):  # the same configuration is never "replaced"
        again = build_cache(_config(sample_root, out, overwrite=overwrite))
        assert again.already_complete and again.resumed
        assert again.entries_written == 0 and again.teacher_seconds == 0 and again.bytes_encoded == 0
        assert again.schema == open_cache(str(out)).schema
        assert snapshot(out) == before  # provenance, root document, every chunk: byte for byte


def test_resuming_a_pca_build_keeps_its_basis_and_does_not_refit(sample_root, tmp_path, monkeypatch):
    kw = dict(features_codec="pca4", features_block=(2, 2), pca_samples=2)
    cfg = _config(sample_root, tmp_path / "p.zarr", **kw)
    plan, writer, resumed = prepare_build(cfg)
    assert not resumed
    build_shards(plan, writer, [0])  # then "killed": shards 1 and 2 are not done
    basis = writer.group["features/pca_basis"][...].copy()

    def refit(*args, **kwargs):
        raise AssertionError("a resumed pca build fitted its basis again")

    with monkeypatch.context() as m:
        m.setattr(build_module, "_fit_pca", refit)
        result = build_cache(cfg)
    assert result.resumed and result.entries_written == 4
    resumed_store = open_cache(str(tmp_path / "p.zarr"))
    np.testing.assert_array_equal(resumed_store.array("features/pca_basis")[...], basis)
    build_cache(_config(sample_root, tmp_path / "whole.zarr", **kw))
    whole = open_cache(str(tmp_path / "whole.zarr"))
    np.testing.assert_array_equal(whole.checksums(), resumed_store.checksums())


def _brightest_image(root) -> tuple[int, float]:
    """(index, threshold): the image with the highest mean pixel value, and a value only it exceeds."""
    ds = open_dataset(root)
    means = np.array([ds.load(i)[0].astype(np.float64).mean() for i in range(len(ds))])
    order = np.argsort(means)
    return int(order[-1]), float(means[order[-2]] + means[order[-1]]) / 2


@pytest.mark.parametrize("factory, what", [("nan_logits", "logits"), ("inf_features", "features")])
def test_non_finite_teacher_outputs_are_never_stored(sample_root, tmp_path, monkeypatch, factory, what):
    victim, threshold = _brightest_image(sample_root)
    monkeypatch.setattr(bad_teachers, "POISON_ABOVE", threshold)
    out = tmp_path / "n.zarr"
    cfg = _config(sample_root, out, teacher=f"tests.catalogue.bad_teachers:{factory}", shard_images=1)
    image_id = open_dataset(sample_root).ids[victim]
    with pytest.raises(NonFiniteTeacherError, match=f"teacher's {what} for image {image_id} hold NaN or infinite"):
        build_cache(cfg)
    r = open_cache(str(out), allow_incomplete=True)
    assert r.schema.status == "building"
    # the images before it are stored, it and the ones after are not
    assert r.done[:victim].all() and not r.done[victim:].any()


def test_non_finite_features_stop_a_pca_fit_before_the_store_exists(sample_root, tmp_path):
    out = tmp_path / "p.zarr"
    cfg = _config(
        sample_root, out, teacher="tests.catalogue.bad_teachers:nan_features", features_codec="pca4", pca_samples=2
    )
    with pytest.raises(NonFiniteTeacherError, match="try --no-amp"):
        build_cache(cfg)
    assert not out.exists()


def test_out_holding_the_dataset_is_refused_even_with_overwrite(sample_root, tmp_path):
    before = snapshot(sample_root)
    with pytest.raises(ConfigError, match="holds the dataset"):
        build_cache(_config(sample_root, sample_root.parent, overwrite=True))
    assert snapshot(sample_root) == before


def test_a_creation_cut_short_is_cleared_and_created_again(sample_root, tmp_path, monkeypatch):
    import cache_tools.store as store_module

    out = tmp_path / "c.zarr"

    def killed(*args, **kwargs):
        raise RuntimeError("killed while laying the store out")

    with monkeypatch.context() as m:
        m.setattr(store_module, "_encode_ids", killed)  # after every array exists, before the schema
        with pytest.raises(RuntimeError, match="killed"):
            build_cache(_config(sample_root, out))
    attrs = zarr.open_group(str(out), mode="r").attrs.asdict()
    assert store_module.CREATION_ATTR in attrs and store_module.ROOT_ATTR not in attrs
    result = build_cache(_config(sample_root, out))  # skd's own leftovers: no --overwrite needed
    assert not result.resumed and result.schema.status == "complete"
    assert store_module.CREATION_ATTR not in zarr.open_group(str(out), mode="r").attrs.asdict()


def _as_if_built_before_the_stride_was_recorded(store, status: str) -> None:
    group = zarr.open_group(str(store), mode="r+")
    doc = dict(group.attrs["skd_cache"])
    doc["build"] = {k: v for k, v in doc["build"].items() if k != "tile_stride"}
    doc["status"] = status
    group.attrs["skd_cache"] = doc


def test_an_unfinished_slide_cache_from_the_earlier_tile_stride_is_not_finished_with_the_new_one(sample_root, tmp_path):
    # tile 64 at overlap 1/3: the earlier int() stride was 42, the official ceil() is 43, so finishing
    # the store would mix two tilings; a complete old store is consistent and stays usable
    cfg = _config(sample_root, tmp_path / "s.zarr", inference="slide", tile=(48, 64))
    build_cache(cfg)
    assert open_cache(cfg.out).schema.build["tile_stride"] == "ceil"
    _as_if_built_before_the_stride_was_recorded(cfg.out, "complete")
    assert build_cache(cfg).already_complete
    _as_if_built_before_the_stride_was_recorded(cfg.out, "building")
    with pytest.raises(ConfigMismatchError, match=r"earlier skd.*--overwrite"):
        build_cache(cfg)
    result = build_cache(BuildConfig(**{**cfg.__dict__, "overwrite": True}))
    assert not result.resumed and open_cache(cfg.out).schema.build["tile_stride"] == "ceil"
