"""Stage two: train a student with SKD's pixel-wise, pair-wise and holistic terms, or KD, CWD, DIST, IFVD.

Read :func:`train` top to bottom: it sets up (data, models, losses, optimisers), optionally
resumes, then runs a plain iteration loop of :func:`train_step`. Teacher targets come from a cache
(``TrainConfig.cache``: read by the DataLoader workers, no teacher in the loop) or from a teacher
run online on the same crops (``TrainConfig.teacher``: the A/B reference). Defaults are the official
SKD script's (skd_spec §3–§4); docs/training.md lists which are the paper's or CIRKD's options.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cache_tools.datasets import open_dataset
from cache_tools.errors import CacheWriteError, ConfigError, DatasetError, SkdError, WeightsError
from cache_tools.options import MAX_SEED, MAX_SIDE, check_options, option
from cache_tools.workers import start_workers
from pipeline.families import family_of
from pipeline.inference import PRECISIONS, autocast, check_precision, pick_device, teacher_precision
from pipeline.teachers import create_teacher
from pipeline.views import OFFICIAL_SCALES
from pipeline.weights import save_weights

from .checkpoint import first_nonfinite, load_checkpoint, save_checkpoint
from .critic import Critic
from .data import DrawSampler, PairSpec, SegTrainData, TrainBatch, collate_samples, raise_worker_error
from .distributed import DistEnv, all_reduce_grads, check_in_sync, dist_env, init_distributed, shutdown_distributed
from .losses import (
    ChannelWiseLoss,
    DistillationWeights,
    DISTLoss,
    HolisticLoss,
    IFVDLoss,
    KDLoss,
    PairWiseLoss,
    PixelWiseLoss,
    TargetNeed,
)
from .models import create_student

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "check_cache_serves",
    "check_eval_split",
    "check_out_dir",
    "poly_lr",
    "train",
    "train_step",
    "valid_on_grid",
]

logger = logging.getLogger(__name__)

#: SKD's three terms (the default), and the methods served from the same stored targets (issue 13).
LOSS_NAMES = ("pixel", "pair", "holistic")
METHOD_NAMES = ("kd", "cwd", "dist", "ifvd")
ALL_LOSSES = LOSS_NAMES + METHOD_NAMES
#: What each loss reads from the teacher, as the loss declares it (checked against a cache at start).
NEEDS: dict[str, TargetNeed] = {
    "pixel": PixelWiseLoss.needs,
    "pair": PairWiseLoss.needs,
    "holistic": HolisticLoss.needs,
    "kd": KDLoss.needs,
    "cwd": ChannelWiseLoss.needs,
    "dist": DISTLoss.needs,
    "ifvd": IFVDLoss.needs,
}


class TrainingDivergedError(SkdError):
    """A loss, the teacher targets or the weights went NaN/inf; the run stopped without saving them."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything ``skdstudent train`` needs; each field is one ``skdstudent train`` flag.

    Choices and ranges live on the fields (:func:`cache_tools.options.option`): a library caller gets
    the same one-line :class:`ConfigError` as a CLI user, and the CLI tests check every flag's
    default and help against them. Fields marked ``internal`` have no flag on purpose.
    """

    data: str
    out: str
    student: str = "psp18"
    cache: str | None = None
    teacher: str | None = None
    weights: str | None = None
    teacher_random_weights: bool = option(False, internal=True)  # smoke tests of the online mode
    losses: tuple[str, ...] = LOSS_NAMES
    splits: tuple[str, ...] = option(("train",), flag="--split")
    labelled_share: float | None = option(None, lo=0, hi=1)  # None: the splits' natural proportion
    iters: int = option(40000, lo=1, hi=10**9)
    batch_size: int = option(8, lo=1, hi=4096)
    crop: tuple[int, int] = option((512, 512), lo=1, hi=MAX_SIDE)
    scales: tuple[float, ...] | None = option(None, lo=0, lo_open=True, hi=16)  # None: the official 0.7..2.1
    flip: bool = option(True, flag="--no-flip")
    photometric: float = option(0.0, lo=0, hi=1)
    # student optimisation (official script)
    lr: float = option(0.01, lo=0, lo_open=True)
    momentum: float = option(0.9, lo=0, hi=0.999)
    weight_decay: float = option(5e-4, lo=0, hi=1)
    poly_power: float = option(0.9, lo=0, hi=10)
    pretrained: str | None = None
    sync_bn: bool = False
    # distillation (official defaults; see DistillationWeights)
    lambda_pi: float = option(10.0, lo=0)
    lambda_pa: float = option(0.5, lo=0)
    lambda_d: float = option(0.1, lo=0)
    lambda_gp: float = option(10.0, lo=0)
    aux_weight: float = option(0.4, lo=0)
    pixel_mode: str = option("official", choices=("official", "kl"))  # kl: CIRKD
    temperature: float = option(1.0, lo=0, lo_open=True, hi=100)
    # paper: avg pooling; cirkd: 2x2 max, F.normalize
    pair_preset: str = option("official", flag="--pair", choices=("official", "paper", "cirkd"))
    adversarial: str = option("wgan-gp", choices=("wgan-gp", "hinge"))  # hinge: CIRKD
    critic_optimizer: str = option("sgd", choices=("sgd", "adam"))  # adam: CIRKD, TorchDistiller
    critic_lr: float = option(4e-4, lo=0, lo_open=True)
    critic_image: bool = False  # the paper's image-conditioned critic
    # other methods (docs/training.md "Methods": each default is its reference code's, with the source)
    lambda_kd: float = option(1.0, lo=0)  # CIRKD train_kd.sh --lambda-kd 1.0
    kd_temperature: float = option(1.0, lo=0, lo_open=True, hi=100)  # CIRKD --kd-temperature 1
    lambda_cwd: float = option(3.0, lo=0)  # CIRKD train_cwd.sh --lambda-cwd-logit 3
    cwd_temperature: float = option(4.0, lo=0, lo_open=True, hi=100)  # CIRKD CriterionCWD(temperature=4)
    lambda_dist: float = option(1.0, lo=0)  # DIST_KD segmentation/train_kd.py --lambda-kd 1
    dist_beta: float = option(1.0, lo=0)  # DIST(beta=1, gamma=1)
    dist_gamma: float = option(1.0, lo=0)
    dist_temperature: float = option(1.0, lo=0, lo_open=True, hi=100)  # DIST segmentation: no temperature
    lambda_ifvd: float = option(20.0, lo=0)  # CIRKD train_ifvd.sh --lambda-ifv 20
    # execution
    seed: int = option(0, lo=0, hi=MAX_SEED)
    workers: int = option(2, lo=0, hi=256)
    device: str = "auto"
    amp: bool = option(True, flag="--no-amp")  # the student's autocast on CUDA
    # the online teacher's arithmetic, as skdcache build --precision (fp32: what a default cache stores)
    teacher_precision: str = option("fp32", choices=PRECISIONS)
    eval_every: int = option(0, lo=0)  # 0: only at the end
    eval_split: str = "val"
    eval_mode: str = option("whole", choices=("whole", "slide"))
    ckpt_every: int = option(0, lo=0)  # 0: every eval, and at the end
    log_every: int = option(10, lo=1)
    resume: bool = False
    storage_options: dict = option(default_factory=dict, flag="--storage-option")  # noqa: RUF009 (a field specifier)
    cache_dir: str | None = None
    tensorboard: bool = False
    # opt-in: on CUDA, bilinear and adaptive-pool backward have no deterministic kernel in torch
    deterministic: bool = option(False, flag="--deterministic")

    def __post_init__(self) -> None:
        check_options(self)
        unknown = set(self.losses) - set(ALL_LOSSES)
        if unknown:
            raise ConfigError(
                f"unknown loss {sorted(unknown)[0]!r}; --losses takes any of {', '.join(ALL_LOSSES)}, or none"
            )
        if self.cache and self.teacher:
            raise ConfigError("give either --cache or --teacher (online), not both")
        if self.losses and not (self.cache or self.teacher):
            raise ConfigError(
                f"--losses {','.join(self.losses)} needs teacher targets: pass --cache URL or --teacher NAME --weights PATH "
                "(or --losses none to train on the task loss alone)"
            )
        if self.teacher and not (self.weights or self.teacher_random_weights):
            raise ConfigError(f"--teacher {self.teacher} needs --weights PATH")
        if self.scales is not None and not self.scales:
            raise ConfigError("--scales needs at least one number")
        if self.pixel_mode == "official" and self.temperature != 1.0:
            raise ConfigError("the official pixel-wise loss uses T=1; use --pixel-mode kl for a temperature")
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
    """The data side of a pair-wise loss; a fixed kernel keeps both sides (``(kh, kw)`` need not be square)."""
    fixed = loss.fixed_kernel
    if fixed is not None and not isinstance(fixed, int):
        fixed = (int(fixed[0]), int(fixed[1]))
    return PairSpec(pool=loss.pool, pool_scale=loss.pool_scale, fixed_kernel=fixed)


def _cross_entropy(logits: Tensor, label: Tensor, ignore_index: int) -> Tensor:
    """CE at the label resolution (logits upsampled bilinearly, align_corners=True), mean over labelled pixels.

    A batch without any labelled pixel gives 0 (and no gradient), where the mean would be 0/0 = NaN.
    """
    up = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=True)
    total = F.cross_entropy(up, label, ignore_index=ignore_index, reduction="sum")
    return total / (label != ignore_index).sum().clamp_min(1)


def _task_loss(out, label: Tensor, aux_weight: float, ignore_index: int) -> Tensor:
    """Main-head CE + aux_weight * aux-head CE (the official deep supervision)."""
    loss = _cross_entropy(out.logits, label, ignore_index)
    if out.aux is not None and aux_weight > 0:
        loss = loss + aux_weight * _cross_entropy(out.aux, label, ignore_index)
    return loss


def valid_on_grid(label: Tensor, grid: tuple[int, int], ignore_index: int) -> Tensor:
    """Label != ignore at the grid nodes (nearest node pixel, align_corners=True positions)."""
    h, w = label.shape[-2:]
    ys = torch.linspace(0, h - 1, grid[0], device=label.device).round().long()
    xs = torch.linspace(0, w - 1, grid[1], device=label.device).round().long()
    return label[:, ys][:, :, xs] != ignore_index


@dataclass
class Targets:
    logits: Tensor | None
    nodes: Tensor | None
    grid: tuple[int, int]
    feature: Tensor | None = None  # the teacher's feature map at the grid (IFVD)


#: What can go non-finite, in blame order: when several do at the same step, the first is the cause.
WATCHED = ("targets", "task", "pixel", "pair", *METHOD_NAMES, "adv", "critic")


class FiniteWatch:
    """The first step at which each watched value went NaN/inf, kept on the device.

    :meth:`update` queues a few tiny kernels per step and never syncs; :meth:`first_bad` syncs once
    (at log, evaluation and checkpoint steps) and agrees across ranks.
    """

    def __init__(self, device: torch.device):
        self.first = torch.full((len(WATCHED),), -1, dtype=torch.long, device=device)
        self.device = device

    def update(self, step: int, values: dict[str, Tensor | None]) -> None:
        """Record which of ``values`` (any shape; None = not used) hold a non-finite number at ``step``."""
        bad = torch.zeros(len(WATCHED), dtype=torch.bool, device=self.device)
        for i, name in enumerate(WATCHED):
            v = values.get(name)
            if v is not None:
                bad[i] = ~torch.isfinite(v.detach()).all()
        self.first = torch.where((self.first < 0) & bad, step, self.first)

    def first_bad(self, env: DistEnv) -> dict[str, int]:
        """``{name: first step}`` of every value that went non-finite on any rank (one sync)."""
        first = self.first
        if env.world > 1:  # the earliest step over all ranks: every rank stops with the same message
            never = torch.iinfo(torch.long).max
            first = torch.where(first < 0, never, first)
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
            first = torch.where(first == never, -1, first)
        return {name: int(at) for name, at in zip(WATCHED, first.tolist(), strict=True) if at >= 0}


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
    methods: dict[str, nn.Module]  # the chosen kd/cwd/dist/ifvd losses, by name
    critic_optimizer: torch.optim.Optimizer | None
    teacher: nn.Module | None
    out: Path
    eval_split: str | None  # None: no evaluation
    watch: FiniteWatch


def _teacher_input(batch: TrainBatch) -> Tensor:
    """The crop the online teacher sees: un-jittered, as a cache's teacher saw it.

    Photometric jitter is the student's augmentation only; the data side hands the clean crop over
    as ``teacher_image`` when it jitters (otherwise ``image`` is clean).
    """
    return batch.image if batch.teacher_image is None else batch.teacher_image


def _teacher_targets(s: Setup, batch: TrainBatch) -> Targets:
    """Cached targets from the batch, or the online teacher on the same crops."""
    if s.teacher is None:
        return Targets(batch.teacher_logits, batch.teacher_nodes, batch.teacher_grid, batch.teacher_feature)
    with torch.no_grad(), teacher_precision(s.device, s.config.teacher_precision, flag="--teacher-precision"):
        out = s.teacher(_teacher_input(batch))
    logits = out.logits.float()
    nodes = s.pair.nodes(out.feature.float()) if s.pair is not None else None
    feature = out.feature.float() if "ifvd" in s.methods else None
    return Targets(logits, nodes, tuple(logits.shape[-2:]), feature)


def _distilled_on_grid(batch: TrainBatch, grid: tuple[int, int], ignore_index: int, labels: bool) -> Tensor:
    """Where a per-pixel distillation term counts on the teacher grid: (B, gh, gw) bool.

    Inside the image always (padding has no teacher output: a dense cache holds none there); with
    ``labels`` (CIRKD's masked KL), a labelled entry's ignore pixels are left out too, while an
    unlabelled entry is distilled everywhere in its image (distillation needs no label).
    """
    inside = valid_on_grid(torch.isnan(batch.image[:, 0]).to(torch.uint8), grid, 1)
    if not labels:
        return inside
    valid = valid_on_grid(batch.label, grid, ignore_index)
    if batch.labelled is None:
        return valid
    return torch.where(batch.labelled[:, None, None], valid, inside)


def _method_terms(s: Setup, out, batch: TrainBatch, targets: Targets) -> dict[str, Tensor]:
    """The weighted kd/cwd/dist/ifvd terms (each reads what its loss ``needs``)."""
    cfg, m = s.config, s.methods
    terms = {}
    if "kd" in m:
        inside = _distilled_on_grid(batch, targets.grid, s.data.dataset.ignore_index, labels=False)
        terms["kd"] = cfg.lambda_kd * m["kd"](out.logits, targets.logits, inside)
    if "cwd" in m:
        terms["cwd"] = cfg.lambda_cwd * m["cwd"](out.logits, targets.logits)
    if "dist" in m:
        terms["dist"] = cfg.lambda_dist * m["dist"](out.logits, targets.logits)
    if "ifvd" in m:
        terms["ifvd"] = cfg.lambda_ifvd * m["ifvd"](out.feature, targets.feature, batch.label)
    return terms


def _student_terms(s: Setup, batch: TrainBatch, targets: Targets, image: Tensor | None):
    """The student's forward pass and its weighted loss terms (task + the chosen distillation terms)."""
    cfg, w = s.config, s.config.weights_
    ignore = s.data.dataset.ignore_index
    with autocast(s.device, cfg.amp):
        out = s.model(batch.image)
        terms = {"task": _task_loss(out, batch.label, w.aux_weight, ignore)}
        if s.pixel is not None:
            valid = _distilled_on_grid(batch, targets.grid, ignore, labels=True) if cfg.pixel_mode == "kl" else None
            terms["pixel"] = w.lambda_pi * s.pixel(out.logits, targets.logits, valid)
        if s.pair is not None:
            terms["pair"] = w.lambda_pa * s.pair(out.feature, targets.nodes, targets.grid)
        terms.update(_method_terms(s, out, batch, targets))
    if s.holistic is not None:
        with autocast(s.device, False):  # the critic runs in fp32
            terms["adv"] = w.lambda_d * s.holistic.generator_term(out.logits.float(), targets.grid, image)
    return out, terms


def train_step(s: Setup, batch: TrainBatch, step: int) -> dict[str, Tensor | float]:
    """One iteration: student step (task + distillation), then one critic step (1:1, official).

    Returns the metrics as detached device tensors (``lr`` a float): reading them is a device->host
    sync, which the loop does only at log steps. Non-finite values are recorded in ``s.watch``
    instead of being checked here; the loop checks before it logs, evaluates or saves.
    """
    cfg, w = s.config, s.config.weights_
    lr = poly_lr(cfg.lr, step, cfg.iters, cfg.poly_power)
    for g in s.optimizer.param_groups:
        g["lr"] = lr
    targets = _teacher_targets(s, batch)
    image = batch.image if cfg.critic_image else None

    s.model.train()
    out, terms = _student_terms(s, batch, targets, image)
    loss = sum(terms.values())
    metrics: dict[str, Tensor | float] = {"lr": lr, **{k: v.detach() for k, v in terms.items()}}
    metrics["loss"] = loss.detach()
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
        d_loss.backward()
        all_reduce_grads(s.holistic.critic, s.env)
        s.critic_optimizer.step()
        metrics["critic"] = d_loss.detach()
        metrics.update({f"critic_{k}": v.detach() for k, v in parts.items()})
    watched = {k: metrics[k] for k in WATCHED if isinstance(metrics.get(k), Tensor)}
    s.watch.update(step + 1, {**watched, "targets": _targets_probe(targets)})
    return metrics


def _targets_probe(targets: Targets) -> Tensor | None:
    """0 when every teacher target is finite, NaN otherwise (one value for the watch; no sync)."""
    parts = [t for t in (targets.logits, targets.nodes, targets.feature) if t is not None]
    if not parts:
        return None
    ok = torch.stack([torch.isfinite(t).all() for t in parts]).all()
    return torch.where(ok, 0.0, math.nan)


def _floats(metrics: dict[str, Tensor | float]) -> dict[str, float]:
    """Metrics as Python floats, with one device->host transfer for all tensors."""
    keys = [k for k, v in metrics.items() if isinstance(v, Tensor)]
    values = torch.stack([metrics[k].float() for k in keys]).tolist() if keys else []
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, Tensor)}
    out.update(zip(keys, values, strict=True))
    return {k: out[k] for k in metrics}


