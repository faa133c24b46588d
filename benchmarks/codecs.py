"""Bytes per image/view and fidelity of every codec choice, on Cityscapes-size teacher outputs.

    python benchmarks/codecs.py            # ~3 min on 2 CPU cores (psp101 forwards dominate)

Sources (no Cityscapes teacher can be downloaded here, so both are stated plainly):

* logits: the benchmark teacher (psp34_mini trained on the sample dataset, benchmarks/common.py) on
  sample scenes rendered at 1024x2048 -> 19x129x257 logits with a trained teacher's statistics;
* features: psp101 with seeded random weights on the same images, its BatchNorm statistics set from
  those images (so activations have the scale a trained network's BN gives them) -> the real
  512x129x257 PSP-bottleneck shape; trained features will compress differently;
* a confidence sweep: the trained teacher is far less confident than a Cityscapes PSPNet-R101
  (max-prob > 0.9 on ~30% vs most nodes), and confidence drives the logits' entropy, so the views
  table is repeated with its logits sharpened (multiplied by 2 and 3; same argmax).

Every configuration is written as a real store through the library's writer (one chunk per entry,
sharded, zstd-1 by default), so the bytes are bytes on disk; fidelity is what the build records.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numcodecs
import numpy as np
import torch
from common import benchmark_teacher, save

from cache_tools.codecs import FeatureCodec, LogitCodec, fit_pca
from cache_tools.datasets.sample import render_scene
from cache_tools.fidelity import cosine_matrix, pool_cells
from cache_tools.inspect import array_bytes
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
from cache_tools.store import open_cache, prepare_cache
from cache_tools.testing import write_entries
from pipeline.teachers import calibrate_batchnorm, create_teacher
from pipeline.views import apply_view, sample_views

CITYSCAPES = (1024, 2048)


def teacher_outputs(n_images: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(logits from the trained mini teacher, 512-ch features from psp101, the images)."""
    weights, _ = benchmark_teacher()
    mini = create_teacher("psp34_mini", num_classes=19, weights=weights).model
    big = create_teacher("psp101", num_classes=19, random_weights=True, seed=0).model
    images = [render_scene(CITYSCAPES, seed=1000 + i)[0] for i in range(n_images)]
    xs = [torch.from_numpy(img).permute(2, 0, 1)[None].float() for img in images]
    calibrate_batchnorm(big, torch.cat(xs[:2]))
    logits, feats = [], []
    for x in xs:
        with torch.inference_mode():
            logits.append(mini(x).logits[0].numpy())
            feats.append(big(x).feature[0].numpy())
    return logits, feats, images


def _logit_codec(spec: str) -> LogitCodec:
    """'gap-u8' (the build's default, codes behind the delta2d predictor) or 'gap-u8:plain' (codes as they are)."""
    name, _, variant = spec.partition(":")
    return LogitCodec(name, predictor="none") if variant == "plain" else LogitCodec(name)


def _schema(
    mode, n, k_cls, grid, logits_codec, features, per_image=1, crop=None, compressor=Compressor()
) -> CacheSchema:
    ids = [f"bench/{i:04d}" for i in range(n)]
    lc = _logit_codec(logits_codec)
    return CacheSchema(
        mode=mode,
        teacher=TeacherStamp(
            name="bench",
            architecture="bench",
            num_classes=k_cls,
            feature_channels=features.channels if features else 1,
            weights_sha256=None,
            random_weights=True,
            normalization={"order": "BGR", "mean": [0, 0, 0], "std": [1, 1, 1]},
        ),
        dataset=DatasetStamp(
            name="bench",
            splits=("val",),
            num_images=n,
            ids_sha256=ids_digest(ids),
            class_names=tuple(f"c{i}" for i in range(k_cls)),
        ),
        num_entries=n * per_image,
        entries_per_image=per_image,
        shard_entries=n * per_image,
        id_bytes=16,
        logits=TargetLayout(codec=lc.name, channels=k_cls, grid=grid, params=lc.params, compressor=compressor),
        features=features,
        views=ViewsParams(per_image=per_image, seed=0, crop=crop, scales=(1.0,)) if mode == "views" else None,
        dense=DenseParams() if mode == "dense" else None,
    )


