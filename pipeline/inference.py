"""Running a teacher: device and precision choice, output grids, whole-image and sliding inference.

Teacher precision (:func:`teacher_precision`) is a recorded choice, fp32 by default: bf16 keeps 8
significant bits (~3 decimal digits) per value and the rounding of every layer accumulates, so a
bf16 teacher's logits differ from the fp32 teacher's by far more than the default gap-u8 codec's
error (KL(T=1) 17x to 3,000x the codec's on the CPU teachers of docs/benchmarks.md); the stored
targets would then be further from the fp32 teacher than the codec fidelity a store reports.
``skdcache build`` measures the chosen precision's error against an fp32 forward and records it
beside the codec fidelity.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cache_tools.errors import ConfigError
from cache_tools.fidelity import pool_cells  # the one cell pooling, shared with the student

from .models.base import SegOutput

__all__ = [
    "PRECISIONS",
    "autocast",
    "check_precision",
    "output_grid",
    "pick_device",
    "pool_cells",
    "run_teacher",
    "slide_teacher",
    "teacher_precision",
    "tile_starts",
]

#: The teacher's arithmetic: fp32 (exact, TF32 off), tf32 (CUDA matmuls/convolutions in TF32),
#: fp16 / bf16 (autocast; bf16 also on CPU, for measurement).
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cpu', 'cuda' or 'cuda:N' as asked, checked to exist.

    Raises:
        ConfigError: an unknown device name, or a CUDA device this machine does not have.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"--device {device}: no CUDA GPU is available here; use --device cpu (or auto)")
    if dev.index is not None and dev.index >= count:
        raise ConfigError(f"--device {device}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    return dev


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """fp16/bf16 autocast on CUDA; a no-op on CPU (bf16 is slower than fp32 on CPUs without AMX).

    The student's mixed precision; the teacher's is :func:`teacher_precision`.
    """
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        with torch.autocast("cuda", dtype=dtype):
            yield
    else:
        yield


def check_precision(device: torch.device, precision: str, flag: str = "--precision") -> None:
    """Refuse a precision this device cannot run (before anything runs).

    Raises:
        ConfigError: an unknown name, fp16/tf32 on CPU, or bf16 on a GPU without bf16.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"{flag} must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if device.type == "cpu" and precision in ("fp16", "tf32"):
        raise ConfigError(f"{flag} {precision}: on CPU the teacher runs in fp32 (or bf16 when asked); use {flag} fp32")
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{flag} bf16: this GPU has no bf16 arithmetic; use {flag} fp32 (or fp16)")


@contextlib.contextmanager
def _tf32(device: torch.device, allowed: bool) -> Iterator[None]:
    """CUDA TF32 for matmuls and cuDNN convolutions on or off, the previous flags restored after.

    Off matters for fp32: cuDNN convolutions default to TF32 on Ampere and later GPUs.
    """
    if device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


@contextlib.contextmanager
def teacher_precision(device: torch.device, precision: str = "fp32", flag: str = "--precision") -> Iterator[None]:
    """Run the teacher's forward in ``precision`` (one of :data:`PRECISIONS`) on ``device``.

    fp32: autocast off, TF32 off (bit-identical to a plain fp32 forward); tf32: fp32 with CUDA TF32
    matmuls and convolutions; fp16 / bf16: ``torch.autocast`` with that dtype (bf16 on CPU too, only
    when asked). Global TF32 flags are restored on exit. The online teacher of ``skdstudent train``
    uses it the same way the build does.

    Raises:
        ConfigError: see :func:`check_precision`.
    """
    check_precision(device, precision, flag)
    if precision in ("fp16", "bf16"):
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        with torch.autocast(device.type, dtype=dtype):
            yield
        return
    # explicit off: the teacher may be called inside the student's autocast region
    with torch.autocast(device.type, enabled=False), _tf32(device, precision == "tf32"):
        yield


def output_grid(model: nn.Module, h: int, w: int) -> tuple[int, int]:
    """The (h, w) of a model's logits for an (h, w) input, without running it at full cost.

    Built-in models answer from their arithmetic (``model.output_grid``); any other model is run
    once on the meta device (shapes only, no compute, no memory).
    """
    fn = getattr(model, "output_grid", None)
    if callable(fn):
        return tuple(fn(h, w))  # type: ignore[return-value]
    meta = copy.deepcopy(model).to("meta").eval()
    with torch.no_grad():
        out = meta(torch.empty(1, 3, h, w, device="meta"))
    return int(out.logits.shape[-2]), int(out.logits.shape[-1])


