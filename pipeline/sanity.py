"""The teacher sanity gate: a teacher that scores near chance on labelled images is not cached.

A teacher that loads without error can still be useless: an input normalisation other than the one
it was trained with (RGB mean/std for mmseg, BGR mean-only for SKD and CIRKD), a class count or
order other than the dataset's, or a classifier left at its initialisation. :func:`teacher_sanity`
runs the teacher on a few labelled images (whole-image inference, logits resized to the label with
the family's ``align_corners``, argmax) and measures mIoU (classes with a defined IoU, as
cityscapesscripts does) and pixel accuracy over the pixels whose label is not ignored.

**Chance level.** Two predictors that ignore the image set it: the majority class everywhere
(IoU ``f_max`` for that class, 0 for every other labelled class: mIoU ``f_max / n``, with ``n``
classes present in the labels) and guessing each pixel from the labels' class frequencies ``p_c``
(expected IoU ``p_c / (2 - p_c)`` per class). ``chance_miou`` is the larger of the two mIoUs, measured
on the same pixels as the teacher. A teacher is **near chance** when its mIoU is below
``factor × chance_miou`` (``factor`` 2 by default: 5.4% on Cityscapes val, where chance is about
2.7%, against 74–80% for the published teachers and well above 10% for a teacher after a few
hundred iterations on the sample data). It has **collapsed** when two classes take at least 95% of
its predictions while the labels' two largest classes cover at most 80% of the pixels, whatever the
mIoU. Either verdict makes :meth:`SanityResult.problem` return one line naming the likely causes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cache_tools.datasets import SegDataset
from cache_tools.errors import DatasetError, ModelError, WeightsError
from pipeline.families import family_of
from pipeline.inference import run_teacher
from pipeline.models.base import InputNormSpec

__all__ = ["SanityResult", "chance_miou", "check_teacher", "classifier_untrained", "pick_indices", "teacher_sanity"]

#: Collapse: the two most predicted classes take at least this share of the predicted pixels ...
COLLAPSE_SHARE = 0.95
#: ... while the labels' two largest classes cover at most this share.
LABEL_SPREAD = 0.80
#: The classifier's bias, by family layout (the first present is checked by :func:`classifier_untrained`).
CLASSIFIER_BIASES = ("decode_head.conv_seg.bias", "head.block.4.bias", "head.bias", "head.1.bias")


def miou_from_confusion(conf: np.ndarray) -> float:
    """Mean of ``TP / (TP + FP + FN)`` over the classes where that is defined (NaN when none is)."""
    tp = np.diag(conf).astype(np.float64)
    denom = conf.sum(0) + conf.sum(1) - np.diag(conf)
    defined = denom > 0
    return float((tp[defined] / denom[defined]).mean()) if defined.any() else float("nan")


def chance_miou(label_histogram: np.ndarray) -> float:
    """The better mIoU of the two image-blind predictors (see the module docstring)."""
    counts = np.asarray(label_histogram, dtype=np.float64)
    total = counts.sum()
    present = counts > 0
    if total == 0:
        return float("nan")
    p = counts[present] / total
    majority = p.max() / present.sum()
    by_frequency = float(np.mean(p / (2.0 - p)))
    return float(max(majority, by_frequency))


def classifier_untrained(model: nn.Module) -> str | None:
    """The classifier bias key when it is exactly zero (its initial value: trained biases never are)."""
    sd = model.state_dict()
    key = next((k for k in CLASSIFIER_BIASES if k in sd), None)
    if key is None:
        return None
    return key if not bool(sd[key].detach().ne(0).any()) else None


def pick_indices(dataset: SegDataset, count: int) -> list[int]:
    """``count`` labelled records spread evenly over the dataset (all of them when fewer).

    Raises:
        DatasetError: the dataset holds no labelled image.
    """
    labelled = np.flatnonzero(dataset.labelled)
    if labelled.size == 0:
        raise DatasetError(
            f"the teacher check needs labelled images, and splits {', '.join(dataset.splits)} of {dataset.root} "
            "have none; give --check-split val, or --no-teacher-check to skip the check"
        )
    if count >= labelled.size:
        return labelled.tolist()
    picks = np.linspace(0, labelled.size - 1, num=max(1, count)).round().astype(np.int64)
    return labelled[np.unique(picks)].tolist()


@dataclass
class SanityResult:
    """What :func:`teacher_sanity` measured, and its verdict.

    Attributes:
        miou, pixel_accuracy: over the evaluated (non-ignored) pixels.
        images, pixels: how many labelled images and pixels were evaluated.
        histogram: (K,) predicted pixels per class; label_histogram: (K,) labelled pixels per class.
        chance_miou: the image-blind predictors' mIoU on the same pixels; threshold = factor x it.
        verdict: "ok", "near chance" or "collapsed".
        model_name, family, normalization: the teacher's, for the message.
        untrained_classifier: the classifier bias key when it is still all zero, else None.
        load_summary: how the weights were loaded (``LoadReport.summary()``), None for random weights.
    """

    miou: float
    pixel_accuracy: float
    images: int
    pixels: int
    histogram: np.ndarray
    label_histogram: np.ndarray
    chance_miou: float
    threshold: float
    verdict: str
    model_name: str
    family: str
    normalization: InputNormSpec
    untrained_classifier: str | None = None
    load_summary: str | None = None

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    def top_prediction(self) -> tuple[int, float]:
        """(class, share of the predicted pixels) of the most predicted class."""
        total = max(int(self.histogram.sum()), 1)
        c = int(np.argmax(self.histogram))
        return c, float(self.histogram[c]) / total

    def line(self) -> str:
        """One line for logs and ``skdcache info``."""
        return (
            f"teacher check: mIoU {100 * self.miou:.1f}%, pixel accuracy {100 * self.pixel_accuracy:.1f}% on "
            f"{self.images} labelled images (chance {100 * self.chance_miou:.1f}%): {self.verdict}"
        )

    def problem(self) -> str | None:
        """None when the teacher passed; else one line with the measurement and the likely causes."""
        if self.ok:
            return None
        c, share = self.top_prediction()
        what = (
            f"teacher {self.model_name} scores mIoU {100 * self.miou:.1f}% on {self.images} labelled images, "
            f"near chance ({100 * self.chance_miou:.1f}%)"
        )
        if self.verdict == "collapsed" or share >= 0.5:
            what += f"; it predicts class {c} on {100 * share:.0f}% of the pixels"
        causes = [
            f"input normalisation (this {self.family} model expects {_norm_words(self.normalization)}; a checkpoint "
            "trained with another normalisation belongs to another family, see `skdcache weights FILE`)",
            f"class count or order (the model outputs {len(self.histogram)} classes in the dataset's train-id order)",
        ]
        if self.untrained_classifier:
            causes.append(f"a head that did not load ({self.untrained_classifier} is still all zero)")
        elif self.load_summary:
            causes.append(f"a head that did not load ({self.load_summary})")
        else:
            causes.append("a head that did not load (random weights)")
        return f"{what} — likely causes: {'; '.join(causes)}; skip this check with --no-teacher-check"

    def to_dict(self) -> dict:
        """JSON-able, for the store's provenance."""
        return {
            "miou": _finite(self.miou),
            "pixel_accuracy": _finite(self.pixel_accuracy),
            "images": self.images,
            "pixels": self.pixels,
            "chance_miou": _finite(self.chance_miou),
            "threshold": _finite(self.threshold),
            "verdict": self.verdict,
            "predicted_histogram": [int(v) for v in self.histogram],
            "label_histogram": [int(v) for v in self.label_histogram],
            "untrained_classifier": self.untrained_classifier,
        }


