"""GPU run, ready to go: teacher precision, the write path alone, training step times, loader headroom.

    python3 benchmarks/gpu.py                  # one GPU: under 8 min; without one: CPU-sized, ~3-5 min
    python3 benchmarks/gpu.py --json gpu.json  # the same numbers as JSON too
    python3 benchmarks/gpu.py --tiny           # smoke run: a few small images, 2-3 iterations
    python3 benchmarks/gpu.py --cpu            # the CPU-sized run even where a GPU is present

Everything is measured side by side in one run:

(a) teacher: psp101 (random weights, BatchNorm statistics set from the images) on 1024x2048 images,
    one image per batch as the dense build runs it, per precision (fp32, tf32, fp16, bf16), with
    the logits' error against fp32 (KL mean, argmax agreement, max |delta logit|);
(b) the write path alone, teacher replaced by stored outputs: Cityscapes-size entries (logits
    19x129x257 + the 512-channel feature pooled to 8x8 cells) fed to the build's own encoder
    (``pipeline.build._ShardWriter``: encode, checksum, fidelity, compress, write) behind the same
    bounded queue, per writer thread count (per wall second and per CPU second of the writers);
    one loader worker's image decoding per CPU second; whole builds (``build_shards``, DataLoader
    decoding included) with a replay teacher. From (a) and (b): the CPU cores that keep up;
(c) psp18 student alone, cached KD (dense store) and online KD (psp101) step times at 512x512,
    batch 8 (``student.train``, steady state from metrics.jsonl as in train_speed.py);
(d) loader samples/s over the dense store per DataLoader worker count, against what (c)'s
    cached-KD student consumes.

It also counts psp101's FLOPs at 1024x2048 (``FlopCounterMode`` on the meta device) and turns
them into a GPU teacher rate at stated peak throughputs and utilisations, so that a machine
without a GPU can still say whether its write path would keep up.

Without a GPU it runs a CPU-sized version (psp34_mini teacher at 128x256, psp18_mini student at
128x128, fewer iterations; section (b) keeps the Cityscapes entry size) and says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import queue
import shutil
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import machine, save
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from train_speed import loader_rate, steady_step

import pipeline.inference as inference
from cache_tools.codecs import LogitCodec
from cache_tools.datasets import write_sample_dataset
from cache_tools.datasets.sample import render_scene
from cache_tools.store import prepare_cache
from pipeline.build import BuildConfig, _ShardWriter, build_cache, build_shards, plan_build
from pipeline.models.base import SegOutput
from pipeline.registry import create_model
from pipeline.teachers import calibrate_batchnorm, create_teacher
from student.train import TrainConfig, train

CITYSCAPES = (1024, 2048)
CITYSCAPES_TRAIN = 2975  # images; sets how often the build samples an entry's fidelity
FIDELITY_SAMPLES = BuildConfig.__dataclass_fields__["fidelity_samples"].default
# Dense peak throughput of one H100/H200 SXM (NVIDIA data sheet, no sparsity), FLOP/s.
PEAK = {"fp32": 67e12, "tf32": 495e12, "fp16": 989e12, "bf16": 989e12}
UTILISATION = (0.15, 0.40)  # assumed share of peak a batch-1 dilated ResNet-101 forward reaches


@dataclass(frozen=True)
class Profile:
    """Sizes of one run: ``gpu`` (the real thing), ``cpu`` (a machine without one), ``tiny`` (smoke)."""

    name: str
    device: str
    teacher: str
    size: tuple[int, int]  # teacher images, section (a)
    precisions: tuple[str, ...]
    fwd_warmup: int
    fwd_iters: int
    write_entries: int  # images (dense entries) of section (b)
    writer_threads: tuple[int, ...]
    replay: tuple[tuple[int, int], ...]  # (loader workers, writer threads) of the replay builds
    feature_size: tuple[int, int]  # psp101 input for the stored feature when (a) is not psp101 at 1024x2048
    student: str
    train_size: tuple[int, int]
    train_images: int
    crop: tuple[int, int]
    batch: int
    iters: int
    warmup: int
    train_workers: int
    loader_workers: tuple[int, ...]
    loader_batches: int
    write_size: tuple[int, int] = CITYSCAPES  # images of section (b): 1024x2048 -> logits 19x129x257
    flops_size: tuple[int, int] = CITYSCAPES  # psp101's FLOPs are counted here and scaled to 1024x2048 by area


def profiles(cores: int) -> dict[str, Profile]:
    half = max(2, cores // 2)
    gpu = Profile(
        name="gpu",
        device="cuda",
        teacher="psp101",
        size=CITYSCAPES,
        precisions=("fp32", "tf32", "fp16", "bf16"),
        fwd_warmup=3,
        fwd_iters=12,
        write_entries=48,
        writer_threads=tuple(sorted({t for t in (1, 2, 4, 8, 16) if t <= cores} | {1})),
        replay=((2, 2), (half, half)),
        feature_size=CITYSCAPES,
        student="psp18",
        train_size=CITYSCAPES,
        train_images=16,
        crop=(512, 512),
        batch=8,
        iters=30,
        warmup=10,
        train_workers=min(8, half),
        loader_workers=tuple(sorted({2, min(4, half), half})),
        loader_batches=20,
    )
    cpu = dataclasses.replace(
        gpu,
        name="cpu",
        device="cpu",
        teacher="psp34_mini",
        size=(128, 256),
        precisions=("fp32", "bf16"),
        fwd_warmup=1,
        fwd_iters=2,
        write_entries=12,
        writer_threads=(1, 2),
        replay=((2, 2),),
        feature_size=(128, 256),
        student="psp18_mini",
        train_size=(128, 256),
        train_images=8,
        crop=(128, 128),
        iters=8,
        warmup=3,
        train_workers=2,
        loader_workers=(1, 2),
        loader_batches=10,
    )
    tiny = dataclasses.replace(
        cpu,
        name="tiny",
        size=(64, 128),
        fwd_iters=2,
        write_entries=4,
        replay=((0, 1),),
        feature_size=(64, 128),
        train_size=(64, 128),
        train_images=4,
        crop=(64, 64),
        batch=2,
        iters=3,
        warmup=1,
        train_workers=0,
        loader_workers=(0,),
        loader_batches=2,
        write_size=(256, 512),
        flops_size=(256, 512),
    )
    return {p.name: p for p in (gpu, cpu, tiny)}


# --------------------------------------------------------------------------------------------------
# helpers


def write_copies(root: Path, n: int, size: tuple[int, int], unique: int) -> Path:
    """A sample dataset of ``n`` train images: ``unique`` rendered ones, the rest copies under new ids.

    Rendering a 1024x2048 scene costs seconds on one core; for throughput only the size matters.
    """
    write_sample_dataset(root, num_train=min(n, unique), num_val=0, size=size, seed=3)
    pairs = sorted((root / "leftImg8bit" / "train").rglob("*_leftImg8bit.png"))
    for i in range(len(pairs), n):
        src = pairs[i % len(pairs)]
        city = src.parent.name
        stem = src.name[: -len("_leftImg8bit.png")]
        new = f"{city}_{900000 + i:06d}_000019"
        shutil.copyfile(src, src.parent / f"{new}_leftImg8bit.png")
        label = root / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png"
        shutil.copyfile(label, label.parent / f"{new}_gtFine_labelIds.png")
    return root


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images(size: tuple[int, int], n: int, device: torch.device) -> torch.Tensor:
    """(n, 3, H, W) float raw pixels of sample scenes (the models normalise their own input)."""
    arr = np.stack([render_scene(size, seed=2000 + i)[0] for i in range(n)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().to(device)


def logit_error(ref: torch.Tensor, z: torch.Tensor) -> dict:
    """KL(softmax ref || softmax z) mean over nodes, argmax agreement and max |delta logit|."""
    if not bool(torch.isfinite(z).all()):
        return {"finite": False, "kl_mean": math.inf, "argmax_agreement": 0.0, "max_abs_logit_diff": math.inf}
    lp, lq = F.log_softmax(ref.double(), 1), F.log_softmax(z.double(), 1)
    return {
        "finite": True,
        "kl_mean": float((lp.exp() * (lp - lq)).sum(1).mean()),
        "argmax_agreement": float((ref.argmax(1) == z.argmax(1)).double().mean()),
        "max_abs_logit_diff": float((ref - z).abs().max()),
    }


def psp101_flops(size: tuple[int, int]) -> float:
    """FLOPs (2 per multiply-add) of one psp101 forward, counted on the meta device (no compute)."""
    with torch.device("meta"):
        model = create_model("psp101", num_classes=19).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, 3, *size, device="meta"))
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------------------------------
# (a) teacher throughput and error per precision


def forward_rate(model: nn.Module, xs: torch.Tensor, device, precision: str, p: Profile):
    """(images/s, logits of each of ``xs``) for one image per forward, as the dense build runs it.

    Each timed forward also pools the feature into the stored 8x8 cells and copies logits and cells
    to the host, as the build's main thread does before it hands them to the writers.
    """
    logits = []
    with torch.inference_mode(), inference.teacher_precision(device, precision):
        for i in range(p.fwd_warmup):
            model(xs[i % len(xs)][None])
        sync(device)
        t0 = time.perf_counter()
        for i in range(max(p.fwd_iters, len(xs))):
            out = model(xs[i % len(xs)][None])
            z = out.logits.float().cpu()
            inference.pool_cells(out.feature.float(), (8, 8), "max").cpu()
            if i < len(xs):
                logits.append(z)
        sync(device)
        seconds = time.perf_counter() - t0
    return max(p.fwd_iters, len(xs)) / seconds, torch.cat(logits)


def section_teacher(p: Profile, device: torch.device) -> tuple[dict, nn.Module]:
    model = create_teacher(p.teacher, num_classes=19, random_weights=True, seed=0, device=str(device)).model
    xs = images(p.size, 2, device)
    calibrate_batchnorm(model, xs)
    rows, ref = [], None
    for precision in p.precisions:
        rate, z = forward_rate(model, xs, device, precision, p)
        ref = z if ref is None else ref  # the first precision is fp32
        rows.append({"precision": precision, "images_per_s": rate, **logit_error(ref, z)})
    res = {"teacher": p.teacher, "size": list(p.size), "rows": rows}
    return {**res, "fp32_logit_std": float(ref.std())}, model


def print_teacher(res: dict) -> None:
    h, w = res["size"]
    print(
        f"\n(a) teacher {res['teacher']} on {h}x{w} images, 1 image per forward (pipeline.inference.teacher_precision)"
    )
    print(f"(random weights, BatchNorm set from the images; fp32 logits have std {res['fp32_logit_std']:.2f})")
    print(f"{'precision':10s} {'images/s':>9s} {'x fp32':>7s} {'KL mean':>9s} {'argmax %':>9s} {'max |dz|':>9s}")
    base = res["rows"][0]["images_per_s"]
    for r in res["rows"]:
        print(
            f"{r['precision']:10s} {r['images_per_s']:9.2f} {r['images_per_s'] / base:7.2f} {r['kl_mean']:9.1e} "
            f"{100 * r['argmax_agreement']:9.3f} {r['max_abs_logit_diff']:9.1e}"
        )


# --------------------------------------------------------------------------------------------------
# (b) the write path alone


class Replay(nn.Module):
    """A teacher that returns stored outputs: the build without the cost of a forward pass."""

    def __init__(self, logits: torch.Tensor, feature: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)
        self.register_buffer("feature", feature)

    def forward(self, x: torch.Tensor) -> SegOutput:
        n = x.shape[0]
        return SegOutput(self.logits.expand(n, -1, -1, -1), None, self.feature.expand(n, -1, -1, -1))


def stored_outputs(p: Profile, device: torch.device, teacher: nn.Module, psp101: nn.Module, grid):
    """(logits (1,19,h,w), feature (1,512,h,w)) float32 to replay on ``grid`` (that of ``p.write_size``).

    At 1024x2048 (all but --tiny) the grid is Cityscapes', 129x257. On a GPU both come from psp101
    at that size. CPU-sized: the logits from section (a)'s teacher at ``p.size`` and the feature
    from psp101 at ``p.feature_size``, both resized to the grid (bilinear): full-size forwards cost
    minutes on a loaded CPU, and the encoder's cost depends on the shapes, hardly on the values.
    """
    with torch.inference_mode():
        if p.teacher == "psp101" and p.size == p.write_size:
            out = teacher(images(p.write_size, 1, device))
            return out.logits.float().cpu(), out.feature.float().cpu()
        logits = teacher(images(p.size, 1, device)).logits.float()
    xs = images(p.feature_size, 2, device)  # BatchNorm in training mode needs two images (1x1 pyramid level)
    calibrate_batchnorm(psp101, xs)
    with torch.inference_mode():
        feature = psp101(xs[:1]).feature.float()
    resize = dict(size=tuple(int(v) for v in grid), mode="bilinear", align_corners=True)
    return F.interpolate(logits, **resize).cpu(), F.interpolate(feature, **resize).cpu()


def encode_rate(plan, url: str, logits: np.ndarray, cells: np.ndarray, threads: int) -> tuple[float, float]:
    """Through the build's encoder (``_ShardWriter``) behind its bounded queue with ``threads`` writers:
    (entries per wall second, entries per CPU second of the writer threads).

    The second is what one core does however loaded the machine is (other processes take wall time,
    not this thread's CPU time); the encoders run in the writer threads only (zstd, numpy, no pools).
    """
    schema = plan.schema
    writer, _ = prepare_cache(
        url, schema, image_ids=plan.ids, image_sizes=plan.sizes, views=plan.views, grids=plan.grids
    )
    codec = LogitCodec.from_params(schema.logits.codec, schema.logits.params)
    # sample every n-th entry's fidelity as a Cityscapes build does (2975 entries, 64 samples)
    sink = _ShardWriter(writer, schema, codec, writer.feature_codec(), CITYSCAPES_TRAIN // FIDELITY_SAMPLES)
    jobs: queue.Queue = queue.Queue(maxsize=plan.config.queue_size)

    cpu = []

    def work() -> None:
        c0 = time.thread_time()
        while (job := jobs.get()) is not None:
            sink.add(*job)
        cpu.append(time.thread_time() - c0)

    pool = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for e in range(schema.num_entries):
        j = e % len(logits)
        jobs.put((e, bytes(32), [e], logits[j : j + 1], cells[j : j + 1], [tuple(plan.grids[e])]))
    for _ in pool:
        jobs.put(None)
    for t in pool:
        t.join()
    seconds = time.perf_counter() - t0
    if sink.entries_written != schema.num_entries:
        raise RuntimeError(f"wrote {sink.entries_written} of {schema.num_entries} entries")
    return schema.num_entries / seconds, schema.num_entries / sum(cpu)


def decode_rate(plan, n: int) -> float:
    """Images per CPU second of one build loader worker's read: file hash, PNG decode, label check."""
    plan.dataset.load(plan.records[0])  # the file in the page cache, as in a steady build
    c0 = time.process_time()  # this process only; the writer threads have all finished
    for i in range(n):
        plan.dataset.load(plan.records[i % len(plan.records)])
    return n / (time.process_time() - c0)


def replay_rate(plan, url: str, replay: Replay, workers: int, threads: int) -> float:
    """Entries/s of a whole build (``build_shards``: decode, replay teacher, pool, encode, write), steady state."""
    cfg = dataclasses.replace(plan.config, out=url, loader_workers=workers, writer_threads=threads)
    run = dataclasses.replace(plan, config=cfg, teacher=plan.teacher._replace(model=replay))
    writer, _ = prepare_cache(
        url, plan.schema, image_ids=plan.ids, image_sizes=plan.sizes, views=plan.views, grids=plan.grids
    )
    marks: list[float] = []
    written, _, _ = build_shards(run, writer, writer.pending_shards(), lambda _p: marks.append(time.perf_counter()))
    # from the first teacher batch to the last shard written: the DataLoader's start-up is left out
    return (written - 1) / (marks[-1] - marks[0])


def section_write(p: Profile, device: torch.device, teacher: nn.Module, tmp: Path) -> dict:
    data = write_copies(tmp / "write-data", p.write_entries, p.write_size, unique=1)
    plan = plan_build(
        BuildConfig(teacher="psp101", random_weights=True, data=str(data), out=str(tmp / "w.zarr"), device=str(device))
    )
    logits, feature = stored_outputs(p, device, teacher, plan.teacher.model, plan.grids[0])
    layout = plan.schema.features
    cells = inference.pool_cells(feature, layout.block, layout.pool).numpy()
    rates, per_cpu = {}, {}
    for threads in p.writer_threads:
        url = str(tmp / f"enc{threads}.zarr")
        rates[threads], per_cpu[threads] = encode_rate(plan, url, logits.numpy(), cells, threads)
    decode = decode_rate(plan, min(6, p.write_entries))
    replay = Replay(logits[:1].to(device), feature[:1].to(device))
    builds = [
        {
            "loader_workers": w,
            "writer_threads": t,
            "entries_per_s": replay_rate(plan, str(tmp / f"rep{w}-{t}.zarr"), replay, w, t),
        }
        for w, t in p.replay
    ]
    return {
        "entry": {"logits": list(logits.shape[1:]), "cells": list(cells.shape[1:]), "pool": layout.pool},
        "encode_entries": p.write_entries,
        "encode_entries_per_s": {str(t): r for t, r in rates.items()},
        "per_thread_entries_per_s": rates[1],
        "entries_per_cpu_s": {str(t): r for t, r in per_cpu.items()},
        "per_core_entries_per_s": max(per_cpu.values()),
        "decode_per_core_images_per_s": decode,
        "replay_builds": builds,
        "queue_size": plan.config.queue_size,
    }


def cores_needed(teacher_rate: float, write: dict) -> dict:
    """CPU cores to keep up with ``teacher_rate`` entries/s (dense: one per image).

    ``encode``/``decode``: at one core's measured rate (writer threads / loader workers); ``measured``:
    the fewest writer threads measured to keep up (None: none did).
    """
    measured = [int(t) for t, r in write["encode_entries_per_s"].items() if r >= teacher_rate]
    return {
        "encode": math.ceil(teacher_rate / write["per_core_entries_per_s"]),
        "decode": math.ceil(teacher_rate / write["decode_per_core_images_per_s"]),
        "measured": min(measured) if measured else None,
    }


def print_write(res: dict, teacher_rows: list[dict]) -> None:
    e = res["entry"]
    print(
        f"\n(b) write path alone: {res['encode_entries']} entries of logits {'x'.join(map(str, e['logits']))} + "
        f"{e['pool']}-pooled feature cells {'x'.join(map(str, e['cells']))}, the build's encoder (queue {res['queue_size']})"
    )
    for t, r in res["encode_entries_per_s"].items():
        print(
            f"  {t:>2s} writer thread(s): {r:8.2f} entries/s ({r / int(t):.2f} per thread); "
            f"{res['entries_per_cpu_s'][t]:.2f} entries per CPU second of the writers"
        )
    print(f"  decoding (one loader worker): {res['decode_per_core_images_per_s']:.2f} images per CPU second")
    for b in res["replay_builds"]:
        print(
            f"  whole build with a replay teacher, {b['loader_workers']} loader workers, {b['writer_threads']} writer "
            f"threads: {b['entries_per_s']:.2f} entries/s"
        )
    for r in teacher_rows:
        need = cores_needed(r["images_per_s"], res)
        measured = need["measured"] or f"> {max(int(t) for t in res['encode_entries_per_s'])}"
        print(
            f"  to keep up with the {r['precision']} teacher ({r['images_per_s']:.2f} images/s): {need['encode']} "
            f"encoding + {need['decode']} decoding cores at one core's rate; writer threads measured: {measured}"
        )


# --------------------------------------------------------------------------------------------------
# (c) training step times, (d) loader headroom


def section_train(p: Profile, device: torch.device, tmp: Path) -> dict:
    data = write_copies(tmp / "train-data", p.train_images, p.train_size, unique=4)
    cache = tmp / "dense.zarr"
    t0 = time.perf_counter()
    cfg = BuildConfig(
        teacher=p.teacher,
        random_weights=True,
        data=str(data),
        out=str(cache),
        device=str(device),
        loader_workers=2 if p.train_workers else 0,
    )
    build_cache(cfg)
    build_seconds = time.perf_counter() - t0
    common = dict(
        data=str(data),
        student=p.student,
        iters=p.iters,
        batch_size=p.batch,
        crop=p.crop,
        workers=p.train_workers,
        eval_split="none",
        log_every=1,
        seed=0,
        device=str(device),
    )
    runs = {
        "student only": dict(losses=()),
        "cached KD (dense)": dict(cache=str(cache)),
        "online KD": dict(teacher=p.teacher, teacher_random_weights=True),
    }
    step = {}
    for name, kw in runs.items():
        out = tmp / name.replace(" ", "_").replace("(", "").replace(")", "")
        train(TrainConfig(out=str(out), **common, **kw))
        step[name] = steady_step(out, p.warmup)
    consume = p.batch / step["cached KD (dense)"]
    loader = {
        str(w): loader_rate(str(data), str(cache), p.crop, p.batch, w, p.loader_batches) for w in p.loader_workers
    }
    return {
        "student": p.student,
        "teacher": p.teacher,
        "images": p.train_images,
        "image_size": list(p.train_size),
        "crop": list(p.crop),
        "batch": p.batch,
        "iters": p.iters,
        "warmup": p.warmup,
        "step_s": step,
        "dense_build": {"images": p.train_images, "seconds": build_seconds},
        "loader_samples_per_s": loader,
        "student_consumes_per_s": consume,
    }


def print_train(res: dict) -> None:
    c = res["crop"]
    print(
        f"\n(c) {res['student']} student, {res['teacher']} teacher, crop {c[0]}x{c[1]}, batch {res['batch']}, "
        f"{res['iters']} iterations (steady after {res['warmup']})"
    )
    base, cached = res["step_s"]["student only"], res["step_s"]["cached KD (dense)"]
    print(f"{'run':20s} {'s/step':>8s} {'/ student only':>14s} {'/ cached':>9s}")
    for name, s in res["step_s"].items():
        print(f"{name:20s} {s:8.3f} {s / base:14.3f} {s / cached:9.3f}")
    b = res["dense_build"]
    print(f"dense build of the {b['images']} training images (default precision, whole call): {b['seconds']:.1f} s")
    consume = res["student_consumes_per_s"]
    print(f"\n(d) loader (SegTrainData over the dense store) against the cached-KD student's {consume:.2f} samples/s")
    for w, rate in res["loader_samples_per_s"].items():
        print(f"  {w} worker(s): {rate:8.2f} samples/s = {rate / consume:.1f}x what the student consumes")


# --------------------------------------------------------------------------------------------------
# the FLOPs-based estimate


def section_estimate(write: dict, counted_at: tuple[int, int]) -> dict:
    """GPU teacher rates from psp101's FLOPs (counted at ``counted_at``, scaled by area) and the cores each needs."""
    flops = psp101_flops(counted_at) * (CITYSCAPES[0] * CITYSCAPES[1]) / (counted_at[0] * counted_at[1])
    rows = []
    for precision, peak in PEAK.items():
        for util in UTILISATION:
            rate = util * peak / flops
            need = cores_needed(rate, write)
            rows.append(
                {
                    "precision": precision,
                    "peak_flops": peak,
                    "utilisation": util,
                    "images_per_s": rate,
                    "encode_cores": need["encode"],
                    "decode_cores": need["decode"],
                }
            )
    return {
        "gpu": "H100/H200 SXM (dense peak)",
        "psp101_flops_1024x2048": flops,
        "counted_at": list(counted_at),
        "rows": rows,
    }


def print_estimate(res: dict, write: dict) -> None:
    print(
        f"\nestimate: psp101 at 1024x2048 = {res['psp101_flops_1024x2048'] / 1e12:.2f} TFLOP per image; "
        f"{res['gpu']} at {' / '.join(f'{100 * u:.0f} %' for u in UTILISATION)} of peak; "
        f"one core here encodes {write['per_core_entries_per_s']:.2f} entries and decodes "
        f"{write['decode_per_core_images_per_s']:.2f} images per second"
    )
    print(
        f"{'precision':10s} {'peak TFLOPS':>11s} {'util':>5s} {'images/s':>9s} {'encode cores':>13s} {'decode cores':>13s}"
    )
    for r in res["rows"]:
        print(
            f"{r['precision']:10s} {r['peak_flops'] / 1e12:11.0f} {100 * r['utilisation']:4.0f}% "
            f"{r['images_per_s']:9.1f} {r['encode_cores']:13d} {r['decode_cores']:13d}"
        )


# --------------------------------------------------------------------------------------------------


def pick_profile(args: argparse.Namespace) -> Profile:
    all_ = profiles(os.cpu_count() or 1)
    p = all_["tiny"] if args.tiny else all_["gpu"] if torch.cuda.is_available() and not args.cpu else all_["cpu"]
    if args.tiny and torch.cuda.is_available() and not args.cpu:
        p = dataclasses.replace(p, device="cuda", precisions=all_["gpu"].precisions)
    return p


def banner(p: Profile, info: dict) -> None:
    if p.device == "cuda":
        print(f"GPU run on {info['cuda']} ({info['cores']} CPU cores), profile {p.name}")
    else:
        print(
            f"NO GPU: a CPU-SIZED run (profile {p.name}) on {info['cores']} cores of {info['cpu']}: teacher "
            f"{p.teacher} at {p.size[0]}x{p.size[1]}, student {p.student} at {p.crop[0]}x{p.crop[1]} — these are "
            f"not GPU numbers; run `python3 benchmarks/gpu.py` on a GPU machine for those"
        )
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)