# ------------------------------------------------------------------------------------------------
# the non-finite stop: which term, its likely cause, and what was kept


def _blame(s: Setup, term: str | None, bad_tensor: str | None) -> tuple[str, str]:
    """(what went non-finite, its likely cause and fix) for the first bad term or tensor."""
    cfg = s.config
    if term == "targets":
        if cfg.cache:
            return "the teacher targets", (
                f"the cache {cfg.cache} holds NaN/inf targets: check it with `skdcache verify` and rebuild it"
            )
        return "the teacher targets", f"the online teacher {cfg.teacher} outputs NaN/inf: check --weights"
    if term == "task" or (term is None and bad_tensor and not bad_tensor.startswith("critic")):
        what = "the task loss" if term else f"the student's parameters after the update ({bad_tensor})"
        return what, f"the learning rate is too high (--lr {cfg.lr:g}): lower it"
    if term in ("pixel", "pair"):
        flag = "--lambda-pi" if term == "pixel" else "--lambda-pa"
        return f"the {term}-wise term", f"its weight or the learning rate is too high: lower {flag} or --lr {cfg.lr:g}"
    if term in METHOD_NAMES:
        return (
            f"the {term} term",
            f"its weight or the learning rate is too high: lower --lambda-{term} or --lr {cfg.lr:g}",
        )
    what = "the holistic (critic) term" if term else f"the critic's state ({bad_tensor})"
    fixes = ["--adversarial hinge"] if cfg.adversarial == "wgan-gp" else []
    fixes += [f"a lower --critic-lr (now {cfg.critic_lr:g})", "a lower --lambda-d"]
    fixes += ["--critic-optimizer adam"] if cfg.critic_optimizer == "sgd" else []
    return what, f"the {cfg.adversarial} critic blew up: try {', '.join(fixes[:-1])} or {fixes[-1]}"


