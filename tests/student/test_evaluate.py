"""Evaluation: confusion/IoU by hand and against cityscapesscripts, whole/slide inference, end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cache_tools.datasets import CITYSCAPES_CLASS_NAMES, ID_TO_TRAIN_ID, open_dataset
from cache_tools.errors import ConfigError, DatasetError, SchemaMismatchError
from pipeline.inference import tile_starts
from pipeline.models.base import SegOutput
from pipeline.registry import create_model
from pipeline.weights import save_weights
from student.evaluate import (
    EvalResult,
    _prediction_path,
    confusion_matrix,
    evaluate_checkpoint,
    evaluate_model,
    iou_from_confusion,
    predict_slide,
    predict_whole,
)

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------------
# stand-in models


class GridModel(nn.Module):
    """Returns fixed logits on a given grid, whatever the input."""

    def __init__(self, grid: torch.Tensor):
        super().__init__()
        self.register_buffer("grid", grid)

    def forward(self, x):
        g = self.grid.expand(x.shape[0], -1, -1, -1)
        return SegOutput(g, None, g)


class PixelModel(nn.Module):
    """Per-pixel linear map of the (NaN -> 0) input at full resolution: trivially translation-equivariant."""

    def __init__(self, k: int = 4):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(k, 3, generator=gen) / 100)
        self.bias = nn.Parameter(torch.randn(k, generator=gen))

    def forward(self, x):
        z = torch.einsum("kc,bchw->bkhw", self.weight, torch.nan_to_num(x)) + self.bias.view(1, -1, 1, 1)
        return SegOutput(z, None, z)


class SubsampleModel(nn.Module):
    """Logits = the (NaN -> 0) input sampled at every 8th pixel: an 8k+1 grid for 8k+1 inputs."""

    def forward(self, x):
        z = torch.nan_to_num(x)[:, :, ::8, ::8]
        return SegOutput(z, None, z)


class OnesModel(nn.Module):
    """Ones on a coarse grid; records the input shapes it saw."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        z = x.new_ones(x.shape[0], 2, math.ceil(x.shape[2] / 8), math.ceil(x.shape[3] / 8))
        return SegOutput(z, None, z)


class OracleModel(nn.Module):
    """One-hot logits of the ground truth at full resolution, looked up by the image's pixels."""

    num_classes = 19

    def __init__(self, ds):
        super().__init__()
        self.labels = {}
        for i in range(len(ds)):
            image, label, _ = ds.load(i)
            self.labels[image.tobytes()] = label

    def forward(self, x):
        key = x[0].permute(1, 2, 0).to(torch.uint8).cpu().numpy().tobytes()
        label = torch.from_numpy(self.labels[key].astype(np.int64))
        label[label == 255] = 0
        z = F.one_hot(label, 19).permute(2, 0, 1)[None].float()
        return SegOutput(z, None, z)


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


# ----------------------------------------------------------------------------------------------------
# confusion matrix and IoU, by hand


def test_confusion_and_iou_by_hand():
    gt = np.array([[0, 0, 1, 255], [1, 2, 2, 255]], np.uint8)
    pred = np.array([[0, 1, 1, 3], [1, 2, 0, 0]], np.uint8)  # class 3 only on an ignored pixel
    conf = confusion_matrix(pred, gt, 4)
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    iou, miou = iou_from_confusion(conf)
    np.testing.assert_allclose(iou[:3], [1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(iou[3])  # absent from gt and from the (non-ignored) predictions: excluded
    assert miou == pytest.approx(0.5)

    # a class predicted but absent from the ground truth counts, with IoU 0
    conf = confusion_matrix(np.array([0, 2, 1]), np.array([0, 0, 1]), 3)
    iou, miou = iou_from_confusion(conf)
    np.testing.assert_allclose(iou, [1 / 2, 1.0, 0.0])
    assert miou == pytest.approx(0.5)

    # everything ignored: no defined IoU
    iou, miou = iou_from_confusion(confusion_matrix(np.zeros(3, int), np.full(3, 255), 3))
    assert np.isnan(iou).all() and math.isnan(miou)


def test_eval_result_numbers_and_json():
    conf = confusion_matrix(
        np.array([[0, 1, 1, 3], [1, 2, 0, 0]]), np.array([[0, 0, 1, 255], [1, 2, 2, 255]]), 4, ignore_index=255
    )
    iou, miou = iou_from_confusion(conf)
    names = ["a", "b", "c", "d"]
    r = EvalResult(
        miou=miou,
        pixel_accuracy=4 / 6,
        per_class={n: (None if math.isnan(v) else float(v)) for n, v in zip(names, iou, strict=True)},
        class_names=names,
        confusion=conf,
        images=1,
        mode="whole",
        seconds=0.0,
    )
    assert r.official_miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2 + 0) / 4)  # official: absent class = 0
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["per_class"]["d"] is None and d["confusion"][0] == [1, 1, 0, 0] and d["miou"] == pytest.approx(0.5)


