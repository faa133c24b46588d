"""One class per codec in one table, codec tables in the store, and the one entry encoder."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cache_tools import open_cache
from cache_tools.codecs import (
    FEATURE_CODEC_CLASSES,
    LOGIT_CODEC_CLASSES,
    FeatureCodec,
    LogitCodec,
    fit_pca,
    parse_feature_codec,
)
from cache_tools.entries import encode_entry
from cache_tools.errors import SchemaError
from cache_tools.fidelity import compose_nodes, entry_fidelity, official_kernel, pool_cells
from cache_tools.schema import FEATURE_CODECS, LOGIT_CODECS, Arrays
from cache_tools.store import entry_checksum
from cache_tools.testing import make_synthetic_cache, synthetic_maps, synthetic_schema


def test_the_tables_are_the_format_lists_and_names_build_their_class():
    assert tuple(LOGIT_CODEC_CLASSES) == LOGIT_CODECS and tuple(FEATURE_CODEC_CLASSES) == FEATURE_CODECS
    z = synthetic_maps(np.random.default_rng(0), 5, 3, 6, 7)[0]
    for name, cls in LOGIT_CODEC_CLASSES.items():
        codec = LogitCodec(name)
        assert type(codec) is cls and codec.name == name
        again = LogitCodec.from_params(name, codec.params)  # what a store records reads back the same
        assert type(again) is cls and again.params == codec.params
        parts, _ = codec.encode(z)
        assert {p: (a.shape, str(a.dtype)) for p, a in parts.items()} == {
            p: (part.shape, part.dtype) for p, part in codec.parts(5, 6, 7).items()
        }
        assert codec.decode(parts).shape == z.shape and codec.error_bound()
    for name in ("fp32", "fp16", "int8"):
        assert type(FeatureCodec(name)) is FEATURE_CODEC_CLASSES[name] and FeatureCodec(name).tables(8) == {}
    with pytest.raises(SchemaError, match="unknown features codec 'jpeg'"):
        FeatureCodec("jpeg")
    with pytest.raises(SchemaError, match="unknown features codec"):
        parse_feature_codec("pca")


def test_each_codec_refuses_parameters_it_does_not_take():
    with pytest.raises(SchemaError, match="fp16 logits codec takes no clip"):
        LogitCodec("fp16", clip=10.0)
    with pytest.raises(SchemaError, match="gap clip must be positive"):
        LogitCodec("gap-u16", clip=-1.0)
    with pytest.raises(SchemaError, match="gap-u8 scale must be positive"):
        LogitCodec("gap-u8", scale=0.0)
    with pytest.raises(SchemaError, match="parameter\\(s\\) scale"):
        LogitCodec.from_params("gap-u16", {"clip": 64.0, "scale": 6.0})
    with pytest.raises(SchemaError, match="is the gap-u8 codec, not 'fp16'"):
        LOGIT_CODEC_CLASSES["gap-u8"]("fp16")


def test_the_pca_codec_describes_its_tables_and_checks_them():
    basis, mean, _ = fit_pca(np.random.default_rng(1).normal(size=(50, 6)), 2)
    codec = FeatureCodec("pca", basis, mean)
    assert {n: (p.shape, p.dtype) for n, p in codec.tables(6).items()} == {
        "pca_basis": ((2, 6), "float32"),
        "pca_mean": ((6,), "float32"),
    }
    assert f"{Arrays.FEATURES}/pca_basis" == Arrays.PCA_BASIS and f"{Arrays.FEATURES}/pca_mean" == Arrays.PCA_MEAN
    assert codec.parts(6, 3, 4)["data"].shape == (2, 3, 4)
    with pytest.raises(SchemaError, match="needs its basis and mean"):
        FeatureCodec("pca")
    with pytest.raises(SchemaError, match="do not fit"):
        FeatureCodec("pca", basis, mean[:5])
    described = FeatureCodec("pca", k=2)  # a store's layout, before its basis is read
    assert described.tables(6) == codec.tables(6)
    with pytest.raises(SchemaError, match="needs its basis and mean"):
        described.encode(np.zeros((6, 3, 4), np.float32))
    loaded = described.with_tables(codec.table_values())
    np.testing.assert_array_equal(loaded.basis, codec.basis)


def test_a_pca_store_holds_the_tables_its_codec_describes(tmp_path):
    schema = synthetic_schema(num_images=4, feature_channels=8, features_codec="pca")
    schema = replace(schema, features=replace(schema.features, stored_channels=3))
    writer, exact = make_synthetic_cache(str(tmp_path / "p.zarr"), schema)
    r = open_cache(str(tmp_path / "p.zarr"))
    assert r.array(Arrays.PCA_BASIS).shape == (3, 8) and r.array(Arrays.PCA_MEAN).shape == (8,)
    np.testing.assert_array_equal(r.feature_codec.basis, r.array(Arrays.PCA_BASIS)[...])
    np.testing.assert_array_equal(writer.feature_codec().mean, r.array(Arrays.PCA_MEAN)[...])
    for e in range(r.num_entries):
        cells = pool_cells(exact[e][1], schema.features.block, "max")
        fc = r.feature_codec
        np.testing.assert_array_equal(r.read_entry(e).feature, fc.decode(fc.encode(cells)[0]))


def test_a_store_with_codec_tables_needs_the_codec(tmp_path):
    from cache_tools.schema import View
    from cache_tools.store import prepare_cache

    schema = synthetic_schema(num_images=2, shard_images=2, features_codec="pca")
    h, w = schema.logits.grid
    with pytest.raises(ValueError, match="features/pca_basis, features/pca_mean needs the features codec"):
        prepare_cache(
            str(tmp_path / "x.zarr"),
            schema,
            image_ids=["a", "b"],
            image_sizes=np.array([[64, 128]] * 2),
            views=[View.identity(i, (64, 128)) for i in range(2)],
            grids=np.array([[h, w]] * 2),
        )
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize("features", [None, "int8"])
def test_encode_entry_is_encode_checksum_fidelity(features):
    schema = synthetic_schema(grid=(9, 17), block=(4, 4), features_codec=features)
    logits, feat = synthetic_maps(np.random.default_rng(3), 5, 8, 9, 17)
    logits[0, 0, 0] = 1e6  # over the gap clip and over fp16: counted, not wrapped
    lc, layout = LogitCodec("gap-u8"), schema.features
    fc = None if layout is None else FeatureCodec(layout.codec)
    cells = None if layout is None else pool_cells(feat, layout.block, layout.pool)
    grid = (7, 13)  # the valid part of the canvas
    got = encode_entry(logits, cells, grid, logit_codec=lc, feature_codec=fc, features=layout)
    lp, clipped = lc.encode(logits)
    assert got.clipped == clipped > 0 and list(got.parts) == ["logits"] + ([] if fc is None else ["features"])
    np.testing.assert_array_equal(got.parts["logits"]["dq"], lp["dq"])
    assert got.checksum == entry_checksum(got.parts)
    nodes = (None, None)
    if fc is not None:
        valid = cells[:, :2, :4]  # ceil(7/4), ceil(13/4)
        dec = fc.decode(got.parts["features"])[:, :2, :4]
        kernel = official_kernel(*grid)
        nodes = tuple(compose_nodes(c, layout.block, grid, kernel, layout.pool) for c in (valid, dec))
    want = entry_fidelity(logits[:, :7, :13], lc.decode(lp)[:, :7, :13], *nodes)
    np.testing.assert_array_equal(got.fidelity, want)
    assert np.isnan(got.fidelity[5]) == (fc is None)
    skipped = encode_entry(logits, cells, grid, logit_codec=lc, feature_codec=fc, features=layout, measure=False)
    assert np.isnan(skipped.fidelity).all() and skipped.checksum == got.checksum
