"""Training checkpoints and model files, read safely (no unpickling of arbitrary objects).

A run directory holds ``checkpoints/last.pt`` (and ``best.pt``): a torch file of tensors and plain
containers, loaded with ``weights_only=True``; and ``model.safetensors``, the final weights with
``model_name`` / ``num_classes`` metadata, which ``skdcache build --teacher NAME --weights`` and
``skdstudent eval --checkpoint`` both accept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from cache_tools.errors import WeightsError
from pipeline.teachers import create_model, load_weights, read_state_dict

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "load_checkpoint", "save_checkpoint", "load_model"]

CHECKPOINT_FORMAT = "skd-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write atomically (temporary file + rename): a crash never leaves a half-written checkpoint."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, tmp)
    os.replace(tmp, p)
    return p


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint (``weights_only=True``: tensors and plain containers only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - unpickling refusals and corrupt files alike
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"cannot read checkpoint {path}: {first}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{path} is not an skd training checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise WeightsError(f"{path} is checkpoint version {state.get('version')}; this skd reads {CHECKPOINT_VERSION}")
    return state


def load_model(path: str | os.PathLike, *, model_name: str | None = None, num_classes: int | None = None) -> nn.Module:
    """A model from a training checkpoint (``.pt``) or a ``model.safetensors`` file, in eval mode.

    The architecture and class count come from the file's metadata unless given.

    Raises:
        WeightsError: unreadable file, no way to tell the architecture, or weights that do not fit.
    """
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"checkpoint {p} does not exist")
    if p.suffix == ".safetensors":
        _, meta, _ = read_state_dict(p)
        name = model_name or meta.get("model_name")
        k = num_classes or (int(json.loads(meta["num_classes"])) if "num_classes" in meta else None)
    else:
        state = load_checkpoint(p)
        name = model_name or state.get("model_name")
        k = num_classes or state.get("num_classes")
    if not name or not k:
        raise WeightsError(f"{p} does not say which model it holds; pass --model NAME and --num-classes K")
    model = create_model(str(name), num_classes=int(k))
    load_weights(model, p, weights_format="skd", strict=True)
    return model.eval()
