"""Training checkpoints and model files, read safely (no unpickling of arbitrary objects).

A run directory holds ``checkpoints/last.pt`` (and ``best.pt``): a torch file of tensors and plain
containers, read with ``weights_only=True`` (see :mod:`pipeline.checkpoint_io`); and
``model.safetensors``, the final weights with ``model_name`` / ``num_classes`` metadata, which
``skdcache build --teacher NAME --weights`` and ``skdstudent eval --checkpoint`` both accept.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import torch
from torch import nn

from cache_tools.errors import CacheWriteError, WeightsError
from pipeline.checkpoint_io import existing_file, load_torch_file, sniff
from pipeline.registry import create_model
from pipeline.weights import load_weights, read_state_dict

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "first_nonfinite",
    "load_checkpoint",
    "save_checkpoint",
    "load_model",
]

CHECKPOINT_FORMAT = "skd-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write atomically (temporary file, fsync, rename): a crash never leaves a half-written checkpoint.

    Raises:
        WeightsError: a tensor of ``state`` is NaN/inf (a checkpoint only ever holds finite numbers).
        CacheWriteError: the file cannot be written (full disk, permissions); the temporary file is
            removed and an earlier checkpoint at ``path`` is left as it was.
    """
    p = Path(path)
    bad = first_nonfinite(state)
    if bad is not None:
        raise WeightsError(f"refusing to save checkpoint {p}: {bad} holds NaN/inf values")
    tmp = p.with_name(p.name + ".tmp")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        # a Python file object, not a path: torch's own writer turns a full disk into an opaque
        # RuntimeError, while file.write raises OSError(ENOSPC)
        with open(tmp, "wb") as f:
            torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        reason, fix = ("the disk is full", "free space") if full else (exc.strerror or str(exc), "fix that")
        if p.exists():
            kept = f"the previous {p.name} is kept unchanged: {fix} and --resume"
        else:
            kept = f"no {p.name} was written: {fix} and run again"
        raise CacheWriteError(f"cannot save checkpoint {p}: {reason}; {kept}") from None
    return p


def first_nonfinite(state: object, where: str = "") -> str | None:
    """The key path of the first floating-point tensor in ``state`` holding NaN/inf, or None.

    Walks dicts, lists and tuples; the tensors of one device are checked with a single sync.
    """
    found: list[tuple[str, torch.Tensor]] = []
    _collect_float_tensors(state, where, found)
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, t in found:
        by_device.setdefault(t.device, []).append((name, t))
    for items in by_device.values():
        ok = torch.stack([torch.isfinite(t).all() for _, t in items]).tolist()
        for (name, _), good in zip(items, ok, strict=True):
            if not good:
                return name
    return None


def _collect_float_tensors(obj: object, where: str, out: list[tuple[str, torch.Tensor]]) -> None:
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            out.append((where or "tensor", obj.detach()))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _collect_float_tensors(v, f"{where}.{k}" if where else str(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _collect_float_tensors(v, f"{where}.{i}" if where else str(i), out)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint: tensors and plain containers only, nothing unpickled.

    Raises:
        WeightsError: a missing, empty, truncated or damaged file, one that is not an skd training
            checkpoint (another project's file, objects of other classes), or a hostile pickle.
    """
    p = existing_file(path)
    try:
        loaded = load_torch_file(p)
    except OSError as exc:
        raise WeightsError(f"cannot read checkpoint {p}: {exc.strerror or exc}") from None
    state = loaded.obj
    if loaded.skipped:  # skd's own checkpoints never hold other objects: this is another program's file
        raise WeightsError(f"{p} is not an skd training checkpoint: it holds other objects ({loaded.note()})")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(
            f"{p} is not an skd training checkpoint (no format={CHECKPOINT_FORMAT!r} entry); give a run's "
            "checkpoints/last.pt or model.safetensors"
        )
    if state.get("version") != CHECKPOINT_VERSION:
        raise WeightsError(f"{p} is checkpoint version {state.get('version')}; this skd reads {CHECKPOINT_VERSION}")
    return state


def load_model(path: str | os.PathLike, *, model_name: str | None = None, num_classes: int | None = None) -> nn.Module:
    """A model from a training checkpoint (``.pt``) or a ``model.safetensors`` file, in eval mode.

    The architecture and class count come from the file's metadata unless given.

    Raises:
        WeightsError: unreadable file, no way to tell the architecture, or weights that do not fit.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"checkpoint {p} does not exist" if not p.exists() else f"checkpoint {p} is not a file")
    file = None  # a safetensors file is read once: for its metadata here, for its tensors below
    if p.suffix == ".safetensors" or sniff(p) == "safetensors":
        file = read_state_dict(p)
        meta = file.metadata
        name = model_name or meta.get("model_name")
        k = num_classes or (int(json.loads(meta["num_classes"])) if "num_classes" in meta else None)
    else:
        state = load_checkpoint(p)
        name = model_name or state.get("model_name")
        k = num_classes or state.get("num_classes")
    if not name or not k:
        raise WeightsError(f"{p} does not say which model it holds; pass --model NAME and --num-classes K")
    model = create_model(str(name), num_classes=int(k))
    load_weights(model, p, weights_format="skd", strict=True, state_dict=file)
    bad = first_nonfinite(model.state_dict())
    if bad is not None:
        raise WeightsError(f"{p} holds non-finite values (NaN/inf) in {bad}: it is not a usable model")
    return model.eval()
