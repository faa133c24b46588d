"""The teacher sanity gate on the sample data: an oracle passes, constant and collapsed teachers are stopped."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from cache_tools.datasets import open_dataset
from cache_tools.errors import DatasetError, ModelError, WeightsError
from pipeline.models.base import IMAGENET_NORM, InputNorm, SegOutput
from pipeline.registry import create_model
from pipeline.sanity import chance_miou, check_teacher, classifier_untrained, pick_indices, teacher_sanity


def _key(x: Tensor) -> str:
    return hashlib.sha256(x.to(torch.uint8).cpu().numpy().tobytes()).hexdigest()


class LabelLookup(nn.Module):
    """An oracle: one-hot logits of the label stored for the image it is given (keyed on its pixels)."""

    family = "mmseg"  # its normalisation (RGB mean/std) and align_corners=False come with the family
    align_corners = False

    def __init__(self, dataset, num_classes: int, *, corrupt: float = 0.0):
        super().__init__()
        self.input_norm = InputNorm(IMAGENET_NORM)
        self.head = nn.Conv2d(1, num_classes, 1)  # holds a trained-looking (non-zero) bias
        nn.init.constant_(self.head.bias, 0.5)
        self.k = num_classes
        self.labels = {}
        rng = np.random.default_rng(0)
        for i in range(len(dataset)):
            image, label, _ = dataset.load(i)
            x = torch.from_numpy(image).permute(2, 0, 1)[None]
            label = label.astype(np.int64) % num_classes  # ignored pixels get any class: they are not scored
            wrong = rng.random(label.shape) < corrupt
            label[wrong] = rng.integers(0, num_classes, int(wrong.sum()))
            self.labels[_key(x)] = torch.from_numpy(label)

    def forward(self, x: Tensor) -> SegOutput:
        label = self.labels[_key(x)]
        logits = torch.nn.functional.one_hot(label, self.k).permute(2, 0, 1)[None].float()
        return SegOutput(logits, None, logits)


class Constant(nn.Module):
    """Always the same class, on a stride-8 grid (a collapsed teacher)."""

    def __init__(self, num_classes: int, cls: int):
        super().__init__()
        self.input_norm = InputNorm(IMAGENET_NORM)
        self.k, self.cls = num_classes, cls

    def forward(self, x: Tensor) -> SegOutput:
        h, w = (x.shape[-2] + 7) // 8, (x.shape[-1] + 7) // 8
        logits = torch.zeros(x.shape[0], self.k, h, w)
        logits[:, self.cls] = 1.0
        return SegOutput(logits, None, logits)


@pytest.fixture(scope="module")
def val(sample_root):
    return open_dataset(sample_root, splits="train,val")


def test_oracle_passes(val):
    k = val.num_classes
    result = teacher_sanity(LabelLookup(val, k), val, pick_indices(val, 4), k, val.ignore_index, "cpu")
    assert result.ok and result.problem() is None
    assert result.miou == pytest.approx(1.0) and result.pixel_accuracy == pytest.approx(1.0)
    assert result.images == 4 and result.pixels == int(result.label_histogram.sum())
    assert np.array_equal(result.histogram, result.label_histogram)  # every pixel predicted as labelled
    assert result.to_dict()["verdict"] == "ok" and "mIoU 100.0%" in result.line()


def test_noisy_oracle_still_passes(val):
    """A teacher far from perfect (40% of its pixels wrong) is not near chance."""
    k = val.num_classes
    result = teacher_sanity(LabelLookup(val, k, corrupt=0.4), val, [0, 1, 2], k, val.ignore_index, "cpu")
    assert result.ok, result.line()
    assert 0.1 < result.miou < 0.9


def test_constant_teacher_is_stopped_naming_the_causes(val):
    k = val.num_classes
    result = teacher_sanity(Constant(k, 0), val, pick_indices(val, 8), k, val.ignore_index, "cpu")
    assert not result.ok and result.verdict == "collapsed"
    assert result.histogram[0] == result.pixels  # every scored pixel predicted as class 0
    assert result.miou < result.threshold
    msg = result.problem()
    assert msg is not None and "\n" not in msg
    assert f"scores mIoU {100 * result.miou:.1f}% on 8 labelled images, near chance" in msg
    assert "predicts class 0 on 100% of the pixels" in msg
    assert "this skd model expects RGB pixels, mean (123.675, 116.28, 103.53), std (58.395, 57.12, 57.375)" in msg
    assert "class count or order (the model outputs 19 classes" in msg
    assert "a head that did not load (random weights)" in msg and msg.endswith("--no-teacher-check")


def test_random_teacher_names_its_untrained_classifier(val):
    torch.manual_seed(0)
    model = create_model("psp_tiny", num_classes=val.num_classes)
    assert classifier_untrained(model) == "head.bias"
    result = teacher_sanity(model, val, [0, 1], val.num_classes, val.ignore_index, "cpu")
    assert not result.ok  # a random network is at chance level or collapsed
    assert "a head that did not load (head.bias is still all zero)" in result.problem()
    assert "this skd model expects BGR pixels minus mean (104.007, 116.669, 122.679), no std" in result.problem()


def test_chance_level_is_the_better_blind_predictor():
    # majority everywhere: 0.5 / 2 classes = 0.25; guessing by frequency: (0.5/1.5 + 0.5/1.5) / 2 = 1/3
    assert chance_miou(np.array([50, 50, 0])) == pytest.approx(1 / 3)
    # one dominant class: majority 0.9 / 2 = 0.45 beats guessing (0.9/1.1 + 0.1/1.9) / 2 = 0.435
    assert chance_miou(np.array([90, 10])) == pytest.approx(0.45)


def test_wrong_class_count_and_unlabelled_images(val, tmp_path):
    k = val.num_classes
    with pytest.raises(ModelError, match=r"returns logits of shape \(1, 5, 8, 16\), not \(1, 19, h, w\)"):
        teacher_sanity(Constant(5, 0), val, [0], k, val.ignore_index, "cpu")
    from cache_tools.datasets import write_sample_dataset

    root = tmp_path / "unlabelled"
    write_sample_dataset(root, num_train=1, num_val=1, size=(16, 32), seed=1, num_extra=2)
    extra = open_dataset(root, splits="train_extra")
    with pytest.raises(DatasetError, match="give --check-split val, or --no-teacher-check"):
        pick_indices(extra, 4)
    with pytest.raises(DatasetError, match="no labelled pixels"):
        teacher_sanity(Constant(k, 0), extra, [0, 1], k, extra.ignore_index, "cpu")


def test_build_gate_raises_the_problem_line(val):
    k = val.num_classes
    passed = check_teacher(LabelLookup(val, k), val, 3, "cpu")
    assert passed.ok and passed.images == 3
    with pytest.raises(WeightsError) as info:
        check_teacher(Constant(k, 2), val, 3, "cpu", load_summary="loaded 131 tensors from t.pth (skd layout)")
    msg = str(info.value)
    assert msg.startswith("teacher Constant scores mIoU ") and "predicts class 2 on 100% of the pixels" in msg
    assert "a head that did not load (loaded 131 tensors from t.pth (skd layout))" in msg
