"""Running a teacher: device and autocast choice, output grids, whole-image and sliding inference."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models.base import SegOutput

__all__ = ["pick_device", "autocast", "output_grid", "run_teacher", "slide_teacher", "pool_cells"]


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """fp16/bf16 autocast on CUDA; a no-op on CPU (bf16 is slower than fp32 on CPUs without AMX)."""
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        with torch.autocast("cuda", dtype=dtype):
            yield
    else:
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


def run_teacher(model: nn.Module, x: Tensor, device: torch.device, amp: bool = True) -> tuple[Tensor, Tensor]:
    """Teacher forward in eval mode: (logits, feature) as float32 on the model's device."""
    with torch.inference_mode(), autocast(device, amp):
        out: SegOutput = model(x.to(device, non_blocking=True))
    return out.logits.float(), out.feature.float()


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


def slide_teacher(
    model: nn.Module,
    image: Tensor,
    grid: tuple[int, int],
    tile: tuple[int, int],
    overlap: float,
    device: torch.device,
    amp: bool = True,
) -> tuple[Tensor, Tensor]:
    """Teacher on overlapping tiles of one whole image, merged on the image's grid.

    Each tile's stride-8 maps are resampled bilinearly (``align_corners=True`` node positions)
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
    sy, sx = max(1, int(th * (1 - overlap))), max(1, int(tw * (1 - overlap)))
    logits_acc = feat_acc = None
    count = torch.zeros(1, 1, h0, w0, device=device)
    for y in _tile_starts(H, th, sy):
        for x in _tile_starts(W, tw, sx):
            z, f = run_teacher(model, image[:, :, y : y + th, x : x + tw], device, amp)
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


def pool_cells(feature: Tensor, block: tuple[int, int], mode: str) -> Tensor:
    """(B, C, h, w) -> (B, C, ceil(h/bh), ceil(w/bw)), kernel = stride = block, ceil mode."""
    if block == (1, 1):
        return feature
    if mode == "max":
        return F.max_pool2d(feature, kernel_size=block, stride=block, ceil_mode=True)
    # partial last cells average over their real extent (no zero padding counted)
    return F.avg_pool2d(feature, kernel_size=block, stride=block, ceil_mode=True, count_include_pad=False)
