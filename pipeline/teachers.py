"""Teachers: a registered (or custom) model, frozen, with its weights loaded and its provenance stamped.

The door to the model code for stage one::

    teacher = create_teacher("psp101", weights="CS_scenes_38413_0.7832174615268139.pth")
    teacher.model     # eval mode, no grads
    teacher.info      # a cache_tools.schema.TeacherStamp: what the cache records about it

The registry lives in :mod:`pipeline.registry`, the architectures (each registering its own names)
in :mod:`pipeline.models`, and reading, converting and loading weights files in :mod:`pipeline.weights`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from cache_tools.errors import ModelError
from cache_tools.schema import TeacherStamp
from pipeline.families import family_of
from pipeline.registry import create_model
from pipeline.weights import LoadReport, WeightsFile, load_weights, weights_sha256

__all__ = ["Teacher", "create_teacher"]


class Teacher(NamedTuple):
    """A frozen teacher: ``model`` is in eval mode with ``requires_grad`` off."""

    model: nn.Module
    info: TeacherStamp
    report: LoadReport | None = None  # how the weights were loaded (None for random weights)


def create_teacher(
    name: str,
    *,
    num_classes: int = 19,
    weights: str | os.PathLike | None = None,
    state_dict: WeightsFile | None = None,
    random_weights: bool = False,
    seed: int = 0,
    weights_format: str = "auto",
    device: str | torch.device = "cpu",
    **model_kwargs: Any,
) -> Teacher:
    """Build a frozen teacher (eval mode, no grads) and describe it.

    Args:
        name: a registered name or ``package.module:factory``.
        weights: checkpoint to load strictly (see :func:`pipeline.weights.load_weights`).
        state_dict: ``weights`` as :func:`pipeline.weights.read_state_dict` already read it (e.g.
            to recognise it); the file is then only hashed, not read again.
        random_weights: build with random weights instead (smoke tests only). The init is drawn
            from ``torch.manual_seed(seed)`` inside a forked RNG, so two builds are identical and
            the caller's RNG state is untouched. The BatchNorm statistics are then set from one
            seeded noise batch, so every BN output has unit scale and the logits stay finite (a
            random net in eval mode with running stats 0/1 gives logits of 1e5..1e7, which overflow
            fp16 caches). The logits are not unit-scale: a random psp101's have std ~144, far past a
            gap codec's clip, so random teachers test plumbing, never agreement or quality.
        weights_format: "auto", "official" or "skd".
        model_kwargs: extra options for the factory.

    Raises:
        ModelError: no weights and no ``random_weights``, or both; a ``state_dict`` without ``weights``.
        WeightsError: the checkpoint cannot be read or does not fit.
    """
    if weights is not None and random_weights:
        raise ModelError(f"teacher {name!r}: give either --weights PATH or --random-weights, not both")
    if weights is None and not random_weights:
        raise ModelError(
            f"teacher {name!r} needs --weights PATH; random targets are useless — "
            "pass --random-weights only for smoke tests"
        )
    if state_dict is not None and weights is None:
        raise ModelError(f"teacher {name!r}: a state_dict needs the weights path it was read from (provenance)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(name, num_classes=num_classes, **model_kwargs)
        if random_weights:
            calibrate_batchnorm(model)
    report = None
    if weights is not None:
        report = load_weights(model, weights, weights_format=weights_format, strict=True, state_dict=state_dict)
    model.eval()
    model.requires_grad_(False)
    model.to(device)
    return Teacher(model, _stamp(model, name, num_classes, weights, random_weights, seed), report)


def _stamp(
    model: nn.Module, name: str, num_classes: int, weights: str | os.PathLike | None, random_weights: bool, seed: int
) -> TeacherStamp:
    """The teacher's provenance as the store records it, with its family's conventions."""
    feature_channels = getattr(model, "feature_channels", None)
    if feature_channels is None:
        feature_channels = _probe_outputs(model, name, num_classes)
    family = family_of(model)
    return TeacherStamp(
        name=name,
        architecture=str(getattr(model, "architecture", type(model).__name__)),
        num_classes=num_classes,
        feature_channels=int(feature_channels),
        weights_sha256=weights_sha256(weights) if weights is not None else None,
        random_weights=bool(random_weights),
        normalization=model.input_norm.spec.to_dict(),
        parameters=sum(p.numel() for p in model.parameters()),
        seed=int(seed) if random_weights else None,
        weights_path=str(Path(weights).resolve()) if weights is not None else None,
        family=family.family,
        grid=family.grid,
        align_corners=family.align_corners,
        ignore_index=family.ignore_index,
    )


def _probe_outputs(model: nn.Module, name: str, num_classes: int) -> int:
    """Run a tiny eval forward to check the output contract; returns the feature channels."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.full((1, 3, 65, 65), 128.0, device=device))
    finally:
        model.train(was_training)
    logits, feature = getattr(out, "logits", None), getattr(out, "feature", None)
    if not isinstance(logits, Tensor) or not isinstance(feature, Tensor) or logits.ndim != 4 or feature.ndim != 4:
        raise ModelError(f"model {name!r} does not return a SegOutput(logits, aux, feature) of 4-d tensors")
    if logits.shape[1] != num_classes:
        raise ModelError(f"model {name!r} returns {logits.shape[1]} classes, not num_classes={num_classes}")
    return int(feature.shape[1])


def calibrate_batchnorm(model: nn.Module, x: Tensor | None = None, side: int = 97) -> None:
    """Set every BN's running stats to those of one batch: ``x`` (pixels 0–255), or noise
    (2 x 3 x side x side) when None. A random-weights model's activations then have a trained scale."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the stats exactly
    param = next(model.parameters())
    if x is None:
        x = torch.rand(2, 3, side, side, device=param.device) * 255.0
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