def test_confusion_errors():
    with pytest.raises(ValueError, match="outside the class range"):
        confusion_matrix(np.array([0, 4]), np.array([0, 1]), 4)
    with pytest.raises(ValueError, match="outside the class range"):
        confusion_matrix(np.array([0, -1]), np.array([0, 255]), 4)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros(3, int), np.zeros(4, int), 4)
    with pytest.raises(DatasetError, match="ground-truth"):
        confusion_matrix(np.zeros(2, int), np.array([0, 7]), 4)


# ----------------------------------------------------------------------------------------------------
# agreement with cityscapesscripts


def test_agrees_with_cityscapesscripts(tmp_path):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev
    from cityscapesscripts.helpers.labels import labels, trainId2label

    rng = np.random.default_rng(0)
    absent, pred_only = 16, 15  # train: nowhere (NaN); bus: predicted, never in the gt (IoU 0)
    gt_ids = [lab.id for lab in labels if lab.id >= 0 and lab.trainId not in (absent, pred_only)]  # with voids
    train_to_label = np.array([trainId2label[t].id for t in range(19)], np.uint8)
    pred_choices = [t for t in range(19) if t != absent]
    gt_files, pred_files = [], []
    conf = np.zeros((19, 19), np.int64)
    for n, (h, w) in enumerate([(37, 53), (64, 48), (20, 90)]):
        gt_lid = rng.choice(gt_ids, size=(h, w)).astype(np.uint8)
        gt = ID_TO_TRAIN_ID[gt_lid]
        pred = np.where(gt == 255, rng.choice(pred_choices, size=(h, w)), gt)
        noisy = rng.random((h, w)) < 0.4
        pred = np.where(noisy, rng.choice(pred_choices, size=(h, w)), pred).astype(np.uint8)
        gt_file = tmp_path / "gtFine" / "val" / "city" / f"city_{n:06d}_000019_gtFine_labelIds.png"
        pred_file = tmp_path / "results" / f"city_{n:06d}_000019_pred.png"
        for f, arr in ((gt_file, gt_lid), (pred_file, train_to_label[pred])):
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr, mode="L").save(f)
        gt_files.append(str(gt_file))
        pred_files.append(str(pred_file))
        conf += confusion_matrix(pred, gt, 19)

    args = ev.CArgs()
    args.quiet = True
    args.evalInstLevelScore = False  # needs *_instanceIds.png
    args.evalPixelAccuracy = False
    args.evalLabels = []
    args.normalized = True
    args.colorized = False
    args.bold = args.nocol = ""
    args.printRow = 5
    args.avgClassSize = dict(ev.args.avgClassSize)
    args.JSONOutput = True
    args.exportFile = str(tmp_path / "export" / "result.json")
    res = ev.evaluateImgLists(pred_files, gt_files, args)
    assert (tmp_path / "export" / "result.json").is_file()

    # same confusion matrix (theirs is over label ids, every pixel; ours over train ids, gt != 255)
    theirs = np.array(res["confMatrix"], np.int64)[np.ix_(train_to_label, train_to_label)]
    np.testing.assert_array_equal(theirs, conf)

    iou, miou = iou_from_confusion(conf)
    assert math.isnan(iou[absent]) and iou[pred_only] == 0.0
    for t in range(19):
        name = trainId2label[t].name
        assert name == CITYSCAPES_CLASS_NAMES[t]
        cs = res["classScores"][name]
        if math.isnan(cs):
            assert math.isnan(iou[t]), name
        else:
            assert iou[t] == pytest.approx(cs, abs=1e-12), name
    # their average skips NaN classes (ignoreInEval labels and classes absent everywhere)
    assert miou == pytest.approx(res["averageScoreClasses"], abs=1e-12)


