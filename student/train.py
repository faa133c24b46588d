"""Stage two: train a student with pixel-wise, pair-wise and holistic distillation.

Read :func:`train` top to bottom: it sets up (data, models, losses, optimisers), optionally
resumes, then runs a plain iteration loop of :func:`train_step`. Teacher targets come from a cache
(``TrainConfig.cache``: read by the DataLoader workers, no teacher in the loop) or from a teacher
run online on the same crops (``TrainConfig.teacher``: the A/B reference). Defaults are the official
SKD script's (skd_spec §3–§4); docs/training.md lists which are the paper's or CIRKD's options.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cache_tools.errors import ConfigError, SkdError, WeightsError
from pipeline.inference import autocast, pick_device
from pipeline.teachers import create_teacher, save_weights
from pipeline.views import OFFICIAL_SCALES

from .checkpoint import load_checkpoint, save_checkpoint
from .critic import Critic
from .data import DrawSampler, PairSpec, SegTrainData, TrainBatch, collate_samples, raise_worker_error
from .distributed import DistEnv, all_reduce_grads, check_in_sync, dist_env, init_distributed, shutdown_distributed
from .losses import DistillationWeights, HolisticLoss, PairWiseLoss, PixelWiseLoss
from .models import create_student

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "check_out_dir",
    "poly_lr",
    "train",
    "train_step",
]

logger = logging.getLogger(__name__)

LOSS_NAMES = ("pixel", "pair", "holistic")


class TrainingDivergedError(SkdError):
    """A loss became NaN/inf; the run stopped and kept its last good checkpoint."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything ``skdstudent train`` needs; flags map one-to-one onto these fields."""

    data: str
    out: str
    student: str = "psp18"
    cache: str | None = None
    teacher: str | None = None
    weights: str | None = None
    teacher_random_weights: bool = False
    losses: tuple[str, ...] = LOSS_NAMES
    splits: tuple[str, ...] = ("train",)
    iters: int = 40000
    batch_size: int = 8
    crop: tuple[int, int] = (512, 512)
    scales: tuple[float, ...] | None = None  # None: the official 0.7..2.1
    flip: bool = True
    photometric: float = 0.0
    # student optimisation (official script)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    pretrained: str | None = None
    sync_bn: bool = False
    # distillation (official defaults; see DistillationWeights)
    lambda_pi: float = 10.0
    lambda_pa: float = 0.5
    lambda_d: float = 0.1
    lambda_gp: float = 10.0
    aux_weight: float = 0.4
    pixel_mode: str = "official"  # or "kl" (CIRKD)
    temperature: float = 1.0
    pair_preset: str = "official"  # or "paper" (avg pooling), "cirkd" (2x2 max, F.normalize)
    adversarial: str = "wgan-gp"  # or "hinge" (CIRKD)
    critic_optimizer: str = "sgd"  # official; or "adam" (CIRKD, TorchDistiller)
    critic_lr: float = 4e-4
    critic_image: bool = False  # the paper's image-conditioned critic
    # execution
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    amp: bool = True
    eval_every: int = 0  # 0: only at the end
    eval_split: str = "val"
    eval_mode: str = "whole"
    ckpt_every: int = 0  # 0: every eval, and at the end
    log_every: int = 10
    resume: bool = False
    storage_options: dict = field(default_factory=dict)
    cache_dir: str | None = None
    tensorboard: bool = False
    deterministic: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.losses) - set(LOSS_NAMES)
        if unknown:
            raise ConfigError(f"unknown loss {sorted(unknown)[0]!r}; --losses takes pixel, pair, holistic or none")
        if self.cache and self.teacher:
            raise ConfigError("give either --cache or --teacher (online), not both")
        if self.losses and not (self.cache or self.teacher):
            raise ConfigError(
                f"--losses {','.join(self.losses)} needs teacher targets: pass --cache URL or --teacher NAME --weights PATH "
                "(or --losses none to train on the task loss alone)"
            )
        if self.teacher and not (self.weights or self.teacher_random_weights):
            raise ConfigError(f"--teacher {self.teacher} needs --weights PATH")
        if self.iters < 1 or self.batch_size < 1:
            raise ConfigError("--iters and --batch-size must be at least 1")
        if self.pixel_mode not in ("official", "kl"):
            raise ConfigError("--pixel-mode must be official or kl")
        if self.pixel_mode == "official" and self.temperature != 1.0:
            raise ConfigError("the official pixel-wise loss uses T=1; use --pixel-mode kl for a temperature")
        if self.pair_preset not in ("official", "paper", "cirkd"):
            raise ConfigError("--pair must be official, paper or cirkd")
        if self.adversarial not in ("wgan-gp", "hinge"):
            raise ConfigError("--adversarial must be wgan-gp or hinge")
        if self.critic_optimizer not in ("sgd", "adam"):
            raise ConfigError("--critic-optimizer must be sgd or adam")
        if self.eval_mode not in ("whole", "slide"):
            raise ConfigError("--eval-mode must be whole or slide")
        DistillationWeights(
            lambda_pi=self.lambda_pi,
            lambda_pa=self.lambda_pa,
            lambda_d=self.lambda_d,
            lambda_gp=self.lambda_gp,
            aux_weight=self.aux_weight,
        )

    @property
    def weights_(self) -> DistillationWeights:
        return DistillationWeights(
            lambda_pi=self.lambda_pi,
            lambda_pa=self.lambda_pa,
            lambda_d=self.lambda_d,
            lambda_gp=self.lambda_gp,
            aux_weight=self.aux_weight,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["storage_options"] = {k: "***" for k in self.storage_options}  # never write secrets to disk
        return d


@dataclass
class TrainResult:
    out: str
    steps: int
    seconds: float
    step_seconds: float
    last: dict[str, float]
    eval: dict[str, Any] | None
    checkpoint: str
    weights: str


# ------------------------------------------------------------------------------------------------
# small pieces


def poly_lr(base: float, step: int, iters: int, power: float = 0.9) -> float:
    """The official poly schedule: ``base * (1 - step / iters) ** power``."""
    return base * (1 - step / iters) ** power


def _pair_loss(preset: str) -> PairWiseLoss:
    return {"official": PairWiseLoss.official, "paper": PairWiseLoss.paper, "cirkd": PairWiseLoss.cirkd}[preset]()


def _pair_spec(loss: PairWiseLoss) -> PairSpec:
    fixed = (
        loss.fixed_kernel if isinstance(loss.fixed_kernel, int) or loss.fixed_kernel is None else loss.fixed_kernel[0]
    )
    return PairSpec(pool=loss.pool, pool_scale=loss.pool_scale, fixed_kernel=fixed)


def _task_loss(out, label: Tensor, aux_weight: float) -> Tensor:
    """CE at the label resolution (logits upsampled bilinearly, align_corners=True) + aux_weight * aux CE."""
    size = label.shape[-2:]
    up = F.interpolate(out.logits.float(), size=size, mode="bilinear", align_corners=True)
    loss = F.cross_entropy(up, label, ignore_index=255)
    if out.aux is not None and aux_weight > 0:
        up_aux = F.interpolate(out.aux.float(), size=size, mode="bilinear", align_corners=True)
        loss = loss + aux_weight * F.cross_entropy(up_aux, label, ignore_index=255)
    return loss


def _valid_on_grid(label: Tensor, grid: tuple[int, int]) -> Tensor:
    """Label != ignore at the grid nodes (nearest node pixel, align_corners=True positions)."""
    h, w = label.shape[-2:]
    ys = torch.linspace(0, h - 1, grid[0], device=label.device).round().long()
    xs = torch.linspace(0, w - 1, grid[1], device=label.device).round().long()
    return label[:, ys][:, :, xs] != 255


@dataclass
class Targets:
    logits: Tensor | None
    nodes: Tensor | None
    grid: tuple[int, int]


@dataclass
class Setup:
    """What the loop needs; built once by :func:`_setup`."""

    config: TrainConfig
    env: DistEnv
    device: torch.device
    model: nn.Module
    module: nn.Module  # model without the DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    data: SegTrainData
    pixel: PixelWiseLoss | None
    pair: PairWiseLoss | None
    holistic: HolisticLoss | None
    critic_optimizer: torch.optim.Optimizer | None
    teacher: nn.Module | None
    out: Path


def _teacher_targets(s: Setup, batch: TrainBatch) -> Targets:
    """Cached targets from the batch, or the online teacher on the same crops."""
    if s.teacher is None:
        return Targets(batch.teacher_logits, batch.teacher_nodes, batch.teacher_grid)
    with torch.no_grad(), autocast(s.device, s.config.amp):
        out = s.teacher(batch.image)
    logits = out.logits.float()
    nodes = s.pair.nodes(out.feature.float()) if s.pair is not None else None
    return Targets(logits, nodes, tuple(logits.shape[-2:]))


def train_step(s: Setup, batch: TrainBatch, step: int) -> dict[str, float]:
    """One iteration: student step (task + distillation), then one critic step (1:1, official)."""
    cfg, w = s.config, s.config.weights_
    lr = poly_lr(cfg.lr, step, cfg.iters, cfg.poly_power)
    for g in s.optimizer.param_groups:
        g["lr"] = lr
    targets = _teacher_targets(s, batch)
    image = batch.image if cfg.critic_image else None
    metrics: dict[str, float] = {"lr": lr}

    s.model.train()
    with autocast(s.device, cfg.amp):
        out = s.model(batch.image)
        terms = {"task": _task_loss(out, batch.label, w.aux_weight)}
        if s.pixel is not None:
            valid = _valid_on_grid(batch.label, targets.grid) if cfg.pixel_mode == "kl" else None
            terms["pixel"] = w.lambda_pi * s.pixel(out.logits, targets.logits, valid)
        if s.pair is not None:
            terms["pair"] = w.lambda_pa * s.pair(out.feature, targets.nodes, targets.grid)
    if s.holistic is not None:
        with autocast(s.device, False):  # the critic runs in fp32
            terms["adv"] = w.lambda_d * s.holistic.generator_term(out.logits.float(), targets.grid, image)
    loss = sum(terms.values())
    metrics.update({k: float(v.detach()) for k, v in terms.items()})
    metrics["loss"] = float(loss.detach())
    if not math.isfinite(metrics["loss"]):
        raise _diverged(step, metrics)

    s.optimizer.zero_grad(set_to_none=True)
    if s.scaler is not None:
        s.scaler.scale(loss).backward()
        s.scaler.step(s.optimizer)
        s.scaler.update()
    else:
        loss.backward()
        s.optimizer.step()

    if s.holistic is not None:
        if cfg.critic_optimizer == "sgd":
            for g in s.critic_optimizer.param_groups:
                g["lr"] = poly_lr(cfg.critic_lr, step, cfg.iters, cfg.poly_power)
        s.critic_optimizer.zero_grad(set_to_none=True)
        d_loss, parts = s.holistic.critic_term(out.logits.float(), targets.logits.float(), image)
        d_loss = w.lambda_d * d_loss
        if not math.isfinite(float(d_loss.detach())):
            metrics["critic"] = float(d_loss.detach())
            raise _diverged(step, metrics)
        d_loss.backward()
        all_reduce_grads(s.holistic.critic, s.env)
        s.critic_optimizer.step()
        metrics["critic"] = float(d_loss.detach())
        metrics.update({f"critic_{k}": float(v) for k, v in parts.items()})
    return metrics


def _diverged(step: int, metrics: dict[str, float]) -> TrainingDivergedError:
    terms = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "lr")
    return TrainingDivergedError(
        f"a loss became non-finite at step {step} ({terms}); training stopped and the last good checkpoint "
        "is kept — the official WGAN critic is known to diverge: try --adversarial hinge, a lower --lambda-d "
        "or --critic-optimizer adam, then --resume"
    )