def _diverged(s: Setup, first: dict[str, int], bad: str | None, done: int, kept: str) -> TrainingDivergedError:
    """The one-line stop; ``first`` from the watch, ``bad`` a non-finite state tensor found at step ``done``."""
    term = min(first, key=lambda k: (first[k], WATCHED.index(k))) if first else None
    what, cause = _blame(s, term, bad)
    at = f" at step {first[term]}" if term else f" by step {done}"
    return TrainingDivergedError(f"training stopped: {what} became non-finite{at}; likely cause: {cause}; {kept}")


def _nonfinite_state(s: Setup) -> str | None:
    """The first student/critic parameter or optimiser state holding NaN/inf, by its checkpoint key."""
    parts = {"model": s.module.state_dict(), "optimizer": s.optimizer.state_dict()}
    if s.holistic is not None:
        parts["critic"] = s.holistic.critic.state_dict()
        parts["critic_optimizer"] = s.critic_optimizer.state_dict()
    return first_nonfinite(parts)


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


def check_eval_split(cfg: TrainConfig) -> str | None:
    """The split to evaluate on (None for ``--eval-split none``), refused up front when unusable.

    The dataset's own split listing decides (folder layouts name their splits freely), so a typo
    fails before training rather than silently skipping every evaluation.

    Raises:
        ConfigError: the split does not exist (the message lists those that do) or has unlabelled images.
    """
    split = cfg.eval_split.strip()
    if split.lower() == "none":
        return None
    try:
        ds = open_dataset(cfg.data, splits=(split,))
    except DatasetError as exc:
        raise ConfigError(f"--eval-split {split}: {exc} (or --eval-split none to skip evaluation)") from None
    unlabelled = sum(r.label_path is None for r in ds.records)
    if unlabelled:
        raise ConfigError(
            f"--eval-split {split}: {unlabelled} of its {len(ds)} images have no label; evaluate on a labelled "
            "split or pass --eval-split none"
        )
    return split