# ----------------------------------------------------------------------------------------------------
# whole-image and sliding inference


def test_predict_whole_upsamples_align_corners():
    grid = torch.randn(1, 3, 5, 9, generator=torch.Generator().manual_seed(1))
    out = predict_whole(GridModel(grid), _image(33, 65), device=CPU)
    assert out.shape == (3, 33, 65) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.interpolate(grid, size=(33, 65), mode="bilinear", align_corners=True)[0])
    # align_corners=True: node (i, j) of the 8k+1 grid sits exactly on pixel (8i, 8j)
    torch.testing.assert_close(out[:, ::8, ::8], grid[0])

    # logits already at image size pass through unchanged
    full = torch.randn(1, 2, 20, 30)
    torch.testing.assert_close(predict_whole(GridModel(full), _image(20, 30), device=CPU), full[0])

    model = create_model("psp_tiny", num_classes=19).eval()
    with torch.inference_mode():
        assert predict_whole(model, _image(50, 70), device=CPU).shape == (19, 50, 70)


@pytest.mark.parametrize(
    ("size", "tile", "overlap"),
    [
        ((100, 130), (48, 48), 1 / 3),
        ((97, 200), (40, 56), 1 / 3),
        ((30, 40), (48, 64), 1 / 3),  # smaller than the tile: padded
        ((64, 64), (64, 64), 1 / 3),  # exactly one tile
        ((7, 300), (16, 16), 0.5),  # smaller in one axis only
        ((50, 75), (20, 20), 0.0),
    ],
)
def test_predict_slide_equals_whole_for_pixelwise_model(size, tile, overlap):
    model = PixelModel()
    image = _image(*size)
    whole = predict_whole(model, image, device=CPU)
    slide = predict_slide(model, image, tile=tile, overlap=overlap, device=CPU)
    assert slide.shape == whole.shape == (4, *size)
    torch.testing.assert_close(slide, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(161, 225), (33, 41), (65, 129)])
def test_predict_slide_equals_whole_on_aligned_stride8_grid(size):
    # tile 65 = 8*8+1 nodes, stride ceil(65 * 0.49) = 32: every tile's grid lands on the image's grid
    model = SubsampleModel()
    image = _image(*size)
    whole = predict_whole(model, image, device=CPU)
    slide = predict_slide(model, image, tile=(65, 65), overlap=0.51, device=CPU)
    torch.testing.assert_close(slide, whole, atol=1e-3, rtol=1e-5)


def test_predict_slide_tiles_cover_every_pixel():
    # the official numbers: 1024x2048, tile 512, overlap 1/3 -> stride 342, 3 x 6 tiles
    assert tile_starts(1024, 512, 1 / 3) == [0, 342, 512]  # stride ceil(512 * 2/3) = 342
    assert tile_starts(2048, 512, 1 / 3) == [0, 342, 684, 1026, 1368, 1536]
    assert tile_starts(100, 512, 1 / 3) == [0]  # smaller than a tile: one (padded) tile
    for size in [(100, 130), (30, 40), (33, 200), (1, 1)]:
        model = OnesModel()
        out = predict_slide(model, _image(*size), tile=(24, 32), overlap=1 / 3, device=CPU)
        assert out.shape == (2, *size)
        torch.testing.assert_close(out, torch.ones_like(out))  # count > 0 everywhere (0/0 would be NaN)
        assert all(s == (1, 3, 24, 32) for s in model.calls)  # every tile padded to the tile size
    model = OnesModel()
    predict_slide(model, _image(100, 130), tile=(24, 32), overlap=1 / 3, device=CPU)
    # stride (16, 22): rows ceil(76/16)+1 = 6, cols ceil(98/22)+1 = 6
    assert len(model.calls) == 36