def _finite(v: float) -> float | None:
    return None if np.isnan(v) else float(v)


def _norm_words(spec: InputNormSpec) -> str:
    mean = ", ".join(f"{m:g}" for m in spec.mean)
    if all(s == 1.0 for s in spec.std):
        return f"{spec.order} pixels minus mean ({mean}), no std"
    std = ", ".join(f"{s:g}" for s in spec.std)
    return f"{spec.order} pixels, mean ({mean}), std ({std})"


def _predict(
    model: nn.Module, image: np.ndarray, num_classes: int, device: torch.device, align_corners: bool, precision: str
) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) int64 class map (whole image, logits resized to the image)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    logits, _ = run_teacher(model, x, device, precision)
    if logits.ndim != 4 or logits.shape[1] != num_classes:
        raise ModelError(
            f"teacher {_name(model)} returns logits of shape {tuple(logits.shape)}, not (1, {num_classes}, h, w): "
            "its class count differs from the dataset's"
        )
    if tuple(logits.shape[-2:]) != image.shape[:2]:
        logits = F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=align_corners)
    return logits[0].argmax(0).cpu().numpy().astype(np.int64)


def _verdict(miou: float, threshold: float, histogram: np.ndarray, label_histogram: np.ndarray) -> str:
    def top2(h: np.ndarray) -> float:
        return float(np.sort(h)[-2:].sum()) / max(float(h.sum()), 1.0)

    if top2(histogram) >= COLLAPSE_SHARE and top2(label_histogram) <= LABEL_SPREAD:
        return "collapsed"
    return "near chance" if not miou >= threshold else "ok"  # NaN (no pixel) is not ok