def check_cache_serves(losses: tuple[str, ...] | list[str], cache: str, storage_options: dict | None = None) -> None:
    """Refuse, before training, a loss whose ``needs`` the cache cannot serve, naming the build flag that would.

    Raises:
        ConfigError: one line: the loss, what it needs, what the cache stores, and how to rebuild.
    """
    from cache_tools import open_cache

    wanted = [name for name in losses if NEEDS[name] is not TargetNeed.LOGITS]  # every cache holds logits
    if not wanted:
        return
    features = open_cache(cache, storage_options=storage_options).schema.features
    for name in wanted:
        if NEEDS[name] is TargetNeed.NODES and features is None:
            raise ConfigError(
                f"--losses {name} needs teacher features (feature cells): the cache {cache} was built with --no-features; "
                f"rebuild it with skdcache build without --no-features (or drop {name} from --losses)"
            )
        if NEEDS[name] is TargetNeed.FULL_FEATURE:
            if features is None:
                stored = "no features (it was built with --no-features)"
            elif tuple(features.block) != (1, 1):
                stored = f"{features.block[0]}x{features.block[1]} {features.pool} cells"
            else:
                continue
            raise ConfigError(
                f"--losses {name} needs the teacher's full feature map; the cache {cache} stores {stored}: "
                "rebuild with skdcache build --features-block 1x1"
            )