def test_tile_starts_is_mmseg_slide_inference():
    # mmseg's slide_inference: h_grids = max(H - crop + stride - 1, 0) // stride + 1, y1 = min(i * stride, ...)
    # then moved back so that the tile ends at the edge (never before 0)
    for length in range(1, 90):
        for tile in (1, 7, 16, 33):
            for overlap in (0.0, 1 / 3, 0.5, 0.75):
                stride = max(1, math.ceil(tile * (1 - overlap)))
                grids = max(length - tile + stride - 1, 0) // stride + 1
                want = [max(min(i * stride + tile, length) - tile, 0) for i in range(grids)]
                got = tile_starts(length, tile, overlap)
                assert got == want and got[-1] + min(tile, length) == length and got == sorted(set(got))


def test_predict_slide_bad_options():
    for bad in [dict(tile=(0, 5)), dict(tile=(5.5, 5)), dict(tile="big"), dict(overlap=1.0), dict(overlap=-0.1)]:
        with pytest.raises(ConfigError):
            predict_slide(OnesModel(), _image(10, 10), device=CPU, **bad)


# ----------------------------------------------------------------------------------------------------
# end to end


def _read_png(path):
    with Image.open(path) as im:
        return im.mode, np.array(im)


def test_evaluate_model_psp_tiny_whole_and_slide(sample_root, tmp_path):
    torch.manual_seed(0)
    model = create_model("psp_tiny", num_classes=19).eval()
    ds = open_dataset(sample_root, ("val",))
    n_pixels = sum(int((ds.load(i)[1] != 255).sum()) for i in range(len(ds)))

    seen = []
    out = tmp_path / "pred"
    r = evaluate_model(
        model, str(sample_root), device="cpu", save_predictions=str(out), progress=lambda i, n: seen.append((i, n))
    )
    assert r.images == 2 and r.mode == "whole" and seen == [(1, 2), (2, 2)]
    assert r.confusion.shape == (19, 19) and r.confusion.dtype == np.int64 and r.confusion.sum() == n_pixels
    assert r.class_names == list(CITYSCAPES_CLASS_NAMES) and list(r.per_class) == r.class_names
    assert 0.0 <= r.miou <= 1.0 and 0.0 <= r.pixel_accuracy <= 1.0
    assert not model.training
    json.dumps(r.to_dict(), allow_nan=False)

    # saved train ids: <dir>/<id>.png, image size, and they reproduce the confusion matrix
    conf = np.zeros((19, 19), np.int64)
    for i, image_id in enumerate(ds.ids):
        mode, pred = _read_png(out / f"{image_id}.png")
        assert mode == "L" and pred.shape == (64, 128) and pred.max() < 19
        conf += confusion_matrix(pred, ds.load(i)[1], 19)
        with torch.inference_mode():
            x = torch.from_numpy(ds.load(i)[0]).permute(2, 0, 1).float()
            np.testing.assert_array_equal(pred, predict_whole(model, x, device=CPU).argmax(0).numpy())
    np.testing.assert_array_equal(conf, r.confusion)

    # colour predictions: the dataset palette
    color_dir = tmp_path / "color"
    evaluate_model(model, str(sample_root), device="cpu", save_predictions=str(color_dir), prediction_format="color")
    for image_id in ds.ids:
        mode, rgb = _read_png(color_dir / f"{image_id}.png")
        _, ids = _read_png(out / f"{image_id}.png")
        assert mode == "RGB" and rgb.shape == (64, 128, 3)
        np.testing.assert_array_equal(rgb, ds.palette[ids])

    # slide mode (tiles smaller than the image), and limit
    model.train()
    s = evaluate_model(model, str(sample_root), mode="slide", tile=(64, 96), device="cpu", limit=1)
    assert s.mode == "slide" and s.images == 1 and model.training  # previous mode restored
    assert 0 < s.confusion.sum() < n_pixels