def teacher_sanity(
    model: nn.Module,
    dataset: SegDataset,
    indices: Sequence[int],
    num_classes: int,
    ignore_index: int,
    device: torch.device | str,
    *,
    precision: str = "fp32",
    factor: float = 2.0,
    load_summary: str | None = None,
) -> SanityResult:
    """Evaluate ``model`` (in eval mode) on the labelled images ``indices`` of ``dataset``.

    Args:
        num_classes: K, the model's outputs and the dataset's classes.
        ignore_index: the dataset's label value for unlabelled pixels (255).
        precision: the teacher's precision (``pipeline.inference.PRECISIONS``), as the build runs it.
        factor: near chance below ``factor x chance_miou``.
        load_summary: ``LoadReport.summary()`` of the teacher's weights, named among the causes.

    Raises:
        DatasetError: no index holds a labelled image, or no labelled pixel among them.
        ModelError: the model's logits do not have ``num_classes`` channels.
    """
    device = torch.device(device)
    family = family_of(model)
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    images = 0
    was_training = model.training
    model.eval()
    try:
        for i in indices:
            image, label, _ = dataset.load(int(i))
            if label is None:
                continue
            pred = _predict(model, image, num_classes, device, family.align_corners, precision)
            valid = label != ignore_index
            g, p = label[valid].astype(np.int64), pred[valid]
            if g.size and g.max() >= num_classes:
                raise DatasetError(f"label values up to {g.max()} for {num_classes} classes (ignore = {ignore_index})")
            conf += np.bincount(g * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)
            images += 1
    finally:
        model.train(was_training)
    if images == 0 or conf.sum() == 0:
        raise DatasetError(
            "the teacher check found no labelled pixels in the images it was given; "
            "give --check-split val, or --no-teacher-check to skip the check"
        )
    miou = miou_from_confusion(conf)
    label_hist, pred_hist = conf.sum(1), conf.sum(0)
    chance = chance_miou(label_hist)
    return SanityResult(
        miou=miou,
        pixel_accuracy=float(np.trace(conf)) / float(conf.sum()),
        images=images,
        pixels=int(conf.sum()),
        histogram=pred_hist,
        label_histogram=label_hist,
        chance_miou=chance,
        threshold=factor * chance,
        verdict=_verdict(miou, factor * chance, pred_hist, label_hist),
        model_name=_name(model),
        family=family.family,
        normalization=family.normalization,
        untrained_classifier=classifier_untrained(model),
        load_summary=load_summary,
    )


def _name(model: nn.Module) -> str:
    return getattr(model, "model_name", None) or type(model).__name__


def check_teacher(
    model: nn.Module,
    dataset: SegDataset,
    images: int,
    device: torch.device | str,
    *,
    precision: str = "fp32",
    load_summary: str | None = None,
) -> SanityResult:
    """The build's gate: :func:`teacher_sanity` on ``images`` labelled images spread over ``dataset``.

    Returns:
        the result (for the store's provenance) when the teacher passes.

    Raises:
        WeightsError: the teacher is near chance or collapsed (:meth:`SanityResult.problem`).
        DatasetError: ``dataset`` has no labelled image.
    """
    result = teacher_sanity(
        model,
        dataset,
        pick_indices(dataset, images),
        dataset.num_classes,
        dataset.ignore_index,
        device,
        precision=precision,
        load_summary=load_summary,
    )
    problem = result.problem()
    if problem is not None:
        raise WeightsError(problem)
    return result
