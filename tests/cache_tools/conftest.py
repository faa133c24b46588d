"""Fixtures of the team-tool tests: moto S3, a range-capable HTTP server, caches that look like a teacher's.

``write_label_cache`` writes a cache whose "teacher" is the dataset's own labels, blurred and noised
on the teacher grid: its argmax looks like a segmentation (so previews are worth looking at), its
fingerprints are the real image files' (so ``verify --dataset`` passes), and two noise seeds make
two comparable teachers (for ``diff``).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from cache_tools.datasets import CITYSCAPES_CLASS_NAMES, open_dataset
from cache_tools.fidelity import official_kernel
from cache_tools.schema import (
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
from cache_tools.store import prepare_cache
from cache_tools.testing import write_entries
from tests.s3 import S3Server, moto_s3, storage_options_for

# ------------------------------------------------------------------------------------------------
# a cache built from the labels


def grid_size(n: int) -> int:
    """The 8k+1 grid of a stride-8 ceil-mode network (512 -> 65)."""
    return -(-n // 8) + 1


def _node_labels(label: np.ndarray, h: int, w: int) -> np.ndarray:
    """Labels at the nodes of an (h, w) grid laid over the label map (align_corners=True)."""
    H, W = label.shape
    ys = np.rint(np.arange(h) * ((H - 1) / max(h - 1, 1))).astype(int)
    xs = np.rint(np.arange(w) * ((W - 1) / max(w - 1, 1))).astype(int)
    return label[ys][:, xs]


def _blur(x: np.ndarray, passes: int) -> np.ndarray:
    for _ in range(passes):
        p = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
        x = (p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:] + 2 * p[:, 1:-1, 1:-1]) / 6
    return x


def label_maps(label: np.ndarray, h: int, w: int, rng: np.random.Generator, k: int, proj: np.ndarray, noise: float):
    """Teacher-like (logits (k, h, w), feature (C, h, w)) from a label map."""
    nodes = _node_labels(label, h, w).copy()
    for y in range(1, h):  # unlabelled nodes (the ego vehicle, borders) take the label above them
        hole = nodes[y] >= k
        nodes[y, hole] = nodes[y - 1, hole]
    onehot = np.zeros((k, h, w), np.float32)
    valid = nodes < k
    ys, xs = np.nonzero(valid)
    onehot[nodes[valid], ys, xs] = 1.0
    onehot[:, ~valid] = 1.0 / k
    soft = _blur(onehot, 2)
    logits = 9.0 * soft + noise * rng.normal(size=soft.shape).astype(np.float32) + rng.normal(0, 0.2, (k, 1, 1))
    feature = np.maximum(np.einsum("ck,khw->chw", proj, soft), 0) + 0.05 * rng.random((proj.shape[0], h, w))
    return logits.astype(np.float32), feature.astype(np.float32)


def _label_view(label: np.ndarray, v: View) -> np.ndarray:
    H, W = label.shape
    hs, ws = v.resized
    y0, x0, ch, cw = v.box
    out = np.full((ch, cw), 255, np.uint8)
    rows, cols = max(0, min(ch, hs - y0)), max(0, min(cw, ws - x0))
    sy = np.minimum((np.arange(y0, y0 + rows) * (H / hs)).astype(int), H - 1)
    sx = np.minimum((np.arange(x0, x0 + cols) * (W / ws)).astype(int), W - 1)
    out[:rows, :cols] = label[sy][:, sx]
    return out[:, ::-1] if v.flip else out


def write_label_cache(
    url: str,
    root: str | Path,
    *,
    mode: str = "dense",
    splits: tuple[str, ...] = ("train",),
    per_image: int = 1,
    crop: tuple[int, int] = (48, 64),
    features: str | None = "fp16",
    channels: int = 16,
    noise: float = 0.6,
    seed: int = 0,
    teacher: str = "label-teacher",
    logits_codec: str = "gap-u8",
    shard_images: int = 2,
    storage_options: dict | None = None,
    image_filter=None,
) -> CacheSchema:
    """Write a cache of ``root``'s images whose teacher output is derived from the labels."""
    from cache_tools.codecs import LogitCodec

    ds = open_dataset(root, splits=splits)
    ids = [i for i in ds.ids if image_filter is None or image_filter(i)]
    sizes, labels, shas = [], [], []
    for image_id in ids:
        image, sha = ds.read_image(image_id)
        sizes.append(image.shape[:2])
        labels.append(ds.read_label(image_id))
        shas.append(bytes.fromhex(sha))
    rng = np.random.default_rng(seed)
    k = len(CITYSCAPES_CLASS_NAMES)
    views: list[View] = []
    for i, (h, w) in enumerate(sizes):
        if mode == "dense":
            views += [View.identity(i, (h, w), flip=bool(j)) for j in range(per_image)]
        else:
            vr = np.random.default_rng([7, i])
            for _ in range(per_image):
                s = float(vr.choice([0.75, 1.0, 1.25, 1.5]))
                hs, ws = round(h * s), round(w * s)
                y0 = int(vr.integers(0, max(hs, crop[0]) - crop[0] + 1))
                x0 = int(vr.integers(0, max(ws, crop[1]) - crop[1] + 1))
                views.append(View(i, s, (hs, ws), (y0, x0, crop[0], crop[1]), bool(vr.integers(2))))
    grids = np.array([(grid_size(v.box[2]), grid_size(v.box[3])) for v in views], dtype=np.int64)
    canvas = (int(grids[:, 0].max()), int(grids[:, 1].max()))
    assert (grids == canvas).all(), "write_label_cache needs images of one size"
    codec = LogitCodec(logits_codec)
    feat_layout = None
    if features is not None:
        block = official_kernel(*canvas) if mode == "views" else (4, 4)
        feat_layout = TargetLayout(
            codec=features, channels=channels, grid=canvas, pool="max", block=block, compressor=Compressor()
        )
    schema = CacheSchema(
        mode=mode,
        teacher=TeacherStamp(
            name=teacher,
            architecture="labels blurred on the stride-8 grid",
            num_classes=k,
            feature_channels=channels,
            weights_sha256=None,
            random_weights=True,
            normalization={"order": "RGB", "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]},
            seed=seed,
        ),
        dataset=DatasetStamp(
            name=ds.name,
            splits=tuple(splits),
            num_images=len(ids),
            ids_sha256=ids_digest(ids),
            class_names=tuple(CITYSCAPES_CLASS_NAMES),
        ),
        num_entries=len(views),
        entries_per_image=per_image,
        shard_entries=shard_images * per_image,
        id_bytes=max(16, max(len(i) for i in ids)),
        logits=TargetLayout(codec=codec.name, channels=k, grid=canvas, params=codec.params),
        features=feat_layout,
        views=ViewsParams(per_image=per_image, seed=7, crop=crop, scales=(0.75, 1.0, 1.25, 1.5))
        if mode == "views"
        else None,
        dense=DenseParams(flip=per_image == 2) if mode == "dense" else None,
        build={"device": "cpu", "seconds": 0.0},
    )
    writer, _ = prepare_cache(
        url,
        schema,
        image_ids=ids,
        image_sizes=np.asarray(sizes, np.int64),
        views=views,
        grids=grids,
        storage_options=storage_options,
    )
    proj = np.random.default_rng(1234).normal(size=(channels, k)).astype(np.float32)
    maps = {}
    for e, v in enumerate(views):
        lab = _label_view(labels[v.image], v)
        maps[e] = label_maps(lab, *canvas, rng, k, proj, noise)
    write_entries(writer, maps, shas)
    return writer.finalize({"device": "cpu", "seconds": 0.0})


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 API on 127.0.0.1 (one server for the session; tests use their own buckets)."""
    with moto_s3() as server:
        yield server


@pytest.fixture
def s3(s3_server: S3Server, request) -> Iterator[S3Server]:
    """The session's S3 server with a fresh bucket named after the test (``s3.bucket``); faults off."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    s3_server.faults.reset()
    s3_server.bucket = s3_server.make_bucket(name)
    yield s3_server
    s3_server.faults.reset()


@pytest.fixture
def flaky_s3(s3: S3Server, monkeypatch) -> Iterator[S3Server]:
    """The S3 server answering ~20% of requests with 503 SlowDown / 500 InternalError (seeded).

    botocore retries them with exponential backoff (up to seconds per retry); the fixture shortens
    the backoff so the test stays fast, and uses its own storage options so that its clients are
    created (with the short backoff) afresh. What is retried, and how often, is botocore's and
    s3fs's own logic.
    """
    import botocore.retryhandler

    monkeypatch.setattr(botocore.retryhandler, "delay_exponential", lambda base, growth_factor, attempts: 0.002)
    flaky = S3Server(
        endpoint=s3.endpoint, faults=s3.faults, storage_options=storage_options_for(s3.endpoint, retries=12)
    )
    flaky.bucket = s3.bucket  # type: ignore[attr-defined]
    s3.faults.reset(failure_rate=0.2, seed=1)
    yield flaky
    s3.faults.reset()


class RangeRequestHandler(SimpleHTTPRequestHandler):
    """``http.server`` plus single byte ranges (``bytes=a-b``, ``a-``, ``-n``), like any real web server."""

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        rng = self.headers.get("Range")
        path = self.translate_path(self.path)
        if rng is None or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        spec = rng.strip().removeprefix("bytes=")
        first, _, last = spec.partition("-")
        if first == "":
            start, stop = max(0, size - int(last)), size
        else:
            start = int(first)
            stop = min(size, int(last) + 1) if last else size
        if start >= size:
            self.send_error(416, "Requested Range Not Satisfiable")
            return None
        f = open(path, "rb")  # noqa: SIM115 - handed to the server, which closes it
        f.seek(start)
        self._remaining = stop - start
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.send_header("Content-Length", str(stop - start))
        self.end_headers()
        return f

    def copyfile(self, source, outputfile):
        remaining = getattr(self, "_remaining", None)
        if remaining is None:
            return super().copyfile(source, outputfile)
        outputfile.write(source.read(remaining))
        self._remaining = None


def serve_http(directory: str | Path, *, ranges: bool = True) -> tuple[str, ThreadingHTTPServer]:
    """Serve ``directory`` over HTTP on 127.0.0.1 in a thread; returns (base URL, server)."""
    handler = RangeRequestHandler if ranges else _QuietHandler
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_dir(tmp_path) -> Iterator[tuple[Path, str]]:
    """A folder served read-only over HTTP (with byte ranges): (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    url, server = serve_http(root)
    yield root, url
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def label_caches(sample_root, tmp_path_factory) -> dict[str, str]:
    """Caches of the session's sample dataset (train split): a dense one and a views one (3 views).

    Shared by many tests: copy one before changing it.
    """
    root = tmp_path_factory.mktemp("label-caches")
    out = {"dense": str(root / "dense.zarr"), "views": str(root / "views.zarr")}
    write_label_cache(out["dense"], sample_root, mode="dense")
    write_label_cache(out["views"], sample_root, mode="views", per_image=3, crop=(48, 64))
    return out