def _check_labels(cfg: TrainConfig, data: SegTrainData) -> None:
    """A task-only run needs labelled images; distillation alone can use unlabelled ones."""
    if not cfg.losses and not data.labelled.any():
        raise ConfigError(
            f"--losses none trains on the task loss alone, but the images of --split {','.join(cfg.splits)} have "
            "no labels: add distillation losses (with --cache or --teacher) or train on a labelled split"
        )
    # a --labelled-share that the splits cannot serve fails here, before anything is written
    DrawSampler(len(data), labelled=data.labelled, share=cfg.labelled_share, batch_size=cfg.batch_size)


@contextlib.contextmanager
def _determinism(enabled: bool):
    """torch's deterministic algorithms and cuDNN settings for the run; the previous ones restored after."""
    if not enabled:
        yield
        return
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    # cuBLAS reads this when its handle is created; without it deterministic matmuls raise
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    except RuntimeError as exc:
        if "deterministic" not in str(exc):
            raise
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(
            f"deterministic training is not possible here ({first}); drop --deterministic for torch's "
            "fastest (nondeterministic) kernels"
        ) from None
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def _models(cfg: TrainConfig, env: DistEnv, device: torch.device, num_classes: int):
    """(model, module, optimizer, scaler): the student (DDP-wrapped when distributed) and its SGD."""
    module = create_student(cfg.student, num_classes=num_classes, pretrained=cfg.pretrained).to(device)
    if cfg.sync_bn and env.world > 1:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    model = module
    if env.world > 1:
        model = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if (device.type == "cuda" and cfg.amp) else None
    return model, module, optimizer, scaler