def _cityscapes_args(ev, tmp_path):
    """cityscapesscripts' evaluator settings without instance scores (they need *_instanceIds.png and use
    ``np.in1d``, which numpy 2.4 removed) and without a JSON export."""
    args = ev.CArgs()
    args.quiet = True
    args.evalInstLevelScore = False
    args.evalPixelAccuracy = False
    args.evalLabels = []
    args.normalized = True
    args.colorized = False
    args.bold = args.nocol = ""
    args.printRow = 5
    args.avgClassSize = dict(ev.args.avgClassSize)
    args.JSONOutput = False
    args.predictionPath = str(tmp_path)
    args.predictionWalk = None
    return args


def test_label_id_predictions_give_cityscapesscripts_the_same_miou(sample_root, tmp_path):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev
    from cityscapesscripts.helpers.labels import trainId2label

    torch.manual_seed(1)
    model = create_model("psp_tiny", num_classes=19).eval()
    out = tmp_path / "results"
    r = evaluate_model(model, str(sample_root), device="cpu", save_predictions=str(out), prediction_format="labelid")
    out_train = tmp_path / "train_ids"
    evaluate_model(model, str(sample_root), device="cpu", save_predictions=str(out_train))
    to_label = np.array([trainId2label[t].id for t in range(19)], np.uint8)
    ds = open_dataset(sample_root, ("val",))
    gt_files, pred_files = [], []
    for i, image_id in enumerate(ds.ids):
        path = out / f"{image_id}_leftImg8bit.png"  # as the dataset's own image name
        mode, ids = _read_png(path)
        assert mode == "L" and ids.shape == (64, 128)
        _, train = _read_png(out_train / f"{image_id}.png")
        np.testing.assert_array_equal(ids, to_label[train])  # the official table, train id -> label id
        gt = ds.records[i].label_path
        gt_files.append(str(gt))
        args = _cityscapes_args(ev, out)
        pred_files.append(ev.getPrediction(args, str(gt)))  # the stock lookup finds skd's file
        assert pred_files[-1] == str(path)
    res = ev.evaluateImgLists(pred_files, gt_files, _cityscapes_args(ev, out))
    assert r.miou == pytest.approx(res["averageScoreClasses"], abs=1e-12)
    for name, iou in r.per_class.items():
        theirs = res["classScores"][name]
        assert (iou is None and math.isnan(theirs)) or iou == pytest.approx(theirs, abs=1e-12), name


def test_label_ids_need_cityscapes(tmp_path):
    root = tmp_path / "folder"
    (root / "images" / "val").mkdir(parents=True)
    (root / "masks" / "val").mkdir(parents=True)
    (root / "classes.txt").write_text("a\nb\n")
    Image.new("RGB", (16, 16)).save(root / "images" / "val" / "x.png")
    Image.new("L", (16, 16)).save(root / "masks" / "val" / "x.png")
    model = PixelModel(k=2)
    with pytest.raises(ConfigError, match="label ids"):
        evaluate_model(
            model, str(root), device="cpu", save_predictions=str(tmp_path / "p"), prediction_format="labelid"
        )
    with pytest.raises(ConfigError, match="prediction format"):
        evaluate_model(model, str(root), device="cpu", save_predictions=str(tmp_path / "p"), prediction_format="ids")
    assert not (tmp_path / "p").exists()


def test_evaluate_model_oracle_is_perfect(sample_root):
    ds = open_dataset(sample_root, ("val",))
    r = evaluate_model(OracleModel(ds), str(sample_root), device="cpu")
    assert r.miou == 1.0 and r.pixel_accuracy == 1.0
    present = {int(t) for i in range(len(ds)) for t in np.unique(ds.load(i)[1]) if t != 255}
    for t, name in enumerate(r.class_names):
        assert r.per_class[name] == (1.0 if t in present else None)
    assert np.count_nonzero(r.confusion - np.diag(np.diag(r.confusion))) == 0


