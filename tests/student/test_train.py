"""End-to-end training from caches built in the test; exact resume; bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch

from cache_tools.errors import ConfigError, SchemaMismatchError, WeightsError
from pipeline.build import BuildConfig, build_cache
from pipeline.weights import save_weights
from student.checkpoint import load_checkpoint
from student.train import TrainConfig, TrainingDivergedError, train
from tests.student.helpers import Stop, stop_at, tiny_config


@pytest.fixture(scope="module")
def caches(sample_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    common = dict(teacher="psp_tiny", random_weights=True, data=str(sample_root), loader_workers=0, shard_images=3)
    build_cache(BuildConfig(out=str(root / "dense.zarr"), dense_flip=True, **common))
    build_cache(BuildConfig(out=str(root / "views.zarr"), mode="views", views=2, crop=(64, 64), **common))
    return root


def _cfg(sample_root, out, **kw) -> TrainConfig:
    return tiny_config(sample_root, out, **{"iters": 3, **kw})


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
    from pipeline.registry import create_model

    save_weights(create_model("psp_tiny", num_classes=19), teacher, {"model_name": "psp_tiny", "num_classes": 19})
    online = train(_cfg(sample_root, tmp_path / "online", teacher="psp_tiny", weights=str(teacher)))
    assert {"pixel", "pair", "adv", "critic"} <= set(online.last)
    alone = train(_cfg(sample_root, tmp_path / "alone", losses=()))
    assert set(alone.last) == {"lr", "task", "loss"}


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_equals_an_uninterrupted_run(sample_root, caches, tmp_path, workers):
    cache = str(caches / "dense.zarr")
    full = train(_cfg(sample_root, tmp_path / "full", cache=cache, iters=4, ckpt_every=2, workers=workers))

    with pytest.raises(Stop):
        train(_cfg(sample_root, tmp_path / "cut", cache=cache, iters=4, ckpt_every=2, workers=workers), stop_at(3))
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
        _cfg(sample_root, tmp_path / "x", cache="c", losses=("pixel", "fitnet"))
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
    from pipeline.registry import create_model

    save_weights(create_model("psp18_mini", num_classes=19), wrong, {"model_name": "psp18_mini", "num_classes": 19})
    with pytest.raises(WeightsError, match="does not fit psp_tiny"):
        train(_cfg(sample_root, tmp_path / "y", teacher="psp_tiny", weights=str(wrong)))


def test_nan_stops_with_a_clear_message_and_keeps_the_checkpoint(sample_root, caches, tmp_path):
    cfg = _cfg(sample_root, tmp_path / "nan", cache=str(caches / "dense.zarr"), iters=6, ckpt_every=2, lr=1e30)
    with pytest.raises(TrainingDivergedError, match=r"non-finite (at|by) step \d.*learning rate is too high"):
        train(cfg)
    last = tmp_path / "nan" / "checkpoints" / "last.pt"
    if last.exists():  # whatever was saved before the divergence is intact, readable and finite
        state = load_checkpoint(last)
        assert all(torch.isfinite(v).all() for part in ("model", "critic") for v in state[part].values())


def test_imagenet_init_and_a_trained_student_as_teacher(sample_root, tmp_path):
    from cache_tools import open_cache
    from pipeline.registry import create_model

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
            BuildConfig(
                teacher="psp_tiny",
                weights=weights,
                data=str(sample_root),
                out=str(out),
                loader_workers=0,
                teacher_check=False,  # one iteration of training is near chance by design
            )
        )
        assert open_cache(str(out)).schema.teacher.weights_sha256
    torch.save(
        {k: torch.zeros(64, 3, 7, 7) if k == "conv1.weight" else v for k, v in backbone.items()}, tmp_path / "tv.pth"
    )
    with pytest.raises(WeightsError, match="torchvision"):
        train(_cfg(sample_root, tmp_path / "tv", losses=(), iters=1, pretrained=str(tmp_path / "tv.pth")))


# ------------------------------------------------------------------------------------------------
# never save a non-finite number; name the term that went non-finite and its likely cause


def test_a_batch_without_labelled_pixels_has_zero_task_loss():
    from student.train import _cross_entropy

    logits = torch.randn(2, 4, 5, 5, requires_grad=True)
    label = torch.full((2, 9, 9), 255)
    loss = _cross_entropy(logits, label, 255)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0
    label[0, 0, 0] = 1  # with one labelled pixel it is the mean CE over labelled pixels, as before
    up = torch.nn.functional.interpolate(logits.detach(), size=(9, 9), mode="bilinear", align_corners=True)
    expected = torch.nn.functional.cross_entropy(up, label, ignore_index=255)
    assert torch.allclose(_cross_entropy(logits.detach(), label, 255), expected)


def test_save_checkpoint_refuses_non_finite_tensors(tmp_path):
    from student.checkpoint import save_checkpoint

    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}}, path)
    before = path.read_bytes()
    state = {
        "model": {"w": torch.ones(2)},
        "critic_optimizer": {"state": {3: {"exp_avg_sq": torch.tensor([1.0, 1e39])}}},
    }
    with pytest.raises(WeightsError, match=r"critic_optimizer\.state\.3\.exp_avg_sq holds NaN/inf"):
        save_checkpoint(state, path)
    assert path.read_bytes() == before and not (tmp_path / "last.pt.tmp").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_no_tmp(tmp_path):
    from cache_tools.errors import CacheWriteError
    from student.checkpoint import save_checkpoint

    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}}, path)
    before = path.read_bytes()
    (tmp_path / "last.pt.tmp").symlink_to("/dev/full")  # every write to it fails with ENOSPC
    with pytest.raises(CacheWriteError, match=r"the disk is full; the previous last\.pt is kept unchanged"):
        save_checkpoint({"model": {"w": torch.zeros(10000)}}, path)
    assert path.read_bytes() == before and not (tmp_path / "last.pt.tmp").is_symlink()


def test_lr_overflow_saves_nothing_and_names_the_learning_rate(sample_root, tmp_path):
    with pytest.raises(TrainingDivergedError) as info:
        train(_cfg(sample_root, tmp_path / "run", teacher="psp_tiny", teacher_random_weights=True, iters=1, lr=1e38))
    msg = str(info.value)
    assert "student's parameters after the update" in msg and "--lr 1e+38" in msg and "WGAN" not in msg
    assert "no checkpoint was saved" in msg and "\n" not in msg
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def _teacher(path, value: float):
    """A psp_tiny teacher file whose every parameter is ``value``."""
    from pipeline.registry import create_model

    model = create_model("psp_tiny", num_classes=19)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    save_weights(model, path, {"model_name": "psp_tiny", "num_classes": 19})
    return str(path)


def test_teacher_outputs_that_overflow_are_blamed_on_the_teacher_not_the_critic(sample_root, tmp_path):
    weights = _teacher(tmp_path / "huge.safetensors", 1e30)  # finite weights, outputs overflow to inf/NaN
    with pytest.raises(
        TrainingDivergedError, match=r"the teacher targets became non-finite at step 1.*check --weights"
    ):
        train(_cfg(sample_root, tmp_path / "run", teacher="psp_tiny", weights=weights, iters=2))
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_non_finite_initial_weights_are_refused_before_training(sample_root, tmp_path):
    weights = _teacher(tmp_path / "nan.safetensors", float("nan"))
    with pytest.raises(WeightsError, match=r"--weights .*nan\.safetensors: tensor .* holds NaN/inf values"):
        train(_cfg(sample_root, tmp_path / "run", teacher="psp_tiny", weights=weights, iters=2))
    with pytest.raises(WeightsError, match=r"--pretrained .*: tensor .* holds NaN/inf values"):
        train(_cfg(sample_root, tmp_path / "run2", losses=(), iters=1, pretrained=weights))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_divergence_after_a_good_checkpoint_keeps_it(sample_root, tmp_path):
    run = tmp_path / "run"
    train(_cfg(sample_root, run, losses=(), iters=2))
    kept = {p: p.read_bytes() for p in (run / "checkpoints" / "last.pt", run / "model.safetensors")}
    with pytest.raises(TrainingDivergedError, match=r"last good checkpoint .*last\.pt \(step 2\) is kept"):
        train(_cfg(sample_root, run, losses=(), iters=5, lr=1e38, resume=True))
    assert {p: p.read_bytes() for p in kept} == kept


def test_resume_refuses_a_checkpoint_holding_nan(sample_root, tmp_path):
    run = tmp_path / "run"
    train(_cfg(sample_root, run, losses=(), iters=1))
    last = run / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    next(iter(state["optimizer"]["state"].values()))["momentum_buffer"].fill_(float("nan"))
    torch.save(state, last)  # as an older skd wrote them
    with pytest.raises(
        WeightsError, match=r"--resume: .* holds NaN/inf values \(optimizer\.state\.0\.momentum_buffer\)"
    ):
        train(_cfg(sample_root, run, losses=(), iters=2, resume=True))


# ------------------------------------------------------------------------------------------------
# issue 10 bugs


def test_pair_spec_keeps_a_non_square_fixed_kernel():
    from student.losses import PairWiseLoss
    from student.train import _pair_spec

    spec = _pair_spec(PairWiseLoss(pool="max", fixed_kernel=(2, 3)))
    assert spec.kernel((9, 17)) == (2, 3)
    assert _pair_spec(PairWiseLoss.cirkd()).kernel((9, 17)) == (2, 2)


def test_draw_sampler_builds_one_permutation_per_epoch(monkeypatch):
    import numpy as np

    from student.data import DrawSampler

    calls = []
    real = np.random.default_rng

    def counting(seed=None):
        calls.append(seed)
        return real(seed)

    stream = iter(DrawSampler(10, seed=1))
    monkeypatch.setattr(np.random, "default_rng", counting)
    draws = [next(stream) for _ in range(30)]
    monkeypatch.undo()
    assert len(calls) == 3  # three epochs, not one permutation per draw
    for e in range(3):  # and the stream is unchanged: epoch e is the (seed, e) permutation
        assert [d - 10 * e for d in draws[10 * e : 10 * e + 10]] == list(np.random.default_rng([1, e]).permutation(10))


def _fake_eval(mious):
    def evaluate(s, step):
        return {"step": step, "miou": mious[step], "pixel_accuracy": 0.0, "per_class": {}}

    return evaluate


@pytest.mark.slow
def test_resume_keeps_the_best_checkpoint_unless_it_is_beaten(sample_root, tmp_path, monkeypatch):
    import student.train as train_module

    # evaluations every 2 steps; last.pt every 4; best.pt written at step 6 is newer than last.pt
    monkeypatch.setattr(train_module, "_evaluate", _fake_eval({2: 0.3, 4: 0.5, 6: 0.6, 8: 0.55, 10: 0.1}))
    cfg = dict(losses=(), iters=10, eval_every=2, ckpt_every=4, log_every=1)

    with pytest.raises(Stop):
        train(_cfg(sample_root, tmp_path / "run", **cfg), stop_at(7))
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    assert load_checkpoint(best)["step"] == 6
    train(_cfg(sample_root, tmp_path / "run", resume=True, **cfg))
    assert load_checkpoint(best)["step"] == 6  # 0.55 at step 8 does not beat 0.6


def _folder_dataset(root, splits: dict[str, int], size=(64, 96)):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir()
    (root / "classes.txt").write_text("road\ncar\nsky\n")
    for split, n in splits.items():
        for d in ("images", "masks"):
            (root / d / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "images" / split / f"{i}.png")
            Image.fromarray(rng.integers(0, 3, size, dtype=np.uint8)).save(root / "masks" / split / f"{i}.png")
    return root


def test_a_folder_layout_split_of_any_name_is_evaluated(tmp_path):
    from student.train import check_eval_split

    data = _folder_dataset(tmp_path / "data", {"train": 2, "minival": 1})
    result = train(_cfg(data, tmp_path / "run", losses=(), iters=1, eval_split="minival"))
    assert result.eval is not None and (tmp_path / "run" / "eval.json").exists()
    with pytest.raises(ConfigError, match=r"--eval-split nosuch: .*available: minival, train"):
        check_eval_split(_cfg(data, tmp_path / "x", losses=(), eval_split="nosuch"))
    assert check_eval_split(_cfg(data, tmp_path / "x", losses=(), eval_split="none")) is None


def test_deterministic_training_is_on_during_the_run_and_restored_after(sample_root, tmp_path):
    seen = []
    before = torch.are_deterministic_algorithms_enabled()
    train(
        _cfg(sample_root, tmp_path / "run", losses=(), iters=1, deterministic=True),
        lambda *a: seen.append(torch.are_deterministic_algorithms_enabled()),
    )
    assert seen == [True] and torch.are_deterministic_algorithms_enabled() == before


def test_the_online_teacher_sees_the_unjittered_crop(sample_root, tmp_path):
    from pipeline.registry import create_model
    from student.data import SegTrainData, collate_samples
    from student.distributed import DistEnv
    from student.train import _setup, train_step

    teacher = tmp_path / "teacher.safetensors"
    save_weights(create_model("psp_tiny", num_classes=19), teacher, {"model_name": "psp_tiny", "num_classes": 19})
    cfg = _cfg(sample_root, tmp_path / "run", teacher="psp_tiny", weights=str(teacher), photometric=0.4)
    s = _setup(cfg, DistEnv())
    seen = []
    s.teacher.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    batch = collate_samples([s.data[0], s.data[1]])
    train_step(s, batch, 0)
    clean = SegTrainData(str(sample_root), crop=(64, 64), photometric=0.0)
    expected = torch.stack([clean[0].image, clean[1].image])
    assert not torch.equal(batch.image.nan_to_num(), expected.nan_to_num())  # the student's input is jittered
    assert torch.equal(seen[0].nan_to_num(), expected.nan_to_num())


def test_a_full_disk_at_the_model_file_keeps_last_pt_and_resume_finishes(sample_root, tmp_path, monkeypatch):
    import errno

    import student.train as train_module
    from cache_tools.errors import CacheWriteError

    def full_disk(module, path, metadata):
        path.with_name(path.name + ".tmp").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    run = tmp_path / "run"
    monkeypatch.setattr(train_module, "save_weights", full_disk)
    with pytest.raises(CacheWriteError, match=r"model\.safetensors: the disk is full; .*last\.pt is kept: free space"):
        train(_cfg(sample_root, run, losses=(), iters=2))
    assert (
        not (run / "model.safetensors.tmp").exists() and load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2
    )
    monkeypatch.undo()
    result = train(_cfg(sample_root, run, losses=(), iters=2, resume=True))
    assert (run / "model.safetensors").exists() and result.weights