def _critic(cfg: TrainConfig, env: DistEnv, device: torch.device, num_classes: int, grid: tuple[int, int]):
    """(holistic loss, critic optimizer); every rank starts from rank 0's critic."""
    critic = Critic(num_classes, input_size=grid, image_channels=3 if cfg.critic_image else 0).to(device)
    holistic = HolisticLoss(critic, cfg.adversarial, cfg.lambda_gp).to(device)
    if cfg.critic_optimizer == "sgd":
        opt = torch.optim.SGD(
            critic.parameters(), lr=cfg.critic_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr, betas=(0.9, 0.99))
    if env.world > 1:
        for p in critic.state_dict().values():
            torch.distributed.broadcast(p, 0)
    return holistic, opt


def _refuse_nonfinite(model: nn.Module, source: str) -> None:
    """Weights that hold NaN/inf before training would only be blamed on the training later."""
    bad = first_nonfinite(model.state_dict())
    if bad is not None:
        raise WeightsError(f"{source}: tensor {bad} holds NaN/inf values; use a checkpoint of finite weights")


def _setup(cfg: TrainConfig, env: DistEnv) -> Setup:
    device = env.device if env.world > 1 else pick_device(cfg.device)
    if cfg.teacher:  # refused before any work, not at the first step
        check_precision(device, cfg.teacher_precision, "--teacher-precision")
    eval_split = check_eval_split(cfg)
    out = _prepare_out(cfg, env)
    torch.manual_seed(cfg.seed)

    want = set(cfg.losses)
    if cfg.cache and want:
        check_cache_serves(cfg.losses, cfg.cache, cfg.storage_options or None)
    pair = _pair_loss(cfg.pair_preset) if "pair" in want else None
    data = SegTrainData(
        cfg.data,
        cfg.splits,
        cfg.crop,
        cache=cfg.cache if want else None,
        pair=_pair_spec(pair) if (pair is not None and cfg.cache) else None,
        need_logits=any(NEEDS[n] is TargetNeed.LOGITS for n in want),
        need_feature=bool(cfg.cache) and any(NEEDS[n] is TargetNeed.FULL_FEATURE for n in want),
        scales=cfg.scales or OFFICIAL_SCALES,
        flip=cfg.flip,
        photometric=cfg.photometric,
        seed=cfg.seed,
        storage_options=cfg.storage_options or None,
        cache_dir=cfg.cache_dir,
        student=cfg.student,  # targets on the student's own grid, whatever the teacher's family
    )
    _check_labels(cfg, data)
    num_classes = data.dataset.num_classes
    model, module, optimizer, scaler = _models(cfg, env, device, num_classes)
    _refuse_nonfinite(module, f"--pretrained {cfg.pretrained}")
    teacher = None
    if cfg.teacher and want:
        teacher = create_teacher(
            cfg.teacher,
            num_classes=num_classes,
            weights=cfg.weights,
            random_weights=cfg.teacher_random_weights,
            device=str(device),
        ).model
        _refuse_nonfinite(teacher, f"--weights {cfg.weights}")
    holistic = critic_optimizer = None
    if "holistic" in want:
        holistic, critic_optimizer = _critic(cfg, env, device, num_classes, data.teacher_grid)
    return Setup(
        config=cfg,
        env=env,
        device=device,
        model=model,
        module=module,
        optimizer=optimizer,
        scaler=scaler,
        data=data,
        pixel=PixelWiseLoss(cfg.pixel_mode, cfg.temperature) if "pixel" in want else None,
        pair=pair,
        holistic=holistic,
        methods=_methods(cfg, num_classes),
        critic_optimizer=critic_optimizer,
        teacher=teacher,
        out=out,
        eval_split=eval_split,
        watch=FiniteWatch(device),
    )


def _methods(cfg: TrainConfig, num_classes: int) -> dict[str, nn.Module]:
    """The chosen kd/cwd/dist/ifvd losses (unweighted modules; the trainer applies --lambda-*)."""
    make = {
        "kd": lambda: KDLoss(cfg.kd_temperature),
        "cwd": lambda: ChannelWiseLoss(cfg.cwd_temperature),
        "dist": lambda: DISTLoss(cfg.dist_beta, cfg.dist_gamma, cfg.dist_temperature),
        "ifvd": lambda: IFVDLoss(num_classes),
    }
    return {name: make[name]() for name in METHOD_NAMES if name in cfg.losses}


