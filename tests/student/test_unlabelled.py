"""Unlabelled images: the store records which entries have labels; training on a labelled + unlabelled mix."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cache_tools import open_cache
from cache_tools.datasets import write_sample_dataset
from cache_tools.errors import ConfigError, SchemaError
from cache_tools.schema import DatasetStamp
from pipeline.cli import main as skdcache
from student.cli import main as skdstudent
from student.data import DrawSampler, SegTrainData, collate_samples, labelled_per_batch
from student.train import TrainConfig, _distilled_on_grid, _task_loss, train, valid_on_grid
from tests.cli import assert_one_line_error, run_cli
from tests.student.helpers import Stop, stop_at, tiny_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cache_v1"
TRAIN, EXTRA = 4, 2


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A sample dataset with an unlabelled train_extra split, and a dense cache over train,train_extra built by the CLI."""
    root = tmp_path_factory.mktemp("mixed")
    write_sample_dataset(root / "data", num_train=TRAIN, num_val=2, size=(64, 128), seed=5, num_extra=EXTRA)
    argv = ["build", "--teacher", "psp_tiny", "--random-weights", "--data", str(root / "data")]
    argv += ["--split", "train,train_extra", "--out", str(root / "dense.zarr"), "--loader-workers", "0"]
    try:
        skdcache(argv)
    except SystemExit as exc:
        assert not exc.code
    return root


def test_the_store_records_which_images_have_labels(mixed):
    reader = open_cache(mixed / "dense.zarr")
    stamp = reader.schema.dataset
    assert stamp.splits == ("train", "train_extra") and stamp.num_images == TRAIN + EXTRA
    assert stamp.unlabelled == ((TRAIN, TRAIN + EXTRA),) and stamp.num_labelled == TRAIN
    extra = [i for i, s in enumerate(reader.image_ids) if s.startswith("train_extra/")]
    assert [i for i, has in enumerate(stamp.labelled) if not has] == extra
    doc = json.loads((mixed / "dense.zarr" / "zarr.json").read_text())
    assert doc["attributes"]["skd_cache"]["dataset"]["unlabelled"] == [[TRAIN, TRAIN + EXTRA]]


@pytest.mark.parametrize("name", ["dense", "views"])
def test_a_store_written_before_reads_as_all_labelled(name):
    stamp = open_cache(FIXTURES / f"{name}.zarr").schema.dataset
    assert stamp.unlabelled == () and all(stamp.labelled) and stamp.num_labelled == stamp.num_images
    assert "unlabelled" not in stamp.to_dict()  # a labelled cache's document is unchanged


def test_label_ranges_round_trip_and_bad_ones_are_refused():
    stamp = DatasetStamp("x", ("a",), 6, "0" * 64, ("c0", "c1"))
    marked = stamp.with_labels([True, False, False, True, False, True])
    assert marked.unlabelled == ((1, 3), (4, 5)) and marked.num_labelled == 3
    assert DatasetStamp.from_dict(marked.to_dict()) == marked
    for bad in ([[3, 1]], [[0, 7]], [[2, 4], [3, 5]], [[1, 2.0]], "0-2"):
        with pytest.raises(SchemaError, match="unlabelled"):
            DatasetStamp.from_dict({**marked.to_dict(), "unlabelled": bad})


def test_an_unlabelled_image_gets_an_all_ignore_label_explicitly(mixed):
    data = SegTrainData(str(mixed / "data"), ("train", "train_extra"), (64, 64), cache=str(mixed / "dense.zarr"))
    assert data.labelled.tolist() == [True] * TRAIN + [False] * EXTRA
    samples = [data[i] for i in range(TRAIN + EXTRA)]
    for i, s in enumerate(samples):
        assert s.labelled is (i < TRAIN)
        assert (s.label == 255).all() == (i >= TRAIN)
        assert s.teacher_logits is not None and torch.isfinite(s.teacher_logits).all()
    batch = collate_samples(samples)
    assert batch.labelled.tolist() == data.labelled.tolist()


def test_the_training_batches_hold_the_labelled_share(mixed):
    from torch.utils.data import DataLoader

    data = SegTrainData(str(mixed / "data"), ("train", "train_extra"), (64, 64), cache=str(mixed / "dense.zarr"))
    sampler = DrawSampler(len(data), seed=1, labelled=data.labelled, share=0.75, batch_size=4)
    loader = DataLoader(data, batch_size=4, sampler=sampler, collate_fn=collate_samples, drop_last=True)
    batches = [b for b, _ in zip(loader, range(3), strict=False)]
    for b in batches:
        assert b.labelled.tolist() == [True, True, True, False]
        assert (b.label[3] == 255).all() and (b.label[:3] != 255).any()
        assert b.teacher_logits is not None and b.teacher_logits.shape[0] == 4


@pytest.mark.parametrize(("share", "batch"), [(0.5, 4), (0.25, 4), (1.0, 3), (0.0, 2), (0.34, 3)])
def test_the_labelled_share_holds_in_every_batch_on_every_rank(share, batch):
    labelled = np.array([True] * 5 + [False] * 3)
    want = labelled_per_batch(share, batch)
    streams = []
    for rank in range(2):
        sampler = DrawSampler(8, seed=3, rank=rank, world=2, labelled=labelled, share=share, batch_size=batch)
        it = iter(sampler)
        draws = np.array([next(it) for _ in range(batch * 12)]).reshape(12, batch)
        assert (labelled[draws % 8].sum(axis=1) == want).all()
        streams.append(draws)
    # the two ranks are dealt different samples; over the run each pool is covered evenly
    assert not np.array_equal(streams[0], streams[1])
    every = np.concatenate(streams).ravel() % 8
    counts = np.bincount(every, minlength=8)
    for pool in (labelled, ~labelled):
        if counts[pool].sum():
            assert counts[pool].max() - counts[pool].min() <= 1
    assert len(set(np.concatenate(streams).ravel().tolist())) == every.size  # draws never repeat