# ------------------------------------------------------------------------------------------------
# setup


def check_out_dir(cfg: TrainConfig) -> Path:
    """--out must be writable; it must hold a run exactly when --resume is given."""
    out = Path(cfg.out)
    ckpt = out / "checkpoints" / "last.pt"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write to --out {out}: {exc.strerror or exc}") from None
    if ckpt.exists() and not cfg.resume:
        raise ConfigError(f"{out} already holds a run ({ckpt}); pass --resume to continue it or choose another --out")
    if cfg.resume and not ckpt.exists():
        raise ConfigError(f"--resume: no checkpoint in {out} (expected {ckpt})")
    return out


def _prepare_out(cfg: TrainConfig, env: DistEnv) -> Path:
    return check_out_dir(cfg) if env.rank == 0 else Path(cfg.out)


def _setup(cfg: TrainConfig, env: DistEnv) -> Setup:
    device = env.device if env.world > 1 else pick_device(cfg.device)
    out = _prepare_out(cfg, env)
    torch.manual_seed(cfg.seed)

    want = set(cfg.losses)
    pair = _pair_loss(cfg.pair_preset) if "pair" in want else None
    data = SegTrainData(
        cfg.data,
        cfg.splits,
        cfg.crop,
        cache=cfg.cache if want else None,
        pair=_pair_spec(pair) if (pair is not None and cfg.cache) else None,
        need_logits=bool(want & {"pixel", "holistic"}),
        scales=cfg.scales or OFFICIAL_SCALES,
        flip=cfg.flip,
        photometric=cfg.photometric,
        seed=cfg.seed,
        storage_options=cfg.storage_options or None,
        cache_dir=cfg.cache_dir,
    )
    num_classes = data.dataset.num_classes
    model = create_student(cfg.student, num_classes=num_classes, pretrained=cfg.pretrained).to(device)
    if cfg.sync_bn and env.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    module = model
    if env.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if (device.type == "cuda" and cfg.amp) else None

    teacher = None
    if cfg.teacher and want:
        teacher = create_teacher(
            cfg.teacher,
            num_classes=num_classes,
            weights=cfg.weights,
            random_weights=cfg.teacher_random_weights,
            device=str(device),
        ).model
    pixel = PixelWiseLoss(cfg.pixel_mode, cfg.temperature) if "pixel" in want else None
    holistic = critic_optimizer = None
    if "holistic" in want:
        grid = data.teacher_grid
        critic = Critic(num_classes, input_size=grid, image_channels=3 if cfg.critic_image else 0).to(device)
        holistic = HolisticLoss(critic, cfg.adversarial, cfg.lambda_gp).to(device)
        if cfg.critic_optimizer == "sgd":
            critic_optimizer = torch.optim.SGD(
                critic.parameters(), lr=cfg.critic_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        else:
            critic_optimizer = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr, betas=(0.9, 0.99))
        if env.world > 1:  # every rank starts from rank 0's critic
            for p in critic.state_dict().values():
                torch.distributed.broadcast(p, 0)
    return Setup(
        cfg, env, device, model, module, optimizer, scaler, data, pixel, pair, holistic, critic_optimizer, teacher, out
    )


