"""Evaluation of a segmentation model on a labelled split: mIoU, per-class IoU, pixel accuracy.

The official SKD protocol (skd_spec §4, ``networks/evaluate.py::evaluate_main(whole=True)``):

* the **whole** image in one forward (1024x2048 for Cityscapes), single scale, no flip;
* the stride-8 logits upsampled bilinearly with ``align_corners=True`` to the image size, argmax;
* a confusion matrix over the pixels whose ground truth is not ``255``.

IoU follows ``cityscapesscripts`` (``evalPixelLevelSemanticLabeling``): ``TP / (TP + FP + FN)``,
NaN for a class with ``TP + FP + FN == 0`` (absent from both the ground truth and the predictions),
and the mIoU is the mean over the classes with a defined IoU. The official SKD code divides by
``max(1, TP + FP + FN)`` and averages over *all* classes, i.e. an absent class counts as 0; the two
agree whenever every class occurs (always the case on the full Cityscapes val split).
:attr:`EvalResult.official_miou` gives that number too.

``mode="slide"`` is the official (unused) ``predict_sliding``: tiles of ``tile`` pixels with stride
``ceil(tile * (1 - overlap))``, the last tile of a row/column shifted back to end at the border, a
tile padded (NaN, i.e. 0 after normalisation) to the tile size only where the image is smaller,
each tile's logits upsampled (``align_corners=True``) to the tile, cropped, summed and divided by
the number of tiles that cover each pixel.

Saved predictions (``save_predictions``) are 8-bit PNGs of the image's size, one per image, in one of
:data:`PREDICTION_FORMATS`: ``trainid`` (``<folder>/<id>.png``, the class index), ``color`` (the same
path, the dataset palette as RGB) or ``labelid`` (Cityscapes only: the official label id of each
pixel's train id, at ``<folder>/<id>_leftImg8bit.png``, e.g.
``val/frankfurt/frankfurt_000000_000294_leftImg8bit.png``). Label-id files are what the official
evaluator (``cityscapesscripts``' ``evalPixelLevelSemanticLabeling``, which finds a prediction by the
pattern ``{city}_{seq}_{frame}*.png`` anywhere under its results folder) and the benchmark server read;
its mIoU on them equals skd's (tested).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from cache_tools.datasets import ID_TO_TRAIN_ID, IGNORE_INDEX, SegDataset, open_dataset
from cache_tools.errors import ConfigError, DatasetError, SchemaMismatchError
from pipeline.inference import autocast, pick_device, tile_starts

__all__ = [
    "MODES",
    "PREDICTION_FORMATS",
    "EvalResult",
    "confusion_matrix",
    "iou_from_confusion",
    "predict_whole",
    "predict_slide",
    "evaluate_model",
    "evaluate_checkpoint",
]

#: Inference modes of :func:`evaluate_model`.
MODES = ("whole", "slide")
#: Formats of saved predictions: train ids (class indices), Cityscapes label ids, palette colours.
PREDICTION_FORMATS = ("trainid", "labelid", "color")


# ----------------------------------------------------------------------------------------------------
# metrics


def _finite_or_none(v: float) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


@dataclass
class EvalResult:
    """What :func:`evaluate_model` measured.

    Attributes:
        miou: mean IoU over the classes with a defined IoU (cityscapesscripts); NaN when none is.
        pixel_accuracy: correctly predicted / evaluated pixels (ground truth != ignore).
        per_class: class name -> IoU, ``None`` where undefined (TP + FP + FN == 0).
        class_names: the dataset's class names, in train-id order.
        confusion: (K, K) int64, rows = ground truth, columns = prediction.
        images: how many images were evaluated.
        mode: "whole" or "slide".
        seconds: wall time of the evaluation loop.
    """

    miou: float
    pixel_accuracy: float
    per_class: dict[str, float | None]
    class_names: list[str]
    confusion: np.ndarray
    images: int
    mode: str
    seconds: float

    @property
    def official_miou(self) -> float:
        """The official SKD code's number: mean over *all* classes of TP / max(1, TP + FP + FN)."""
        conf = np.asarray(self.confusion, dtype=np.int64)
        tp = np.diag(conf).astype(np.float64)
        denom = conf.sum(0) + conf.sum(1) - np.diag(conf)
        return float(np.mean(tp / np.maximum(1, denom))) if len(tp) else float("nan")

    def to_dict(self) -> dict:
        """A JSON-able dict (NaN -> None, the confusion matrix as nested lists)."""
        return {
            "miou": _finite_or_none(self.miou),
            "official_miou": _finite_or_none(self.official_miou),
            "pixel_accuracy": _finite_or_none(self.pixel_accuracy),
            "per_class": {k: (None if v is None else _finite_or_none(v)) for k, v in self.per_class.items()},
            "class_names": list(self.class_names),
            "confusion": np.asarray(self.confusion, dtype=np.int64).tolist(),
            "images": int(self.images),
            "mode": self.mode,
            "seconds": float(self.seconds),
        }