def _loader(s: Setup, start_step: int) -> DataLoader:
    cfg = s.config
    sampler = DrawSampler(
        len(s.data),
        seed=cfg.seed,
        rank=s.env.rank,
        world=s.env.world,
        start=start_step * cfg.batch_size,
        labelled=s.data.labelled,
        share=cfg.labelled_share,
        batch_size=cfg.batch_size,
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


def _state(s: Setup, step: int, metrics: dict[str, float], best: float) -> dict:
    return {
        "step": step,
        "model_name": s.config.student,
        "num_classes": s.data.dataset.num_classes,
        "family": family_of(s.module).to_dict(),  # normalisation, grid and ignore conventions
        "model": s.module.state_dict(),
        "optimizer": s.optimizer.state_dict(),
        "critic": s.holistic.critic.state_dict() if s.holistic is not None else None,
        "critic_optimizer": s.critic_optimizer.state_dict() if s.critic_optimizer is not None else None,
        "scaler": s.scaler.state_dict() if s.scaler is not None else None,
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "config": json.dumps(s.config.to_dict()),
        "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        # the best evaluation so far: a resumed run keeps best.pt unless it really does better
        "best_miou": float(best),
    }


def _restore(s: Setup) -> tuple[int, float]:
    """Load last.pt into the setup; returns (step, best mIoU so far, -1 when none)."""
    path = _checkpoint_path(s.out)
    state = load_checkpoint(path)
    old = json.loads(state["config"])
    for key in ("student", "cache", "teacher", "losses", "batch_size", "crop", "data", "labelled_share"):
        now = s.config.to_dict()[key]
        before = old.get(key)
        if isinstance(now, tuple):
            now = list(now)
        if before != now:
            raise ConfigError(f"--resume: the run was started with {key}={before!r}, not {now!r}")
    if state["model_name"] != s.config.student or state["num_classes"] != s.data.dataset.num_classes:
        raise WeightsError("--resume: the checkpoint belongs to another model or class count")
    bad = first_nonfinite({k: state.get(k) for k in ("model", "optimizer", "critic", "critic_optimizer")})
    if bad is not None:
        raise WeightsError(
            f"--resume: {path} holds NaN/inf values ({bad}); resuming would diverge again: start a new run "
            "(an skd that checks before saving never writes such a checkpoint)"
        )
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
    return int(state["step"]), float(state.get("best_miou", -1.0))


@contextlib.contextmanager
def _writing(path: Path, out: Path):
    """Turn a failed write of ``path`` (full disk, permissions) into one line; remove its temporary file."""
    try:
        yield
    except OSError as exc:
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        reason, fix = ("the disk is full", "free space") if full else (exc.strerror or str(exc), "fix that")
        last = _checkpoint_path(out)
        then = f"{last} is kept: {fix} and --resume" if last.exists() else f"{fix} and run again"
        raise CacheWriteError(f"cannot write {path}: {reason}; {then}") from None


def _save_weights(s: Setup) -> Path:
    """model.safetensors (written only after last.pt, which holds the same weights)."""
    path = s.out / "model.safetensors"
    meta = {"model_name": s.config.student, "num_classes": s.data.dataset.num_classes, "steps": s.config.iters}
    with _writing(path, s.out):
        return save_weights(s.module, path, meta)


# ------------------------------------------------------------------------------------------------
# logging


class _Log:
    """metrics.jsonl (and TensorBoard when installed and asked for), rank 0 only."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        with _writing(self.path, out):
            self.file = open(self.path, "a") if enabled else None  # noqa: SIM115 - closed in close()
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
        with _writing(self.path, self.path.parent):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file:
            # every record was flushed when written; a failure here repeats one already reported
            with contextlib.suppress(OSError):
                self.file.close()
        if self.tb is not None:
            self.tb.close()


def _evaluate(s: Setup, step: int) -> dict | None:
    if s.eval_split is None:
        return None
    from .evaluate import evaluate_model

    s.module.eval()
    try:
        result = evaluate_model(s.module, s.config.data, split=s.eval_split, mode=s.config.eval_mode, device=s.device)
    finally:
        s.module.train()
    return {"step": step, "miou": result.miou, "pixel_accuracy": result.pixel_accuracy, "per_class": result.per_class}


# ------------------------------------------------------------------------------------------------
# the loop


def _replicated(s: Setup) -> dict[str, nn.Module]:
    out = {"student": s.module}
    if s.holistic is not None:
        out["critic"] = s.holistic.critic
    return out


def _best_so_far(s: Setup, best: float) -> float:
    """The best mIoU of a resumed run: last.pt's, or best.pt's when that was written after last.pt."""
    path = _checkpoint_path(s.out, "best.pt")
    if path.exists():
        best = max(best, float(load_checkpoint(path).get("best_miou", -1.0)))
    return best


class _Run:
    """The loop's bookkeeping: logging, evaluation, the best and last checkpoints, the non-finite stop.

    Every method is called on every rank; the rank guards are inside, once each.
    """

    def __init__(self, s: Setup, progress, start: int, best: float):
        self.s, self.progress = s, progress
        self.rank0 = s.env.rank == 0
        self.log = _Log(s.out, self.rank0, s.config.tensorboard)
        self.best = best
        self.kept_step = start if s.config.resume else None  # the step of the last.pt on disk
        self.metrics: dict[str, float] = {}
        self.eval_result: dict | None = None
        self.t0 = time.perf_counter()
        self.aside = 0.0  # seconds spent evaluating and saving, not training

    def check(self, done: int, full: bool = False) -> None:
        """Stop if anything went NaN/inf (one sync); ``full`` also checks every parameter and optimiser state."""
        first = self.s.watch.first_bad(self.s.env)
        bad = _nonfinite_state(self.s) if full and not first else None
        if first or bad:
            raise _diverged(self.s, first, bad, done, self._kept())

    def _kept(self) -> str:
        if self.kept_step is None:
            return "no checkpoint was saved before it, so there is nothing to resume from"
        path = _checkpoint_path(self.s.out)
        return f"the last good checkpoint {path} (step {self.kept_step}) is kept: fix the cause and --resume"

    def after_step(self, done: int, metrics: dict[str, Tensor | float]) -> None:
        """Log, evaluate and checkpoint when they are due (the final step is :meth:`finish`'s)."""
        cfg = self.s.config
        if done == cfg.iters:
            return  # the final step is logged by finish(), once its checkpoint is safe
        if done % cfg.log_every == 0:
            self.write_log(done, metrics)
        eval_due = bool(cfg.eval_every) and done % cfg.eval_every == 0
        ckpt_every = cfg.ckpt_every or cfg.eval_every
        ckpt_due = bool(ckpt_every) and done % ckpt_every == 0
        if eval_due or ckpt_due:
            self.check(done, full=True)
        if eval_due:
            self.evaluate(done, metrics)
        if ckpt_due:
            self.save_last(done, metrics)

    def write_log(self, done: int, metrics: dict[str, Tensor | float]) -> None:
        self.check(done)  # never log (or report progress on) numbers of a run that already diverged
        self.metrics = _floats(metrics)
        self.log.write({"step": done, **self.metrics, "seconds": round(time.perf_counter() - self.t0, 3)})
        if self.progress is not None and self.rank0:
            self.progress(done, self.s.config.iters, self.metrics)

    def evaluate(self, done: int, metrics: dict[str, Tensor | float]) -> None:
        if not self.rank0:
            return
        t = time.perf_counter()
        self._evaluate(done, metrics)
        self.aside += time.perf_counter() - t

    def _evaluate(self, done: int, metrics: dict[str, Tensor | float]) -> None:
        self.eval_result = _evaluate(self.s, done)
        if self.eval_result is None:
            return
        self.log.write({"step": done, "eval_miou": self.eval_result["miou"]})
        if self.eval_result["miou"] > self.best:
            self.best = self.eval_result["miou"]
            save_checkpoint(_state(self.s, done, _floats(metrics), self.best), _checkpoint_path(self.s.out, "best.pt"))

    def save_last(self, done: int, metrics: dict[str, Tensor | float]) -> Path:
        t = time.perf_counter()
        check_in_sync(_replicated(self.s), self.s.env)
        path = _checkpoint_path(self.s.out)
        if self.rank0:
            save_checkpoint(_state(self.s, done, _floats(metrics), self.best), path)
        self.s.env.barrier()
        self.kept_step = done
        self.aside += time.perf_counter() - t
        return path

    def finish(self, metrics: dict[str, Tensor | float]) -> tuple[str, str]:
        """The final checkpoint, model file and evaluation; returns (checkpoint, weights) paths (rank 0)."""
        iters = self.s.config.iters
        self.check(iters, full=True)
        checkpoint = str(self.save_last(iters, metrics))
        weights = ""
        if self.rank0:
            weights = str(_save_weights(self.s))
        if metrics:
            self.write_log(iters, metrics)
        if self.rank0:
            self.eval_result = _evaluate(self.s, iters)
            if self.eval_result is not None:
                self.log.write({"step": iters, "eval_miou": self.eval_result["miou"], "final": True})
                with _writing(self.s.out / "eval.json", self.s.out):
                    (self.s.out / "eval.json").write_text(json.dumps(self.eval_result, indent=2))
        self.s.env.barrier()
        return (checkpoint if self.rank0 else ""), weights


def train(config: TrainConfig, progress: Callable[[int, int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train a student; returns the final metrics, evaluation and output paths.

    Args:
        progress: called with ``(step, iters, metrics)`` every ``log_every`` steps (rank 0).

    Raises:
        TrainingDivergedError: a loss, the teacher targets or the weights went NaN/inf; nothing
            non-finite was saved, and the message names the term, its likely cause and the checkpoint kept.
    """
    env = dist_env()
    init_distributed(env)
    try:
        with _determinism(config.deterministic):
            return _train(config, env, progress)
    finally:
        shutdown_distributed(env)


def _train(cfg: TrainConfig, env: DistEnv, progress) -> TrainResult:
    s = _setup(cfg, env)
    start, best = _restore(s) if cfg.resume else (0, -1.0)
    if env.rank == 0:  # after the checks, so a refused --resume leaves the run as it was
        with _writing(s.out / "config.json", s.out):
            (s.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    loader = _loader(s, start)
    batches = start_workers(loader)
    run = _Run(s, progress, start, _best_so_far(s, best) if cfg.resume else best)
    metrics: dict[str, Tensor | float] = {}
    try:
        for step in range(start, cfg.iters):
            batch = raise_worker_error(next(batches)).to(s.device)
            metrics = train_step(s, batch, step)
            run.after_step(step + 1, metrics)
        run.check(cfg.iters)  # syncs: the device has finished every queued step
        seconds = time.perf_counter() - run.t0
        checkpoint, weights = run.finish(metrics)
    finally:
        run.log.close()
        del batches, loader
    return TrainResult(
        out=str(s.out),
        steps=cfg.iters,
        seconds=seconds,
        # steps run without a per-step sync, so a step is timed as its share of the loop's wall time
        step_seconds=(seconds - run.aside) / max(1, cfg.iters - start),
        last=run.metrics,
        eval=run.eval_result,
        checkpoint=checkpoint,
        weights=weights,
    )