def test_the_mixed_stream_is_seeded_and_resumes_exactly():
    labelled = np.array([True, False, True, True, False, False, True])
    kw = dict(labelled=labelled, share=0.5, batch_size=2, seed=7)
    full = iter(DrawSampler(7, **kw))
    first = [next(full) for _ in range(20)]
    assert first == [d for d, _ in zip(DrawSampler(7, **kw), range(20), strict=False)]
    resumed = iter(DrawSampler(7, start=6, **kw))  # three steps of two already consumed
    assert [next(resumed) for _ in range(14)] == first[6:]
    assert first != [d for d, _ in zip(DrawSampler(7, **{**kw, "seed": 8}), range(20), strict=False)]


def test_a_share_the_splits_cannot_serve_is_refused():
    with pytest.raises(ConfigError, match="no unlabelled images"):
        DrawSampler(4, labelled=np.ones(4, bool), share=0.5, batch_size=2)
    with pytest.raises(ConfigError, match="no labelled images"):
        DrawSampler(4, labelled=np.zeros(4, bool), share=0.5, batch_size=2)
    DrawSampler(4, labelled=np.ones(4, bool), share=1.0, batch_size=2)  # all labelled: fine


def test_unlabelled_entries_add_no_task_gradient_but_are_distilled():
    logits = torch.randn(2, 3, 5, 5, requires_grad=True)
    label = torch.randint(0, 3, (2, 20, 20))
    label[1] = 255  # the second entry is unlabelled
    _task_loss(SimpleNamespace(logits=logits, aux=None), label, 0.4, 255).backward()
    assert logits.grad[1].abs().max() == 0 and logits.grad[0].abs().max() > 0
    # a batch of unlabelled entries only: zero task loss, no NaN
    none = _task_loss(SimpleNamespace(logits=logits, aux=None), torch.full_like(label, 255), 0.4, 255)
    assert none.item() == 0
    # the masked KL (pixel --pixel-mode kl) distils every in-image position of an unlabelled entry
    image = torch.zeros(2, 3, 20, 20)
    image[:, :, :, 15:] = float("nan")  # padding
    batch = SimpleNamespace(image=image, label=label, labelled=torch.tensor([True, False]))
    mask = _distilled_on_grid(batch, (5, 5), 255, labels=True)
    assert mask[1, :, :3].all() and not mask[1, :, 4:].any()
    assert torch.equal(mask[0], valid_on_grid(label, (5, 5), 255)[0])  # a labelled entry: its labelled pixels


def _cfg(mixed, out, **kw) -> TrainConfig:
    base = dict(splits=("train", "train_extra"), cache=str(mixed / "dense.zarr"))
    return tiny_config(mixed / "data", out, **{**base, **kw})


def test_training_on_the_mix_with_a_labelled_share(mixed, tmp_path, capsys):
    argv = ["train", "--data", str(mixed / "data"), "--out", str(tmp_path / "run"), "--student", "psp_tiny"]
    argv += ["--iters", "2", "--batch-size", "2", "--crop", "64x64", "--workers", "0", "--eval-split", "none"]
    argv += ["--split", "train,train_extra", "--cache", str(mixed / "dense.zarr"), "--labelled-share", "0.5"]
    argv += ["--losses", "pixel,pair,kd", "--json"]
    code, out, err = run_cli(skdstudent, argv, capsys)
    assert code == 0, err
    last = json.loads(out)
    assert last["steps"] == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["labelled_share"] == 0.5


def test_distillation_alone_trains_on_unlabelled_images_and_task_only_is_refused(mixed, tmp_path, capsys):
    result = train(_cfg(mixed, tmp_path / "run", splits=("train_extra",), losses=("kd", "cwd")))
    assert result.last["task"] == 0 and result.last["kd"] > 0 and result.last["cwd"] > 0
    argv = ["train", "--data", str(mixed / "data"), "--out", str(tmp_path / "r2"), "--student", "psp_tiny"]
    argv += ["--split", "train_extra", "--workers", "0"]
    code, _, err = run_cli(skdstudent, [*argv, "--losses", "none", "--eval-split", "none"], capsys)
    assert_one_line_error(code, err, "--losses none", "train_extra", "no labels")
    code, _, err = run_cli(skdstudent, [*argv, "--losses", "none", "--eval-split", "train_extra"], capsys)
    assert_one_line_error(code, err, "--eval-split train_extra", "no label")
    with pytest.raises(ConfigError, match=r"--labelled-share 0\.5 .* no labelled images"):
        train(_cfg(mixed, tmp_path / "r3", splits=("train_extra",), losses=("kd",), labelled_share=0.5))
    assert not (tmp_path / "r3" / "config.json").exists()


@pytest.mark.slow
def test_a_run_on_the_mix_resumes_exactly(mixed, tmp_path):
    from student.checkpoint import load_checkpoint

    kw = dict(losses=("kd", "pair"), iters=4, ckpt_every=2, labelled_share=0.5)
    full = train(_cfg(mixed, tmp_path / "full", **kw))

    with pytest.raises(Stop):
        train(_cfg(mixed, tmp_path / "cut", **kw), stop_at(3))
    with pytest.raises(ConfigError, match="labelled_share"):
        train(_cfg(mixed, tmp_path / "cut", **{**kw, "labelled_share": 1.0}, resume=True))
    resumed = train(_cfg(mixed, tmp_path / "cut", **kw, resume=True))
    a, b = load_checkpoint(full.checkpoint)["model"], load_checkpoint(resumed.checkpoint)["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert full.last == resumed.last