def confusion_matrix(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """(K, K) int64 counts, rows = ground truth, columns = prediction, over pixels with ``gt != ignore_index``.

    Raises:
        ValueError: shapes differ, or a prediction lies outside ``[0, K)``.
        DatasetError: a ground-truth value (other than ``ignore_index``) lies outside ``[0, K)``.
    """
    k = int(num_classes)
    if k < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    if pred.size and (pred.min() < 0 or pred.max() >= k):
        bad = np.unique(pred[(pred < 0) | (pred >= k)])[:10].tolist()
        raise ValueError(f"predictions {bad} outside the class range [0, {k})")
    valid = gt != ignore_index
    g = gt[valid].astype(np.int64, copy=False)
    p = pred[valid].astype(np.int64, copy=False)
    if g.size and (g.min() < 0 or g.max() >= k):
        bad = np.unique(g[(g < 0) | (g >= k)])[:10].tolist()
        raise DatasetError(f"ground-truth values {bad} outside the class range [0, {k}) (ignore = {ignore_index})")
    return np.bincount(g * k + p, minlength=k * k).reshape(k, k).astype(np.int64, copy=False)


def iou_from_confusion(conf: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-class IoU ``TP / (TP + FP + FN)`` (NaN where that is 0/0) and the mIoU (their NaN-mean)."""
    conf = np.asarray(conf, dtype=np.int64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {conf.shape}")
    tp = np.diag(conf).astype(np.float64)
    denom = (conf.sum(0) + conf.sum(1)).astype(np.float64) - tp
    iou = np.full(tp.shape, np.nan)
    np.divide(tp, denom, out=iou, where=denom > 0)
    defined = iou[~np.isnan(iou)]
    miou = float(defined.mean()) if defined.size else float("nan")
    return iou, miou


# ----------------------------------------------------------------------------------------------------
# prediction


def _logits_of(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"model returned {type(out).__name__}; expected a SegOutput (or a logits tensor)")


def _as_batch(image: Tensor) -> Tensor:
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise ValueError(f"expected one raw RGB image (3, H, W), got shape {tuple(image.shape)}")
    return image


def _forward(model: nn.Module, x: Tensor, size: tuple[int, int], device: torch.device, amp: bool) -> Tensor:
    """(1, 3, h, w) -> (1, K, *size) float32 logits, upsampled with align_corners=True when needed."""
    with autocast(device, amp):
        logits = _logits_of(model(x.to(device, torch.float32, non_blocking=True)))
    logits = logits.float()
    if logits.ndim != 4 or logits.shape[0] != 1:
        raise ValueError(f"model returned logits of shape {tuple(logits.shape)}; expected (1, K, h, w)")
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
    return logits


def predict_whole(model: nn.Module, image: Tensor, *, device: torch.device | str, amp: bool = True) -> Tensor:
    """Whole-image inference: raw (3, H, W) pixels -> (K, H, W) float32 logits on ``device``.

    The model's logits (stride-8 grid, or already at the image size) are upsampled bilinearly with
    ``align_corners=True`` to (H, W), as the official evaluation does. Call under
    ``torch.inference_mode()`` (``evaluate_model`` does) with the model in eval mode.
    """
    device = torch.device(device)
    x = _as_batch(image)
    return _forward(model, x, (int(x.shape[-2]), int(x.shape[-1])), device, amp)[0]


def _check_tile(tile, overlap) -> tuple[tuple[int, int], float]:
    if isinstance(tile, int) and not isinstance(tile, bool):
        tile = (tile, tile)
    try:
        th, tw = (int(v) for v in tile)
    except (TypeError, ValueError):
        raise ConfigError(f"tile must be (height, width) in pixels, got {tile!r}") from None
    if (th, tw) != tuple(tile) or th < 1 or tw < 1:
        raise ConfigError(f"tile must be two positive integers (height, width), got {tile!r}")
    try:
        ov = float(overlap)
    except (TypeError, ValueError):
        raise ConfigError(f"overlap must be a number in [0, 1), got {overlap!r}") from None
    if not 0.0 <= ov < 1.0:
        raise ConfigError(f"overlap must be in [0, 1), got {overlap!r}")
    return (th, tw), ov


def predict_slide(
    model: nn.Module,
    image: Tensor,
    *,
    tile: tuple[int, int] = (512, 512),
    overlap: float = 1 / 3,
    device: torch.device | str,
    amp: bool = True,
) -> Tensor:
    """Sliding-window inference (the official ``predict_sliding``): (3, H, W) -> (K, H, W) float32.

    Tiles of ``tile`` pixels placed by :func:`pipeline.inference.tile_starts` (stride
    ``ceil(tile * (1 - overlap))``, the last tile of a row/column flush with the image border); a tile is padded with NaN (0 after the
    model's normalisation) at the bottom/right only where the image is smaller than the tile. Each
    tile's logits are upsampled (``align_corners=True``) to the tile size, cropped to the image part,
    summed, and divided by the number of tiles covering each pixel.
    """
    (th, tw), ov = _check_tile(tile, overlap)
    device = torch.device(device)
    x = _as_batch(image)
    H, W = int(x.shape[-2]), int(x.shape[-1])
    acc: Tensor | None = None
    count = torch.zeros(1, 1, H, W, device=device)
    for y0 in tile_starts(H, th, ov):
        for x0 in tile_starts(W, tw, ov):
            y1, x1 = min(y0 + th, H), min(x0 + tw, W)
            crop = x[:, :, y0:y1, x0:x1]
            if (y1 - y0, x1 - x0) != (th, tw):
                padded = torch.full((1, 3, th, tw), float("nan"), dtype=torch.float32, device=crop.device)
                padded[:, :, : y1 - y0, : x1 - x0] = crop
                crop = padded
            logits = _forward(model, crop, (th, tw), device, amp)[:, :, : y1 - y0, : x1 - x0]
            if acc is None:
                acc = logits.new_zeros(1, logits.shape[1], H, W)
            acc[:, :, y0:y1, x0:x1] += logits
            count[:, :, y0:y1, x0:x1] += 1
    assert acc is not None  # at least one tile per axis
    return (acc / count)[0]


# ----------------------------------------------------------------------------------------------------
# evaluation


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"evaluation mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _prediction_path(out_dir: Path, ds: SegDataset, image_id: str, suffix: str = ".png") -> Path:
    """``<out_dir>/<id><suffix>`` for a dataset id, refusing anything that would leave ``out_dir``."""
    ds.resolve_id(image_id)  # safe relative id that belongs to the dataset (DatasetError otherwise)
    root = os.path.normpath(os.path.abspath(out_dir))
    path = os.path.normpath(os.path.join(root, *image_id.split("/"))) + suffix
    if os.path.commonpath([root, path]) != root:  # pragma: no cover - resolve_id already refuses this
        raise DatasetError(f"image id {image_id!r} would write outside {out_dir}")
    return Path(path)


def _train_to_label_ids() -> np.ndarray:
    """uint8 table train id (0..18) -> Cityscapes label id, inverting the reader's official table."""
    out = np.zeros(19, dtype=np.uint8)
    for t in range(19):
        ids = np.flatnonzero(np.equal(ID_TO_TRAIN_ID, t))
        if len(ids) != 1:  # pragma: no cover - the official table maps one label id to each train id
            raise RuntimeError(f"train id {t} has {len(ids)} Cityscapes label ids")
        out[t] = ids[0]
    return out


def _prediction_encoder(ds: SegDataset, fmt: str) -> tuple[np.ndarray | None, str]:
    """(lookup table from class index to the stored pixel, file suffix) for a prediction format."""
    k = ds.num_classes
    if fmt not in PREDICTION_FORMATS:
        raise ConfigError(f"prediction format must be one of {', '.join(PREDICTION_FORMATS)}, got {fmt!r}")
    if fmt == "color":
        palette = np.asarray(ds.palette, dtype=np.uint8)
        if palette.shape != (k, 3):
            raise DatasetError(f"the dataset palette has shape {palette.shape}, expected ({k}, 3)")
        return palette, ".png"
    if fmt == "labelid":
        if ds.name != "cityscapes" or k != 19:
            raise ConfigError(
                f"label-id predictions are Cityscapes label ids; the {ds.name} dataset has none "
                "(use --prediction-format trainid or color)"
            )
        return _train_to_label_ids(), "_leftImg8bit.png"
    if k > 256:
        raise ConfigError(f"cannot write {k} classes as 8-bit train-id PNGs; use --prediction-format color")
    return None, ".png"


def _save_prediction(path: Path, pred: np.ndarray, lut: np.ndarray | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if lut is not None and lut.ndim == 2:
        img = Image.fromarray(np.ascontiguousarray(lut[pred]), mode="RGB")
    else:
        pixels = pred.astype(np.uint8) if lut is None else lut[pred]
        img = Image.fromarray(np.ascontiguousarray(pixels), mode="L")
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def evaluate_model(
    model: nn.Module,
    data_root: str,
    *,
    split: str = "val",
    mode: str = "whole",
    tile: tuple[int, int] = (512, 512),
    overlap: float = 1 / 3,
    device: torch.device | str | None = None,
    amp: bool = True,
    save_predictions: str | None = None,
    prediction_format: str = "trainid",
    progress: Callable[[int, int], None] | None = None,
    limit: int | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``split`` of the dataset at ``data_root``, one image at a time.

    Args:
        model: a model of the project contract (raw RGB input, ``SegOutput``); put in eval mode for
            the run (its previous mode is restored) and moved to ``device`` if it is elsewhere.
        mode: "whole" (official) or "slide" (``tile``, ``overlap``).
        device: where to run; ``None`` = where the model's parameters are.
        amp: autocast on CUDA (a no-op on CPU).
        save_predictions: a folder; each prediction is written there as a PNG of the image's size.
        prediction_format: ``"trainid"`` (``<folder>/<id>.png``, 8-bit class indices), ``"color"``
            (same path, the dataset palette as RGB) or ``"labelid"`` (Cityscapes label ids as 8-bit
            grey at ``<folder>/<id>_leftImg8bit.png``, for the official evaluator and benchmark).
        progress: called as ``progress(done, total)`` after each image.
        limit: evaluate only the first ``limit`` images (sorted by id).

    Raises:
        ConfigError: bad mode, tile, overlap, limit or prediction format (``labelid`` off Cityscapes).
        DatasetError: missing split or dataset, an image without a label.
        SchemaMismatchError: the model's class count differs from the dataset's.
    """
    _check_mode(mode)
    if mode == "slide":
        tile, overlap = _check_tile(tile, overlap)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"limit must be a non-negative integer, got {limit!r}")
    ds = _labelled_dataset(data_root, split, getattr(model, "num_classes", None))
    out_dir = Path(save_predictions).expanduser() if save_predictions else None
    lut, suffix = _prediction_encoder(ds, prediction_format)
    device = _model_device(model) if device is None else torch.device(device)
    if _model_device(model) != device:
        model.to(device)

    def predict(x: Tensor) -> Tensor:
        if mode == "whole":
            return predict_whole(model, x, device=device, amp=amp)
        return predict_slide(model, x, tile=tile, overlap=overlap, device=device, amp=amp)

    n = len(ds) if limit is None else min(limit, len(ds))
    conf = np.zeros((ds.num_classes, ds.num_classes), dtype=np.int64)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for i in range(n):
                pred, label = _predict_image(ds, i, predict, split, data_root)
                conf += confusion_matrix(pred, label, ds.num_classes, ds.ignore_index)
                if out_dir is not None:
                    _save_prediction(_prediction_path(out_dir, ds, ds.records[i].id, suffix), pred, lut)
                if progress is not None:
                    progress(i + 1, n)
    finally:
        model.train(was_training)
    return _eval_result(conf, ds, n, mode, time.perf_counter() - start)


def _labelled_dataset(data_root: str, split: str, model_classes: Any) -> SegDataset:
    """The split to evaluate: every image labelled, the model's class count (when it says one)."""
    ds = open_dataset(data_root, (split,))
    if ds.unlabelled_splits:
        raise DatasetError(
            f"split {split!r} of {data_root} has no labels, so it cannot be evaluated; "
            "pass a labelled split (e.g. --split val)"
        )
    if isinstance(model_classes, int) and model_classes != ds.num_classes:
        raise SchemaMismatchError(
            f"the model predicts {model_classes} classes but the {ds.name} dataset at {data_root} has "
            f"{ds.num_classes}; evaluate on the dataset the model was trained for"
        )
    return ds


def _predict_image(
    ds: SegDataset, i: int, predict: Callable[[Tensor], Tensor], split: str, data_root: str
) -> tuple[np.ndarray, np.ndarray]:
    """(prediction (H, W) int32, label) of image ``i``; refuses an unlabelled image or the wrong class count."""
    image, label, _ = ds.load(i)
    if label is None:
        raise DatasetError(f"image {ds.records[i].id!r} has no label file; cannot evaluate split {split!r}")
    logits = predict(torch.from_numpy(image).permute(2, 0, 1).float())
    if logits.shape[0] != ds.num_classes:
        raise SchemaMismatchError(
            f"the model predicts {logits.shape[0]} classes but the {ds.name} dataset at "
            f"{data_root} has {ds.num_classes}; evaluate on the dataset the model was trained for"
        )
    return logits.argmax(0).to(torch.int32).cpu().numpy(), label


def _eval_result(conf: np.ndarray, ds: SegDataset, images: int, mode: str, seconds: float) -> EvalResult:
    iou, miou = iou_from_confusion(conf)
    total = int(conf.sum())
    names = [str(c) for c in ds.class_names]
    return EvalResult(
        miou=miou,
        pixel_accuracy=float(np.trace(conf) / total) if total else float("nan"),
        per_class={name: _finite_or_none(v) for name, v in zip(names, iou, strict=True)},
        class_names=names,
        confusion=conf,
        images=images,
        mode=mode,
        seconds=seconds,
    )


def evaluate_checkpoint(checkpoint: str, data_root: str, **kwargs) -> EvalResult:
    """Load a training checkpoint or ``model.safetensors`` and :func:`evaluate_model` it.

    ``device=None`` (the default here) picks CUDA when present. Other keyword arguments go to
    :func:`evaluate_model`.

    Raises:
        WeightsError: the checkpoint cannot be read.
        SchemaMismatchError: its class count differs from the dataset's.
    """
    from .checkpoint import load_model

    _check_mode(kwargs.get("mode", "whole"))
    ds = open_dataset(data_root, (kwargs.get("split", "val"),))
    model = load_model(checkpoint)
    model_k = getattr(model, "num_classes", None)
    if model_k is not None and int(model_k) != ds.num_classes:
        raise SchemaMismatchError(
            f"checkpoint {checkpoint} predicts {model_k} classes but the {ds.name} dataset at {data_root} "
            f"has {ds.num_classes}; evaluate it on the dataset it was trained for"
        )
    device = kwargs.pop("device", None)
    device = pick_device("auto") if device is None else torch.device(device)
    return evaluate_model(model.to(device), data_root, device=device, **kwargs)