def _loader(s: Setup, start_step: int) -> DataLoader:
    cfg = s.config
    sampler = DrawSampler(
        len(s.data), seed=cfg.seed, rank=s.env.rank, world=s.env.world, start=start_step * cfg.batch_size
    )
    return DataLoader(
        s.data,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        collate_fn=collate_samples,
        pin_memory=s.device.type == "cuda",
        drop_last=True,
        # the loader draws its base seed from this generator, not from the global RNG that dropout
        # and the gradient penalty use, so a resumed run's RNG stream is exactly the original's
        generator=torch.Generator().manual_seed(cfg.seed),
        persistent_workers=cfg.workers > 0,
        prefetch_factor=4 if cfg.workers > 0 else None,
        # fsspec filesystems and zarr's event loop are not fork-safe: start workers fresh
        multiprocessing_context="forkserver" if cfg.workers > 0 else None,
    )


# ------------------------------------------------------------------------------------------------
# checkpoints


def _checkpoint_path(out: Path, name: str = "last.pt") -> Path:
    return out / "checkpoints" / name


def _save_checkpoint(s: Setup, step: int, metrics: dict, name: str = "last.pt") -> Path:
    state = {
        "step": step,
        "model_name": s.config.student,
        "num_classes": s.data.dataset.num_classes,
        "model": s.module.state_dict(),
        "optimizer": s.optimizer.state_dict(),
        "critic": s.holistic.critic.state_dict() if s.holistic is not None else None,
        "critic_optimizer": s.critic_optimizer.state_dict() if s.critic_optimizer is not None else None,
        "scaler": s.scaler.state_dict() if s.scaler is not None else None,
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "config": json.dumps(s.config.to_dict()),
        "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
    }
    return save_checkpoint(state, _checkpoint_path(s.out, name))


