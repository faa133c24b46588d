"""End-to-end training from caches built in the test; exact resume; bad input."""

from __future__ import annotations

import json

import pytest
import torch

from cache_tools.errors import ConfigError, SchemaMismatchError, WeightsError
from pipeline.build import BuildConfig, build_cache
from pipeline.teachers import save_weights
from student.checkpoint import load_checkpoint
from student.train import TrainConfig, TrainingDivergedError, train


@pytest.fixture(scope="module")
def caches(sample_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    common = dict(teacher="psp_tiny", random_weights=True, data=str(sample_root), loader_workers=0, shard_images=3)
    build_cache(BuildConfig(out=str(root / "dense.zarr"), dense_flip=True, **common))
    build_cache(BuildConfig(out=str(root / "views.zarr"), mode="views", views=2, crop=(64, 64), **common))
    return root


def _cfg(sample_root, out, **kw) -> TrainConfig:
    base = dict(
        data=str(sample_root),
        out=str(out),
        student="psp_tiny",
        iters=3,
        batch_size=2,
        crop=(64, 64),
        workers=0,
        eval_split="none",
        log_every=1,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("store", ["dense.zarr", "views.zarr"])
def test_few_iterations_from_a_cache(sample_root, caches, tmp_path, store):
    result = train(_cfg(sample_root, tmp_path / "run", cache=str(caches / store)))
    assert result.steps == 3
    for key in ("task", "pixel", "pair", "adv", "critic", "critic_gp"):
        assert key in result.last and torch.isfinite(torch.tensor(result.last[key]))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 3 and state["model_name"] == "psp_tiny" and state["critic"] is not None
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_online_teacher_and_task_only(sample_root, tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    from pipeline.teachers import create_model

    save_weights(create_model("psp_tiny", num_classes=19), teacher, {"model_name": "psp_tiny", "num_classes": 19})
    online = train(_cfg(sample_root, tmp_path / "online", teacher="psp_tiny", weights=str(teacher)))
    assert {"pixel", "pair", "adv", "critic"} <= set(online.last)
    alone = train(_cfg(sample_root, tmp_path / "alone", losses=()))
    assert set(alone.last) == {"lr", "task", "loss"}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_equals_an_uninterrupted_run(sample_root, caches, tmp_path, workers):
    cache = str(caches / "dense.zarr")
    full = train(_cfg(sample_root, tmp_path / "full", cache=cache, iters=4, ckpt_every=2, workers=workers))

    class Stop(Exception):
        pass

    def stop_at_3(step, total, metrics):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        train(_cfg(sample_root, tmp_path / "cut", cache=cache, iters=4, ckpt_every=2, workers=workers), stop_at_3)
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["step"] == 2
    resumed = train(
        _cfg(sample_root, tmp_path / "cut", cache=cache, iters=4, ckpt_every=2, workers=workers, resume=True)
    )
    a = load_checkpoint(full.checkpoint)
    b = load_checkpoint(resumed.checkpoint)
    for part in ("model", "critic"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k} differs after resume"
    assert full.last == resumed.last


def test_bad_input(sample_root, caches, tmp_path):
    with pytest.raises(ConfigError, match="needs teacher targets"):
        _cfg(sample_root, tmp_path / "x", losses=("pixel",))
    with pytest.raises(ConfigError, match="unknown loss"):
        _cfg(sample_root, tmp_path / "x", cache="c", losses=("pixel", "kd"))
    with pytest.raises(SchemaMismatchError, match="are not in the cache"):
        train(_cfg(sample_root, tmp_path / "x", cache=str(caches / "dense.zarr"), splits=("val",)))
    train(_cfg(sample_root, tmp_path / "done", losses=(), iters=1))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(_cfg(sample_root, tmp_path / "done", losses=(), iters=1))
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(_cfg(sample_root, tmp_path / "fresh", losses=(), iters=1, resume=True))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a file where a directory should be: unwritable even for root
    with pytest.raises(ConfigError, match="cannot write to --out"):
        train(_cfg(sample_root, blocker / "run", losses=(), iters=1))
    wrong = tmp_path / "wrong.safetensors"
    from pipeline.teachers import create_model

    save_weights(create_model("psp18_mini", num_classes=19), wrong, {"model_name": "psp18_mini", "num_classes": 19})
    with pytest.raises(WeightsError, match="does not fit psp_tiny"):
        train(_cfg(sample_root, tmp_path / "y", teacher="psp_tiny", weights=str(wrong)))


def test_nan_stops_with_a_clear_message_and_keeps_the_checkpoint(sample_root, caches, tmp_path):
    cfg = _cfg(sample_root, tmp_path / "nan", cache=str(caches / "dense.zarr"), iters=6, ckpt_every=2, lr=1e30)
    with pytest.raises(TrainingDivergedError, match="non-finite at step"):
        train(cfg)
    last = tmp_path / "nan" / "checkpoints" / "last.pt"
    if last.exists():  # whatever was saved before the divergence is intact and readable
        load_checkpoint(last)


def test_imagenet_init_and_a_trained_student_as_teacher(sample_root, tmp_path):
    from cache_tools import open_cache
    from pipeline.teachers import create_model

    # a CSAIL-layout backbone checkpoint (plain keys, fc head) initialises the student's backbone
    backbone = {
        k: v
        for k, v in create_model("psp_tiny", num_classes=19).state_dict().items()
        if k.startswith(("conv", "bn", "layer"))
    }
    backbone["fc.weight"] = torch.zeros(1000, 64)
    torch.save(backbone, tmp_path / "resnet-imagenet.pth")
    run = train(
        _cfg(sample_root, tmp_path / "init", losses=(), iters=1, pretrained=str(tmp_path / "resnet-imagenet.pth"))
    )
    # ... and the trained student serves as a teacher, from its checkpoint and from its safetensors
    for weights in (run.checkpoint, run.weights):
        out = tmp_path / f"from-{weights.rsplit('/', 1)[-1]}.zarr"
        build_cache(
            BuildConfig(teacher="psp_tiny", weights=weights, data=str(sample_root), out=str(out), loader_workers=0)
        )
        assert open_cache(str(out)).schema.teacher.weights_sha256
    torch.save(
        {k: torch.zeros(64, 3, 7, 7) if k == "conv1.weight" else v for k, v in backbone.items()}, tmp_path / "tv.pth"
    )
    with pytest.raises(WeightsError, match="torchvision"):
        train(_cfg(sample_root, tmp_path / "tv", losses=(), iters=1, pretrained=str(tmp_path / "tv.pth")))