def run_teacher(model: nn.Module, x: Tensor, device: torch.device, precision: str = "fp32") -> tuple[Tensor, Tensor]:
    """Teacher forward in eval mode at ``precision``: (logits, feature) as float32 on the model's device."""
    with torch.inference_mode(), teacher_precision(device, precision):
        out: SegOutput = model(x.to(device, non_blocking=True))
    return out.logits.float(), out.feature.float()


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Origins of the sliding-window tiles along one axis: the official ``predict_sliding`` rule (as
    CIRKD's and mmseg's ``slide_inference``).

    The stride is ``ceil(tile * (1 - overlap))`` (at least 1) and there are
    ``max(ceil((length - tile) / stride), 0) + 1`` tiles; tile ``i`` starts at ``i * stride``, except
    the last, which is moved back to end flush with the edge (a single tile at 0 when the axis is not
    longer than a tile: the caller clips or pads it). 1024 pixels, tile 512, overlap 1/3 -> stride
    342 -> ``[0, 342, 512]``.
    """
    stride = max(1, math.ceil(tile * (1 - overlap)))
    n = max(1, math.ceil((length - tile) / stride) + 1)
    return [max(min(i * stride + tile, length) - tile, 0) for i in range(n)]


def slide_teacher(
    model: nn.Module,
    image: Tensor,
    grid: tuple[int, int],
    tile: tuple[int, int],
    overlap: float,
    device: torch.device,
    precision: str = "fp32",
) -> tuple[Tensor, Tensor]:
    """Teacher on overlapping tiles of one whole image, merged on the image's grid.

    Tiles (at most the image's size) are placed by :func:`tile_starts`, the rule the student's
    ``predict_slide`` uses too. Each tile's stride-8 maps are resampled bilinearly (``align_corners=True`` node positions)
    onto the image-grid nodes the tile covers, and overlapping tiles are averaged: the same
    answer as whole-image inference up to the tiles' different context, at a fraction of the
    memory (the official code's ``predict_sliding`` does the same at pixel resolution).

    Args:
        image: (1, 3, H, W) raw pixels.
        grid: (h0, w0) the image's grid.
    """
    _, _, H, W = image.shape
    h0, w0 = grid
    th, tw = min(tile[0], H), min(tile[1], W)
    logits_acc = feat_acc = None
    count = torch.zeros(1, 1, h0, w0, device=device)
    for y in tile_starts(H, th, overlap):
        for x in tile_starts(W, tw, overlap):
            z, f = run_teacher(model, image[:, :, y : y + th, x : x + tw], device, precision)
            gh, gw = z.shape[-2:]
            # image-grid nodes inside the tile and their coordinates on the tile's grid
            ys = torch.arange(h0, device=device, dtype=torch.float64) * ((H - 1) / max(h0 - 1, 1))
            xs = torch.arange(w0, device=device, dtype=torch.float64) * ((W - 1) / max(w0 - 1, 1))
            iy = ((ys >= y) & (ys <= y + th - 1)).nonzero().flatten()
            ix = ((xs >= x) & (xs <= x + tw - 1)).nonzero().flatten()
            if not len(iy) or not len(ix):
                continue
            ty = (ys[iy] - y) * ((gh - 1) / max(th - 1, 1))
            tx = (xs[ix] - x) * ((gw - 1) / max(tw - 1, 1))
            # grid_sample with align_corners=True: -1..1 spans the first..last node
            gy = (ty / max(gh - 1, 1) * 2 - 1).float()
            gx = (tx / max(gw - 1, 1) * 2 - 1).float()
            sample_grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
            zs = F.grid_sample(z, sample_grid, mode="bilinear", align_corners=True)
            fs = F.grid_sample(f, sample_grid, mode="bilinear", align_corners=True)
            if logits_acc is None:
                logits_acc = z.new_zeros(1, z.shape[1], h0, w0)
                feat_acc = f.new_zeros(1, f.shape[1], h0, w0)
            sl = (slice(None), slice(None), slice(int(iy[0]), int(iy[-1]) + 1), slice(int(ix[0]), int(ix[-1]) + 1))
            logits_acc[sl] += zs
            feat_acc[sl] += fs
            count[sl] += 1
    assert logits_acc is not None and feat_acc is not None
    count = count.clamp(min=1)
    return logits_acc / count, feat_acc / count