def _restore(s: Setup) -> int:
    state = load_checkpoint(_checkpoint_path(s.out))
    old = json.loads(state["config"])
    for key in ("student", "cache", "teacher", "losses", "batch_size", "crop", "data"):
        now = s.config.to_dict()[key]
        before = old.get(key)
        if isinstance(now, tuple):
            now = list(now)
        if before != now:
            raise ConfigError(f"--resume: the run was started with {key}={before!r}, not {now!r}")
    if state["model_name"] != s.config.student or state["num_classes"] != s.data.dataset.num_classes:
        raise WeightsError("--resume: the checkpoint belongs to another model or class count")
    s.module.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    if s.holistic is not None and state.get("critic") is not None:
        s.holistic.critic.load_state_dict(state["critic"])
        s.critic_optimizer.load_state_dict(state["critic_optimizer"])
    if s.scaler is not None and state.get("scaler"):
        s.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_torch"])
    if state.get("rng_cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"])


# ------------------------------------------------------------------------------------------------
# logging


class _Log:
    """metrics.jsonl (and TensorBoard when installed and asked for), rank 0 only."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.file = open(out / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115 - closed in close()
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                logger.warning("--tensorboard: tensorboard is not installed; logging to metrics.jsonl only")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _evaluate(s: Setup, step: int) -> dict | None:
    if s.config.eval_split not in _available_splits(s.config.data):
        return None
    from .evaluate import evaluate_model

    s.module.eval()
    try:
        result = evaluate_model(
            s.module, s.config.data, split=s.config.eval_split, mode=s.config.eval_mode, device=s.device
        )
    finally:
        s.module.train()
    return {"step": step, "miou": result.miou, "pixel_accuracy": result.pixel_accuracy, "per_class": result.per_class}


def _available_splits(root: str) -> set[str]:
    from cache_tools.datasets import open_dataset

    found = set()
    for split in ("train", "val", "test"):
        with contextlib.suppress(SkdError):
            open_dataset(root, splits=(split,))
            found.add(split)
    return found


# ------------------------------------------------------------------------------------------------
# the loop


def _replicated(s: Setup) -> dict[str, nn.Module]:
    out = {"student": s.module}
    if s.holistic is not None:
        out["critic"] = s.holistic.critic
    return out


def train(config: TrainConfig, progress: Callable[[int, int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train a student; returns the final metrics, evaluation and output paths.

    Args:
        progress: called with ``(step, iters, metrics)`` every ``log_every`` steps (rank 0).
    """
    env = dist_env()
    init_distributed(env)
    try:
        return _train(config, env, progress)
    finally:
        shutdown_distributed(env)