def run_sections(p: Profile, device: torch.device, tmp: Path) -> tuple[dict, dict, dict]:
    """Run (a)-(d), printing each as it ends: (results, seconds per section, errors).

    A section that fails prints its traceback and is recorded; the others still run (a GPU
    machine's time is scarce), and ``main`` exits non-zero.
    """
    res: dict = {}
    clock: dict = {}
    errors: dict = {}
    held: dict = {}

    def teacher() -> None:
        res["teacher"], held["model"] = section_teacher(p, device)
        print_teacher(res["teacher"])

    def write() -> None:
        res["write"] = section_write(p, device, held.pop("model"), tmp)
        rows = res["teacher"]["rows"] if p.teacher == "psp101" and p.size == CITYSCAPES else []
        print_write(res["write"], rows)

    def estimate() -> None:
        res["estimate"] = section_estimate(res["write"], p.flops_size)
        print_estimate(res["estimate"], res["write"])

    def trained() -> None:
        res["train"] = section_train(p, device, tmp)
        print_train(res["train"])

    for name, fn in (("teacher", teacher), ("write", write), ("estimate", estimate), ("train", trained)):
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - reported, recorded, and the exit status says so
            traceback.print_exc()
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"\nsection {name} FAILED: {errors[name]}", flush=True)
        clock[name] = time.perf_counter() - t0
    return res, clock, errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="smoke run: a few small images, 2-3 iterations")
    ap.add_argument("--cpu", action="store_true", help="the CPU-sized run even where a GPU is present")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = ap.parse_args()
    p = pick_profile(args)
    device = torch.device(p.device)
    info = machine()
    banner(p, info)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res, clock, errors = run_sections(p, device, Path(tmp))
    payload = {
        "profile": dataclasses.asdict(p),
        "gpu": p.device == "cuda",
        "load_average_end": list(os.getloadavg()),
        "seconds": time.perf_counter() - t0,
        "section_seconds": clock,
        **res,
        "errors": errors,
    }
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in clock.items())
    print(f"\ntotal {payload['seconds']:.0f} s ({parts})")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, **payload}, indent=2))
        print(f"JSON: {args.json}")
    if p.name != "tiny":
        print(f"raw numbers: {save('gpu' if p.device == 'cuda' else 'gpu_cpu_sized', payload)}")
    if errors:
        raise SystemExit(f"failed sections: {', '.join(errors)}")


if __name__ == "__main__":
    main()
