"""Codec round trips within their stated bounds (hypothesis), and fidelity helpers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cache_tools.codecs import FeatureCodec, LogitCodec, delta2d, fit_pca, parse_feature_codec, undelta2d
from cache_tools.errors import SchemaError
from cache_tools.fidelity import compose_nodes, cosine_matrix, kl_per_pixel, node_windows, pool_cells

finite = st.floats(-40, 40, allow_nan=False, width=32)
logit_maps = st.tuples(st.integers(2, 8), st.integers(1, 6), st.integers(1, 6)).flatmap(
    lambda s: arrays(np.float32, s, elements=finite)
)


@given(logit_maps)
def test_fp16_bound(z):
    codec = LogitCodec("fp16")
    parts, clipped = codec.encode(z)
    assert clipped == 0
    out = codec.decode(parts)
    assert out.shape == z.shape and out.dtype == np.float32
    assert np.all(np.abs(out - z) <= np.abs(z) * 2**-11 + 1e-7)


@given(logit_maps)
def test_int8_pixel_bound(z):
    codec = LogitCodec("int8-pixel")
    out = codec.decode(codec.encode(z)[0])
    step = (z.max(0) - z.min(0)) / 255.0
    assert np.all(np.abs(out - z) <= step / 2 + 1e-5 * (1 + np.abs(z)))


@given(logit_maps)
def test_int8_channel_bound(z):
    codec = LogitCodec("int8-channel")
    out = codec.decode(codec.encode(z)[0])
    step = (z.max((1, 2)) - z.min((1, 2))) / 255.0
    assert np.all(np.abs(out - z) <= step[:, None, None] / 2 + 1e-5 * (1 + np.abs(z)))


@given(logit_maps, st.sampled_from(["gap-u8", "gap-u16"]))
def test_gap_codecs_keep_argmax_and_bound(z, name):
    codec = LogitCodec(name, top_dtype="float32", predictor="none")
    parts, clipped = codec.encode(z)
    out = codec.decode(parts)
    # the argmax is exact by construction
    assert np.array_equal(out.argmax(0), z.argmax(0))
    gap = z.max(0, keepdims=True) - z
    assert clipped == int((gap > codec.clip).sum())
    q = parts["q"].astype(np.float64)
    levels = 255 if name == "gap-u8" else 65535
    # the quantiser's guarantee: the code is the companded gap rounded to the nearest level
    # (except the forced code 1 for non-argmax classes whose gap rounds to 0)
    g = np.minimum(gap, codec.clip)
    u = codec._compand(g) if name == "gap-u8" else g / codec.clip
    is_top = np.zeros_like(q, dtype=bool)
    np.put_along_axis(is_top, z.argmax(0)[None], True, axis=0)
    forced = (~is_top) & (np.rint(levels * u) == 0)
    ok = np.abs(q / levels - u) <= 0.5 / levels + 1e-6
    assert np.all(ok | forced)
    assert np.all(q[is_top] == 0)
    # decoding is the exact inverse of the companding at the stored level
    dec_gap = out.max(0, keepdims=True) - out
    expect = codec._expand(q / 255) if name == "gap-u8" else q / levels * codec.clip
    np.testing.assert_allclose(dec_gap, expect, rtol=1e-5, atol=1e-4)
    # a clipped class decodes to exactly the clip
    assert np.allclose(dec_gap[gap > codec.clip], codec.clip, atol=1e-3)


def test_gap_u8_error_is_smallest_near_the_top():
    codec = LogitCodec("gap-u8", top_dtype="float32")
    gaps = np.linspace(0.05, 40, 800, dtype=np.float32)
    z = np.zeros((2, 1, len(gaps)), np.float32)
    z[1, 0] = -gaps
    err = np.abs(codec.decode(codec.encode(z)[0])[1, 0] + gaps)
    assert err[gaps < 3].max() < 0.025 and err[gaps < 12].max() < 0.1
    assert err[gaps > 30].max() > err[gaps < 3].max()  # precision goes where the probability is


def test_gap_u8_doc_example():
    codec = LogitCodec("gap-u8")
    parts, _ = codec.encode(np.array([[[3.0]], [[1.0]], [[-2.0]]], np.float32))
    assert parts["dq"].ravel().tolist() == [0, 72, 144]  # one node: the difference is the code itself
    assert parts["dq"].dtype == np.uint8 and parts["top"].dtype == np.float16


@given(logit_maps, st.sampled_from(["gap-u8", "gap-u16"]))
def test_delta2d_predictor_is_lossless(z, name):
    with_delta, plain = LogitCodec(name), LogitCodec(name, predictor="none")
    assert with_delta.predictor == "delta2d" and with_delta.params["predictor"] == "delta2d"
    dp, _ = with_delta.encode(z)
    pp, _ = plain.encode(z)
    assert set(dp) == {"dq", "top"} and set(pp) == {"q", "top"} and dp["dq"].dtype == pp["q"].dtype
    # the documented rule, in plain numpy: cumulative sums over h then w in the codes' dtype
    q = np.cumsum(np.cumsum(dp["dq"], axis=-2, dtype=dp["dq"].dtype), axis=-1, dtype=dp["dq"].dtype)
    assert np.array_equal(q, pp["q"])
    assert np.array_equal(with_delta.decode(dp), plain.decode(pp))


def test_delta2d_wraps_and_batches():
    rng = np.random.default_rng(0)
    for dtype in (np.uint8, np.uint16):
        q = rng.integers(0, np.iinfo(dtype).max, (2, 3, 5, 7), endpoint=True).astype(dtype)
        d = delta2d(q)
        assert d.dtype == dtype and np.array_equal(undelta2d(d), q)
        assert np.array_equal(undelta2d(d[1]), q[1])  # leading axes are independent


def test_delta2d_compresses_smooth_codes():
    import numcodecs

    yy, xx = np.mgrid[0:65, 0:65].astype(np.float32)
    z = np.stack([np.sin(yy / (7 + c)) * 4 + np.cos(xx / (5 + c)) * 3 for c in range(19)])
    zstd = numcodecs.Zstd(3)
    size = {
        p: len(zstd.encode(LogitCodec("gap-u8", predictor=p).encode(z)[0]["dq" if p == "delta2d" else "q"]))
        for p in ("none", "delta2d")
    }
    assert size["delta2d"] < 0.8 * size["none"]


def test_old_gap_params_mean_plain_codes_and_unknown_params_are_refused():
    old = LogitCodec.from_params("gap-u8", {"clip": 48.0, "scale": 6.0, "top_dtype": "float16"})
    assert old.predictor == "none" and "q" in old.parts(3, 4, 5) and "predictor" not in old.params
    new = LogitCodec.from_params("gap-u8", LogitCodec("gap-u8").params)
    assert new.predictor == "delta2d" and "dq" in new.parts(3, 4, 5)
    with pytest.raises(SchemaError, match="predictor 'paeth'"):
        LogitCodec.from_params("gap-u8", {"predictor": "paeth"})
    with pytest.raises(SchemaError, match=r"parameter\(s\) entropy_coder .*upgrade skd"):
        LogitCodec.from_params("gap-u8", {"clip": 48.0, "entropy_coder": "ans"})
    with pytest.raises(SchemaError, match="not available for fp16"):
        LogitCodec("fp16", predictor="delta2d")


def test_gap_ties_keep_first_argmax():
    z = np.zeros((3, 1, 1), np.float32)
    codec = LogitCodec("gap-u8")
    out = codec.decode(codec.encode(z)[0])
    assert out.argmax(0).item() == 0


def test_fp16_overflow_is_clipped_and_counted():
    z = np.array([[[1e6]], [[0.0]]], np.float32)
    parts, clipped = LogitCodec("fp16").encode(z)
    assert clipped == 1 and np.isfinite(parts["data"].astype(np.float32)).all()


@given(st.integers(1, 40), st.integers(1, 40))
def test_node_windows_cover_the_axis(size, kernel):
    w = node_windows(size, kernel)
    assert w[0][0] == 0 and w[-1][1] == size
    assert all(a < b for a, b in w) and all(w[i][1] == w[i + 1][0] for i in range(len(w) - 1))


def test_official_node_windows():
    assert node_windows(65, 32) == [(0, 32), (32, 64), (64, 65)]
    assert len(node_windows(129, 64)) == 3 and len(node_windows(257, 128)) == 3


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_pooling_composes_on_aligned_grids(mode):
    rng = np.random.default_rng(0)
    f = rng.normal(size=(5, 65, 65)).astype(np.float32)
    direct = pool_cells(f, (32, 32), mode)
    cells = pool_cells(f, (4, 4), mode)  # 4 divides 32: every node window is a union of cells
    composed = compose_nodes(cells, (4, 4), (65, 65), (32, 32), mode)
    np.testing.assert_allclose(composed, direct, rtol=1e-5, atol=1e-6)


@given(arrays(np.float32, (6, 3, 4), elements=st.floats(-5, 5, width=32)))
def test_int8_feature_bound(f):
    codec = FeatureCodec("int8")
    out = codec.decode(codec.encode(f)[0])
    step = (f.max((1, 2)) - f.min((1, 2))) / 255.0
    assert np.all(np.abs(out - f) <= step[:, None, None] / 2 + 1e-5 * (1 + np.abs(f)))


def test_pca_is_exact_at_full_rank_and_commutes_with_average_pooling():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(8, 12, 12)).astype(np.float32)
    basis, mean, kept = fit_pca(f.reshape(8, -1).T, 8)
    assert kept == pytest.approx(1.0)
    codec = FeatureCodec("pca", basis=basis, mean=mean)
    np.testing.assert_allclose(codec.decode(codec.encode(f)[0]), f, atol=2e-2)
    # linear projection commutes with average pooling
    basis4, mean4, _ = fit_pca(f.reshape(8, -1).T, 4)
    c4 = FeatureCodec("pca", basis=basis4, mean=mean4)
    lhs = pool_cells(c4.decode(c4.encode(f)[0]), (4, 4), "avg")
    rhs = c4.decode(c4.encode(pool_cells(f, (4, 4), "avg"))[0])
    np.testing.assert_allclose(lhs, rhs, atol=1e-2)


def test_feature_codec_names():
    assert parse_feature_codec("pca64") == ("pca", 64)
    assert parse_feature_codec("fp16") == ("fp16", None)
    with pytest.raises(SchemaError, match="unknown features codec"):
        parse_feature_codec("jpeg")
    with pytest.raises(SchemaError, match="unknown logits codec"):
        LogitCodec("top5")


def test_kl_and_cosine_basics():
    z = np.random.default_rng(2).normal(size=(4, 3, 3)).astype(np.float32)
    assert kl_per_pixel(z, z).max() == pytest.approx(0.0, abs=1e-12)
    assert kl_per_pixel(z, z + 3.0).max() == pytest.approx(0.0, abs=1e-9)  # shift invariant
    c = cosine_matrix(np.abs(z))
    assert c.shape == (9, 9) and np.allclose(np.diag(c), 1.0, atol=1e-6)