def _train(cfg: TrainConfig, env: DistEnv, progress) -> TrainResult:
    s = _setup(cfg, env)
    if env.rank == 0:
        (s.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    start = _restore(s) if cfg.resume else 0
    log = _Log(s.out, env.rank == 0, cfg.tensorboard)
    loader = _loader(s, start)
    batches = iter(loader)
    eval_every = cfg.eval_every
    ckpt_every = cfg.ckpt_every or eval_every
    metrics: dict[str, float] = {}
    eval_result = None
    best = -1.0
    t0 = time.perf_counter()
    step_time = 0.0
    steps_run = 0
    try:
        for step in range(start, cfg.iters):
            batch = raise_worker_error(next(batches)).to(s.device)
            ts = time.perf_counter()
            metrics = train_step(s, batch, step)
            step_time += time.perf_counter() - ts
            steps_run += 1
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.iters:
                record = {"step": done, **metrics, "seconds": round(time.perf_counter() - t0, 3)}
                log.write(record)
                if progress is not None and env.rank == 0:
                    progress(done, cfg.iters, metrics)
            if eval_every and done % eval_every == 0 and done != cfg.iters and env.rank == 0:
                eval_result = _evaluate(s, done)
                if eval_result is not None:
                    log.write({"step": done, "eval_miou": eval_result["miou"]})
                    if eval_result["miou"] > best:
                        best = eval_result["miou"]
                        _save_checkpoint(s, done, metrics, "best.pt")
            if ckpt_every and done % ckpt_every == 0 and done != cfg.iters:
                check_in_sync(_replicated(s), env)
                if env.rank == 0:
                    _save_checkpoint(s, done, metrics)
                env.barrier()
        seconds = time.perf_counter() - t0
        checkpoint = weights = ""
        check_in_sync(_replicated(s), env)
        if env.rank == 0:
            checkpoint = str(_save_checkpoint(s, cfg.iters, metrics))
            weights = str(
                save_weights(
                    s.module,
                    s.out / "model.safetensors",
                    {"model_name": cfg.student, "num_classes": s.data.dataset.num_classes, "steps": cfg.iters},
                )
            )
            eval_result = _evaluate(s, cfg.iters)
            if eval_result is not None:
                log.write({"step": cfg.iters, "eval_miou": eval_result["miou"], "final": True})
                (s.out / "eval.json").write_text(json.dumps(eval_result, indent=2))
        env.barrier()
    finally:
        log.close()
        del batches, loader
    return TrainResult(
        out=str(s.out),
        steps=cfg.iters,
        seconds=seconds,
        step_seconds=step_time / max(1, steps_run),
        last=metrics,
        eval=eval_result,
        checkpoint=checkpoint,
        weights=weights,
    )