def measure(schema: CacheSchema, maps: dict, image_size) -> dict:
    """Write a real store and return its bytes per entry (logits, features) and recorded fidelity."""
    with tempfile.TemporaryDirectory() as tmp:
        url = str(Path(tmp) / "c.zarr")
        n = schema.num_images
        views = [View.identity(i // schema.entries_per_image, image_size) for i in range(schema.num_entries)]
        grids = np.array([list(schema.logits.grid)] * schema.num_entries)
        writer, _ = prepare_cache(
            url,
            schema,
            image_ids=[f"bench/{i:04d}" for i in range(n)],
            image_sizes=np.array([image_size] * n),
            views=views,
            grids=grids,
        )
        write_entries(writer, maps, [bytes(32)] * n)
        writer.finalize()
        sizes = array_bytes(url)
        lb = sum(v for k, v in sizes.items() if k.startswith("logits/") and not k.endswith("zarr.json"))
        fb = sum(v for k, v in sizes.items() if k.startswith("features/") and not k.endswith("zarr.json"))
        fid = open_cache(url).schema.fidelity
    e = schema.num_entries
    return {"logits_bytes": lb / e, "features_bytes": fb / e, "fidelity": fid}


def fine_node_error(feat: np.ndarray, decoded_full: np.ndarray, block=(4, 4)) -> float:
    """Pair-wise cosine error on fine nodes (4x4 max-pool, ~2100 nodes): full-map codecs only."""
    a = cosine_matrix(pool_cells(feat, block, "max"))
    b = cosine_matrix(pool_cells(decoded_full, block, "max"))
    return float(np.abs(a - b).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--views", type=int, default=4, help="512x512 views per image for the views table")
    args = ap.parse_args()
    t0 = time.perf_counter()
    logits, feats, images = teacher_outputs(args.images)
    n = len(logits)
    grid = logits[0].shape[1:]
    fp32 = {"logits": 19 * grid[0] * grid[1] * 4, "features": 512 * grid[0] * grid[1] * 4}
    print(f"teacher outputs: logits {logits[0].shape}, features {feats[0].shape}  ({time.perf_counter() - t0:.0f} s)")
    p = torch.softmax(torch.from_numpy(np.stack(logits)), 1).max(1).values
    print(f"trained-teacher confidence: max-prob > 0.9 on {100 * (p > 0.9).float().mean():.1f}% of nodes")

    # ---- logits codecs, dense, Cityscapes size
    rows = []
    for codec in ("fp32", "fp16", "int8-pixel", "int8-channel", "gap-u8:plain", "gap-u8", "gap-u16:plain", "gap-u16"):
        schema = _schema("dense", n, 19, grid, codec, None)
        m = measure(schema, {i: (logits[i], None) for i in range(n)}, CITYSCAPES)
        f = m["fidelity"]
        rows.append(
            {
                "codec": codec,
                "bytes": m["logits_bytes"],
                **{k: f[k] for k in ("kl_t1_mean", "kl_t1_max", "kl_t4_mean", "kl_t4_max", "argmax_agreement")},
            }
        )
    print("\nlogits 19x129x257 per image (zstd-1 on disk; fp32 raw = %.2f MB)" % (fp32["logits"] / 1e6))
    print(
        f"{'codec':14s} {'MB/img':>8s} {'x fp32':>7s} {'KL1 mean':>9s} {'KL1 max':>9s} {'KL4 mean':>9s} {'KL4 max':>9s} {'argmax %':>9s}"
    )
    for r in rows:
        print(
            f"{r['codec']:14s} {r['bytes'] / 1e6:8.3f} {fp32['logits'] / r['bytes']:7.1f} {r['kl_t1_mean']:9.1e} {r['kl_t1_max']:9.1e} {r['kl_t4_mean']:9.1e} {r['kl_t4_max']:9.1e} {100 * r['argmax_agreement']:9.3f}"
        )

    # ---- features: what the pair-wise loss needs
    frows = []
    for block, codec in [
        ((1, 1), "fp16"),
        ((1, 1), "int8"),
        ((1, 1), "pca64"),
        ((4, 4), "fp16"),
        ((4, 4), "int8"),
        ((8, 8), "fp16"),
        ((8, 8), "int8"),
    ]:
        name, k = ("pca", int(codec[3:])) if codec.startswith("pca") else (codec, None)
        layout = TargetLayout(
            codec=name, channels=512, grid=grid, pool="max", block=block, stored_channels=k, compressor=Compressor()
        )
        schema = _schema("dense", n, 19, grid, "gap-u8", layout)
        fine = None
        if name == "pca":
            basis, mean, kept = fit_pca(np.concatenate([f.reshape(512, -1).T for f in feats]), k)
            fc = FeatureCodec("pca", basis=basis, mean=mean)
            # PCA is written by hand here (write_entries handles the per-array codecs only)
            dec = [fc.decode(fc.encode(f)[0]) for f in feats]
            fine = max(fine_node_error(f, d) for f, d in zip(feats, dec, strict=True))
            coeff_bytes = np.mean(
                [len(numcodecs.Zstd(3).encode(np.ascontiguousarray(fc.encode(f)[0]["data"]))) for f in feats]
            )
            off = [
                abs(
                    cosine_matrix(pool_cells(f, (64, 128), "max")) - cosine_matrix(pool_cells(d, (64, 128), "max"))
                ).max()
                for f, d in zip(feats, dec, strict=True)
            ]
            frows.append(
                {
                    "block": block,
                    "codec": codec,
                    "bytes": coeff_bytes,
                    "pair_err_official": float(max(off)),
                    "pair_err_fine": fine,
                    "variance_kept": kept,
                }
            )
            continue
        m = measure(schema, {i: (logits[i], feats[i]) for i in range(n)}, CITYSCAPES)
        if block == (1, 1):
            fcodec = FeatureCodec(name)
            fine = max(fine_node_error(f, fcodec.decode(fcodec.encode(f)[0])) for f in feats)
        frows.append(
            {
                "block": block,
                "codec": codec,
                "bytes": m["features_bytes"],
                "pair_err_official": m["fidelity"].get("pair_cos_err_max"),
                "pair_err_fine": fine,
            }
        )
    print(
        "\nfeatures 512x129x257 per image (fp32 raw = %.1f MB); pair-wise cosine error (max) on the official 3x3 whole-image nodes and on fine 4x4-max nodes"
        % (fp32["features"] / 1e6)
    )
    print(f"{'stored':22s} {'MB/img':>8s} {'x fp32':>8s} {'official err':>13s} {'fine err':>10s}")
    for r in frows:
        where = "full map" if r["block"] == (1, 1) else "max {}x{} cells".format(*r["block"])
        label = f"{r['codec']} {where}"
        fine = "n/a" if r["pair_err_fine"] is None else f"{r['pair_err_fine']:.1e}"
        print(
            f"{label:22s} {r['bytes'] / 1e6:8.3f} {fp32['features'] / r['bytes']:8.1f} {r['pair_err_official']:13.1e} {fine:>10s}"
        )

    default_dense = (
        next(r for r in rows if r["codec"] == "gap-u8")["bytes"]
        + next(r for r in frows if r["codec"] == "fp16" and r["block"] == (8, 8))["bytes"]
    )
    print(
        f"\ndense default (gap-u8 logits + max 8x8 fp16 cells): {default_dense / 1e6:.2f} MB per image (target <= 2 MB; fp32 logits+features = {(fp32['logits'] + fp32['features']) / 1e6:.1f} MB)"
    )

    # ---- views: 512x512 crops with the official augmentation
    crop = (512, 512)
    vlog, vfeat = [], []
    weights, _ = benchmark_teacher()
    mini = create_teacher("psp34_mini", num_classes=19, weights=weights).model
    big = create_teacher("psp101", num_classes=19, random_weights=True, seed=0).model
    calibrate_batchnorm(big, torch.cat([torch.from_numpy(img).permute(2, 0, 1)[None].float() for img in images[:2]]))
    for i, img in enumerate(images):
        x = torch.from_numpy(img).permute(2, 0, 1)
        for v in sample_views(0, [CITYSCAPES], args.views, crop):
            c, _ = apply_view(x, None, View(i, *v[1:]))
            with torch.inference_mode():
                vlog.append(mini(c[None]).logits[0].numpy())
                vfeat.append(big(c[None]).feature[0].numpy())
    vgrid = vlog[0].shape[1:]
    vrows = []
    for sharpen in (1.0, 2.0, 3.0):
        conf = float((torch.softmax(torch.from_numpy(np.stack(vlog)) * sharpen, 1).max(1).values > 0.9).float().mean())
        configs = (
            [(c, f) for c in ("fp16", "int8-pixel", "gap-u8:plain", "gap-u8") for f in ("fp16", "int8")]
            if sharpen == 1
            else [("gap-u8", "fp16")]
        )
        for codec, fcodec in configs:
            layout = TargetLayout(
                codec=fcodec, channels=512, grid=vgrid, pool="max", block=(32, 32), compressor=Compressor()
            )
            schema = _schema("views", len(vlog), 19, vgrid, codec, layout, crop=crop)
            m = measure(schema, {i: (vlog[i] * sharpen, vfeat[i]) for i in range(len(vlog))}, crop)
            vrows.append(
                {
                    "sharpen": sharpen,
                    "confident": conf,
                    "logits": codec,
                    "nodes": fcodec,
                    "bytes": m["logits_bytes"] + m["features_bytes"],
                    "logits_bytes": m["logits_bytes"],
                    "nodes_bytes": m["features_bytes"],
                    **m["fidelity"],
                }
            )
    print(
        f"\nviews: 512x512 crops ({len(vlog)} views), logits 19x65x65 + official 3x3 nodes (512 ch); target <= 60 KB per view"
    )
    print(
        f"{'logits (sharpened, max-p>0.9)':32s} {'nodes':6s} {'KB/view':>8s} {'logits KB':>10s} {'nodes KB':>9s} {'KL1 mean':>9s} {'KL4 max':>9s} {'argmax %':>9s} {'pair err':>9s}"
    )
    for r in vrows:
        label = f"{r['logits']} (x{r['sharpen']:.0f}, {100 * r['confident']:.0f}%)"
        print(
            f"{label:32s} {r['nodes']:6s} {r['bytes'] / 1e3:8.1f} {r['logits_bytes'] / 1e3:10.1f} {r['nodes_bytes'] / 1e3:9.1f} "
            f"{r['kl_t1_mean']:9.1e} {r['kl_t4_max']:9.1e} {100 * r['argmax_agreement']:9.3f} {r['pair_cos_err_max']:9.1e}"
        )

    # ---- lossless stage on the default parts
    q = np.stack([LogitCodec("gap-u8", predictor="none").encode(z)[0]["q"] for z in logits])
    dq = np.stack([LogitCodec("gap-u8").encode(z)[0]["dq"] for z in logits])
    cells = np.stack([pool_cells(f, (8, 8), "max").astype(np.float16) for f in feats])
    crows = []
    for name, c in [
        ("zstd-1", numcodecs.Zstd(1)),
        ("zstd-3", numcodecs.Zstd(3)),
        ("zstd-9", numcodecs.Zstd(9)),
        ("blosc-lz4 shuffle", numcodecs.Blosc("lz4", 5, numcodecs.Blosc.SHUFFLE)),
        ("blosc-zstd-1 shuffle", numcodecs.Blosc("zstd", 1, numcodecs.Blosc.SHUFFLE)),
    ]:
        row = {"compressor": name}
        for label, arr in (("gap-u8 codes q", q), ("gap-u8 delta2d dq", dq), ("fp16 cells", cells)):
            enc = [c.encode(np.ascontiguousarray(a)) for a in arr]
            t = time.perf_counter()
            for _ in range(5):
                for e in enc:
                    c.decode(e)
            dt = (time.perf_counter() - t) / 5
            row[label] = {"ratio": arr.nbytes / sum(len(e) for e in enc), "decode_MBps": arr.nbytes / dt / 1e6}
        crows.append(row)
    print("\nlossless stage (ratio raw/compressed, decode MB/s on one core)")
    for r in crows:
        a, d, b = r["gap-u8 codes q"], r["gap-u8 delta2d dq"], r["fp16 cells"]
        print(
            f"{r['compressor']:22s} q {a['ratio']:5.2f}x {a['decode_MBps']:7.0f} MB/s   dq {d['ratio']:5.2f}x {d['decode_MBps']:7.0f} MB/s   "
            f"fp16 cells {b['ratio']:5.2f}x {b['decode_MBps']:7.0f} MB/s"
        )
    path = save(
        "codecs",
        {
            "logits": rows,
            "features": [dict(r, block=list(r["block"])) for r in frows],
            "views": vrows,
            "lossless": crows,
            "dense_default_bytes": default_dense,
            "seconds": time.perf_counter() - t0,
        },
    )
    print(f"\nraw numbers: {path}")


if __name__ == "__main__":
    main()
