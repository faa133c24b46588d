"""docs/cache_format.md suffices for a third party: a reader written from the doc alone matches skd.

``DocReader`` below uses only numpy, zarr, hashlib and json, and follows the doc's formulas (section
names in its comments). It decodes every entry of stores written with each logit codec (both gap
predictors) and each feature codec, and recomputes the checksums; skd's own reader (imported
separately, never by ``DocReader``) must agree bit for bit (the PCA product to float32 rounding).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cache_v1"

# "Value codecs" tables: parts per codec
LOGIT_PARTS = {
    "fp32": {"data"},
    "fp16": {"data"},
    "int8-pixel": {"q", "lo", "step"},
    "int8-channel": {"q", "lo", "step"},
}
FEATURE_PARTS = {"fp32": {"data"}, "fp16": {"data"}, "int8": {"q", "lo", "step"}, "pca": {"data"}}
# gap-u16's clip default, "Logits"
GAP_CLIP_DEFAULT = {"gap-u8": 48.0, "gap-u16": 64.0}


class DocReader:
    """An skd cache read the way docs/cache_format.md describes it (no skd import)."""

    def __init__(self, path: Path):
        self.group = zarr.open_group(str(path), mode="r")
        self.meta = dict(self.group.attrs["skd_cache"])
        assert self.meta["format"] == "skd-cache" and self.meta["format_version"] == 1
        # "Layout": images/id rows are UTF-8, zero padded
        self.ids = [bytes(row).rstrip(b"\0").decode("utf-8") for row in self.group["images/id"][:]]
        digest = hashlib.sha256("\n".join(self.ids).encode("utf-8")).hexdigest()
        assert digest == self.meta["dataset"]["ids_sha256"]
        self.grid = self.group["entries/grid"][:]
        self.checksums = self.group["entries/checksum"][:]

    def part_names(self, target: str) -> set[str]:
        layout = self.meta[target]
        codec = layout["codec"]
        if target == "features":
            return FEATURE_PARTS[codec]
        if codec in LOGIT_PARTS:
            return LOGIT_PARTS[codec]
        # gap codecs: "dq" behind the delta2d predictor, "q" without one
        return {"dq" if layout["params"].get("predictor", "none") == "delta2d" else "q", "top"}

    def parts(self, e: int) -> dict[str, dict[str, np.ndarray]]:
        out = {}
        for target in ("logits", "features"):
            if self.meta.get(target) is None:
                continue
            names = self.part_names(target)
            stored = set(self.group[target].array_keys()) - {"pca_basis", "pca_mean"}
            assert stored == names, (target, stored, names)
            out[target] = {n: self.group[f"{target}/{n}"][e] for n in names}
        return out

    def checksum(self, parts: dict[str, dict[str, np.ndarray]]) -> int:
        """ "Checksums": blake2b with an 8-byte digest, header + little-endian C-order bytes per part."""
        h = hashlib.blake2b(digest_size=8)
        for target in sorted(parts):
            for name in sorted(parts[target]):
                arr = np.ascontiguousarray(parts[target][name])
                arr = arr.astype(arr.dtype.newbyteorder("<"))
                dims = ", ".join(str(d) for d in arr.shape) + ("," if arr.ndim == 1 else "")
                h.update(f"{target}/{name}:{arr.dtype.str}:({dims})".encode())
                h.update(arr.tobytes())
        return int.from_bytes(h.digest(), "little")

    def decode_logits(self, p: dict[str, np.ndarray]) -> np.ndarray:
        layout = self.meta["logits"]
        codec, params = layout["codec"], layout["params"]
        f32 = np.float32
        if codec in ("fp32", "fp16"):
            return p["data"].astype(f32)
        if codec == "int8-pixel":
            return p["lo"][None] + p["q"].astype(f32) * p["step"][None]
        if codec == "int8-channel":
            return p["lo"][:, None, None] + p["q"].astype(f32) * p["step"][:, None, None]
        clip = float(params.get("clip", GAP_CLIP_DEFAULT[codec]))
        if "dq" in p:  # "The 2-D difference predictor": cumulative sums in the codes' own dtype
            dq = p["dq"]
            q = np.cumsum(np.cumsum(dq, axis=1, dtype=dq.dtype), axis=2, dtype=dq.dtype)
        else:
            q = p["q"]
        q = q.astype(f32)
        if codec == "gap-u8":
            s = float(params.get("scale", 6.0))
            u = q * f32(1.0 / 255.0)  # float32
            gap = (-s * np.log1p(u.astype(np.float64) * math.expm1(-clip / s))).astype(f32)  # float64, rounded
        else:
            gap = q * f32(clip / 65535.0)  # float32
        return p["top"].astype(f32)[None] - gap

    def decode_features(self, p: dict[str, np.ndarray]) -> np.ndarray:
        codec = self.meta["features"]["codec"]
        f32 = np.float32
        if codec in ("fp32", "fp16"):
            return p["data"].astype(f32)
        if codec == "int8":
            return p["lo"][:, None, None] + p["q"].astype(f32) * p["step"][:, None, None]
        basis = self.group["features/pca_basis"][:]  # (k, C)
        mean = self.group["features/pca_mean"][:]  # (C,)
        data = p["data"].astype(f32)  # (k, hp, wp)
        return np.tensordot(basis.T, data, axes=1) + mean[:, None, None]

    def entry(self, e: int) -> tuple[np.ndarray, np.ndarray | None, int]:
        """(logits, feature cells) cropped to the valid grid, and the recomputed checksum."""
        parts = self.parts(e)
        gh, gw = (int(v) for v in self.grid[e])
        logits = self.decode_logits(parts["logits"])[:, :gh, :gw]
        feature = None
        if "features" in parts:
            bh, bw = self.meta["features"]["block"]
            feature = self.decode_features(parts["features"])[:, : -(-gh // bh), : -(-gw // bw)]
        return logits, feature, self.checksum(parts)


def image_file(root: Path, layout: str, image_id: str) -> Path:
    """ "Image ids": the file an id names in each dataset layout (the doc's table)."""
    if layout == "cityscapes":
        return root / "leftImg8bit" / f"{image_id}_leftImg8bit.png"
    hits = [p for ext in (".png", ".jpg", ".jpeg") if (p := root / "images" / f"{image_id}{ext}").is_file()]
    assert len(hits) == 1
    return hits[0]


# --------------------------------------------------------------------------------------------------
# skd's side (imported here only)
# --------------------------------------------------------------------------------------------------


def skd_entries(path: Path):
    from cache_tools.store import open_cache

    reader = open_cache(str(path))
    for e in range(reader.schema.num_entries):
        ent = reader.read_entry(e, check=True)
        yield e, ent


def assert_doc_reader_matches_skd(path: Path, pca: bool = False) -> int:
    doc = DocReader(path)
    n = 0
    for e, ent in skd_entries(path):
        logits, feature, checksum = doc.entry(e)
        assert checksum == int(doc.checksums[e]), e
        assert logits.dtype == np.float32 and np.array_equal(logits, ent.logits), e
        assert doc.ids[ent.image_index] == ent.image_id
        if feature is None:
            assert ent.feature is None
        elif pca:  # a matrix product: the summation order is the library's
            assert feature.dtype == np.float32
            np.testing.assert_allclose(feature, ent.feature, rtol=1e-5, atol=1e-5)
        else:
            assert feature.dtype == np.float32 and np.array_equal(feature, ent.feature), e
        n += 1
    return n


def synthetic(tmp_path: Path, logits_codec: str, features_codec: str, predictor: str | None = None) -> Path:
    from cache_tools.codecs import LogitCodec
    from cache_tools.testing import make_synthetic_cache, synthetic_schema

    schema = synthetic_schema(
        num_images=4, num_classes=5, grid=(9, 17), logits_codec=logits_codec, features_codec=features_codec
    )
    if predictor is not None:
        params = LogitCodec(logits_codec, predictor=predictor).params
        schema = replace(schema, logits=replace(schema.logits, params=params))
    path = tmp_path / f"{logits_codec}-{features_codec}-{predictor}.zarr"
    make_synthetic_cache(str(path), schema, seed=4)
    return path


@pytest.mark.parametrize(
    ("logits_codec", "predictor"),
    [
        ("fp32", None),
        ("fp16", None),
        ("int8-pixel", None),
        ("int8-channel", None),
        ("gap-u8", "delta2d"),
        ("gap-u8", "none"),
        ("gap-u16", "delta2d"),
        ("gap-u16", "none"),
    ],
)
def test_every_logit_codec_decodes_from_the_doc(tmp_path, logits_codec, predictor):
    path = synthetic(tmp_path, logits_codec, "fp16", predictor)
    assert assert_doc_reader_matches_skd(path) == 4


@pytest.mark.parametrize("features_codec", ["fp32", "fp16", "int8"])
def test_every_feature_codec_decodes_from_the_doc(tmp_path, features_codec):
    path = synthetic(tmp_path, "gap-u8", features_codec)
    assert assert_doc_reader_matches_skd(path) == 4


def test_pca_features_decode_from_the_doc(tmp_path):
    from cache_tools.codecs import FeatureCodec, LogitCodec
    from cache_tools.fidelity import pool_cells
    from cache_tools.schema import FIDELITY_COLUMNS, View
    from cache_tools.store import entry_checksum, prepare_cache
    from cache_tools.testing import synthetic_maps, synthetic_schema

    schema = synthetic_schema(num_images=2, shard_images=2, feature_channels=8, features_codec="fp16")
    schema = replace(schema, features=replace(schema.features, codec="pca", stored_channels=3))
    rng = np.random.default_rng(2)
    basis = np.linalg.qr(rng.normal(size=(8, 3)))[0].T.astype(np.float32)
    mean = rng.normal(size=8).astype(np.float32)
    ids = [f"train/town/town_{i:06d}" for i in range(2)]
    h, w = schema.logits.grid
    sizes = np.array([[8 * (h - 1), 8 * (w - 1)]] * 2)
    views = [View.identity(i, tuple(sizes[i])) for i in range(2)]
    path = tmp_path / "pca.zarr"
    writer, _ = prepare_cache(
        str(path),
        schema,
        image_ids=ids,
        image_sizes=sizes,
        views=views,
        grids=np.array([[h, w]] * 2),
        feature_codec=FeatureCodec("pca", basis, mean),
    )
    lc, fc = LogitCodec(schema.logits.codec), FeatureCodec("pca", basis, mean)
    encoded = []
    for _ in range(2):
        logits, feat = synthetic_maps(rng, 5, 8, h, w)
        encoded.append({"logits": lc.encode(logits)[0], "features": fc.encode(pool_cells(feat, (4, 4), "max"))[0]})
    writer.write_shard(
        0,
        logits={n: np.stack([p["logits"][n] for p in encoded]) for n in encoded[0]["logits"]},
        features={"data": np.stack([p["features"]["data"] for p in encoded])},
        image_sha256=np.zeros((2, 32), np.uint8),
        checksums=np.array([entry_checksum(p) for p in encoded], np.uint64),
        fidelity=np.full((2, len(FIDELITY_COLUMNS)), np.nan, np.float32),
        clipped=np.zeros(2, np.uint32),
    )
    writer.finalize({"device": "cpu", "seconds": 0.0})
    assert assert_doc_reader_matches_skd(path, pca=True) == 2


@pytest.mark.parametrize("store", ["dense.zarr", "views.zarr", "dense_delta2d.zarr"])
def test_the_checked_in_v1_fixtures_decode_from_the_doc(store):
    assert assert_doc_reader_matches_skd(FIXTURES / store) > 0


def test_checksum_header_is_numpy_dtype_str_and_python_tuple():
    """The doc's spelled-out header (``<f2``, ``|u1``, ``(19,)``) is what skd hashes."""
    from cache_tools.store import entry_checksum

    parts = {
        "logits": {"top": np.zeros((2, 3), np.float16), "dq": np.ones((4, 2, 3), np.uint8)},
        "features": {"lo": np.arange(5, dtype=np.float32)},
    }
    assert DocReader.checksum(None, parts) == entry_checksum(parts)  # type: ignore[arg-type]
    assert np.dtype(np.float16).str == "<f2" and np.dtype(np.uint8).str == "|u1"


def test_image_ids_name_files_in_each_layout(sample_root, tmp_path):
    from cache_tools.datasets import open_dataset

    ds = open_dataset(sample_root, splits=("train",))
    for rec in ds.records:
        assert image_file(sample_root, "cityscapes", rec.id) == rec.image_path
    root = tmp_path / "folder"
    (root / "images" / "train" / "a").mkdir(parents=True)
    (root / "classes.txt").write_text("x\ny\n")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(root / "images" / "train" / "a" / "one.jpg")
    Image.new("RGB", (8, 8)).save(root / "images" / "train" / "two.png")
    ds = open_dataset(root, splits=("train",))
    assert [r.id for r in ds.records] == ["train/a/one", "train/two"]
    for rec in ds.records:
        assert image_file(root, "folder", rec.id) == rec.image_path