def test_evaluate_model_errors(sample_root, tmp_path):
    model = create_model("psp_tiny", num_classes=19).eval()
    with pytest.raises(ConfigError, match="mode"):
        evaluate_model(model, str(sample_root), mode="multiscale")
    with pytest.raises(ConfigError, match="tile"):
        evaluate_model(model, str(sample_root), mode="slide", tile=(0, 0))
    with pytest.raises(ConfigError, match="overlap"):
        evaluate_model(model, str(sample_root), mode="slide", overlap=1.5)
    with pytest.raises(DatasetError, match="test"):
        evaluate_model(model, str(sample_root), split="test")
    with pytest.raises(SchemaMismatchError, match="5 classes"):
        evaluate_model(create_model("psp_tiny", num_classes=5), str(sample_root))
    ds = open_dataset(sample_root, ("val",))
    for bad in ["../escape", "/abs/path", "val/../../x", "not/in/dataset"]:
        with pytest.raises(DatasetError):
            _prediction_path(tmp_path, ds, bad)
    assert _prediction_path(tmp_path, ds, ds.ids[0]) == tmp_path / f"{ds.ids[0]}.png"


def test_unlabelled_split_is_refused_before_any_image_is_read(tmp_path):
    from cache_tools.datasets import write_sample_dataset

    write_sample_dataset(tmp_path / "d", num_train=1, num_val=1, size=(32, 64), seed=1, num_extra=2)
    model = create_model("psp_tiny", num_classes=19).eval()
    with pytest.raises(DatasetError, match=r"'train_extra'.*has no labels.*--split val"):
        evaluate_model(model, str(tmp_path / "d"), split="train_extra")


def test_evaluate_checkpoint(sample_root, tmp_path):
    torch.manual_seed(0)
    model = create_model("psp_tiny", num_classes=19).eval()
    path = save_weights(model, tmp_path / "model.safetensors", {"model_name": "psp_tiny", "num_classes": 19})
    r = evaluate_checkpoint(str(path), str(sample_root), device="cpu")
    expected = evaluate_model(model, str(sample_root), device="cpu")
    np.testing.assert_array_equal(r.confusion, expected.confusion)
    assert r.miou == expected.miou

    other = create_model("psp_tiny", num_classes=5)
    path5 = save_weights(other, tmp_path / "k5.safetensors", {"model_name": "psp_tiny", "num_classes": 5})
    with pytest.raises(SchemaMismatchError) as info:
        evaluate_checkpoint(str(path5), str(sample_root), device="cpu")
    assert "5 classes" in str(info.value) and "\n" not in str(info.value)


def test_a_model_file_holding_nan_is_refused(sample_root, tmp_path):
    from cache_tools.errors import WeightsError

    model = create_model("psp_tiny", num_classes=19)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    path = save_weights(model, tmp_path / "nan.safetensors", {"model_name": "psp_tiny", "num_classes": 19})
    with pytest.raises(WeightsError, match="non-finite"):
        evaluate_checkpoint(str(path), str(sample_root), device="cpu")


def test_eval_cli_prediction_format(sample_root, tmp_path, capsys):
    from student.cli import main
    from tests.cli import assert_one_line_error, run_cli

    torch.manual_seed(0)
    model = create_model("psp_tiny", num_classes=19).eval()
    path = save_weights(model, tmp_path / "model.safetensors", {"model_name": "psp_tiny", "num_classes": 19})
    base = ["eval", "--checkpoint", str(path), "--data", str(sample_root), "--device", "cpu", "--json"]
    out = tmp_path / "labelids"
    code, _, err = run_cli(main, [*base, "--save-predictions", str(out), "--prediction-format", "labelid"], capsys)
    assert code == 0, err
    ds = open_dataset(sample_root, ("val",))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [f"{i}_leftImg8bit.png" for i in ds.ids]
    code, _, err = run_cli(main, [*base, "--save-predictions", str(out), "--prediction-format", "gray"], capsys)
    assert_one_line_error(code, err, "--prediction-format", "trainid, labelid, color")
    code, _, err = run_cli(main, [*base, "--prediction-format", "labelid", "--color"], capsys)
    assert_one_line_error(code, err, "--color contradicts --prediction-format labelid")
