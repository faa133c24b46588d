"""Weights files: read a state dict safely, convert the official SKD layout, load with a report, save.

Checkpoints are untrusted: they are read with ``safetensors`` or ``torch.load(weights_only=True)``,
and files whose pickle names other classes (mmsegmentation's ``meta``) with the restricted reader of
:mod:`pipeline.checkpoint_io`, which rebuilds the tensors without importing or calling anything else
and refuses pickles that name code-running callables. Accepted layouts (:func:`read_state_dict`,
:func:`load_weights`):

* a state dict, or a dict holding one under ``"model"`` (the project's training checkpoints, with
  optional ``"model_name"`` / ``"num_classes"``) or ``"state_dict"``; a ``module.`` prefix is removed;
* ``.safetensors`` files (the project's :func:`save_weights`), recognised by content too;
* the **official SKD layout** (skd_spec §1.3): toolbox names ``head.0.`` -> ``pspmodule.`` and
  ``head.1.`` -> ``head.``, ``fc.*`` dropped, and InPlace-ABN weights converted for BatchNorm
  (``weight := |weight| + 1e-5``, ``num_batches_tracked`` added). With ``weights_format="auto"`` a
  checkpoint is taken as official **iff it has BatchNorm-like entries (``*.running_var``) and no
  ``*.num_batches_tracked`` entry** (InPlace-ABN never had that buffer; ``nn.BatchNorm2d`` has saved
  it since PyTorch 0.4.1). ``"official"`` / ``"skd"`` force the choice.

Other projects' layouts (mmseg, CIRKD, ImageNet backbone files) are recognised, and student
backbones initialised from them, by :mod:`pipeline.recognize`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from cache_tools.errors import ModelError, WeightsError
from pipeline.checkpoint_io import Skipped, existing_file, load_torch_file, sniff
from pipeline.families import family_of
from pipeline.registry import one_line

__all__ = [
    "ABN_EPS",
    "WEIGHTS_FORMATS",
    "LoadReport",
    "WeightsFile",
    "convert_official_state_dict",
    "detect_format",
    "load_weights",
    "official_key",
    "read_state_dict",
    "save_weights",
    "weights_sha256",
]

WEIGHTS_FORMATS = ("auto", "official", "skd")
#: InPlace-ABN uses |weight| + eps as the BN scale; eps of the official layers.
ABN_EPS = 1e-5


class WeightsFile(NamedTuple):
    """What :func:`read_state_dict` read from a file."""

    state_dict: dict[str, Tensor]
    metadata: dict[str, str]  # model_name, num_classes, ... and "skipped" (what the pickle reader left out)
    source: str  # "safetensors" | "torch"


@dataclass
class LoadReport:
    """What :func:`load_weights` did."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple, tuple]]  # (key, checkpoint shape, model shape)
    converted_from: str  # "skd" | "official" | "safetensors"
    path: str = ""
    loaded: int = 0  # tensors copied into the model
    ignored: list[str] = field(default_factory=list)  # dropped on purpose (an official checkpoint's classifier)
    metadata: dict[str, str] = field(default_factory=dict)  # checkpoint metadata (model_name, ...)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """One line, e.g. ``loaded 372 tensors from x.pth (official layout, InPlace-ABN converted); ...``."""
        layout = {
            "official": "official layout, InPlace-ABN weights converted",
            "skd": "skd layout",
            "safetensors": "safetensors",
        }.get(self.converted_from, self.converted_from)
        s = (
            f"loaded {self.loaded} tensors from {self.path or '?'} ({layout}); {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} mis-shaped"
        )
        s += f", {len(self.ignored)} ignored" if self.ignored else ""
        return s + (f"; {self.metadata['skipped']}" if self.metadata.get("skipped") else "")


def weights_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# reading


def read_state_dict(path: str | os.PathLike) -> WeightsFile:
    """Read a checkpoint safely: ``(state dict, metadata, "safetensors" | "torch")``.

    Nothing is unpickled: torch files go through ``torch.load(weights_only=True)``, or, when their
    pickle names other classes (mmsegmentation's ``meta``), through the restricted reader of
    :mod:`pipeline.checkpoint_io`, which extracts the tensors without importing or calling anything;
    what it skipped is in ``metadata["skipped"]``.

    Raises:
        WeightsError: missing, empty, unreadable, truncated or corrupt file, one that is not a
            checkpoint, one whose pickle names something hostile, or one holding no state dict.
    """
    p = existing_file(path)
    try:
        is_st = _is_safetensors(p)
    except OSError as e:
        raise WeightsError(f"cannot read checkpoint {p}: {one_line(e)}") from None
    if is_st:
        return WeightsFile(*_read_safetensors(p), "safetensors")
    try:
        loaded = load_torch_file(p)
    except OSError as e:
        raise WeightsError(f"cannot read checkpoint {p}: {one_line(e)}") from None
    sd, meta = _extract_state_dict(loaded.obj, p)
    if loaded.skipped:
        meta["skipped"] = loaded.note()
    return WeightsFile(sd, meta, "torch")


def _is_safetensors(p: Path) -> bool:
    # by content; the suffix decides only for bytes that are nothing else (a cut-off header)
    kind = sniff(p)
    return kind == "safetensors" or (p.suffix == ".safetensors" and kind == "binary")


def _extract_state_dict(obj: Any, p: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    meta: dict[str, str] = {}
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                meta = {k: str(obj[k]) for k in ("model_name", "num_classes") if isinstance(obj.get(k), (str, int))}
                obj = obj[key]
                break
    if isinstance(obj, Skipped):
        raise WeightsError(
            f"checkpoint {p} holds no state dict: it holds a pickled {obj.skd_name} object, which is never "
            "unpickled — save model.state_dict() with torch.save, or as .safetensors"
        )
    if not isinstance(obj, Mapping) or not obj:
        kind = f"a {type(obj).__name__}" if not isinstance(obj, Mapping) else "an empty dict"
        raise WeightsError(f"checkpoint {p} holds no state dict (it holds {kind})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        keys = ", ".join(map(repr, list(obj)[:5])) + (", ..." if len(obj) > 5 else "")
        raise WeightsError(
            f"checkpoint {p} holds no state dict: {len(bad)} entries are not named tensors (keys: {keys}); "
            "expected a state dict, or a dict with one under 'model' or 'state_dict'"
        )
    sd = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}
    return sd, meta


def _read_safetensors(p: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    size = p.stat().st_size
    if size == 0:
        raise WeightsError(f"cannot read checkpoint {p}: empty file (0 bytes)")
    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    if size < 8 or 8 + n > size:
        raise WeightsError(
            f"cannot read checkpoint {p}: truncated safetensors file (its header needs {8 + n} bytes, the file has "
            f"{size}) or not a safetensors file"
        )
    try:
        sd = load_file(str(p), device="cpu")
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - the safetensors reader raises its own error types
        raise WeightsError(f"cannot read checkpoint {p}: not a valid safetensors file ({one_line(e)})") from None
    return _extract_state_dict(sd, p)[0], meta


# ----------------------------------------------------------------------------------------------------
# the official SKD layout


def detect_format(state_dict: Mapping[str, Tensor]) -> str:
    """ "official" iff there are BN-like entries (``*.running_var``) and no ``*.num_batches_tracked``."""
    has_bn = any(k.endswith(".running_var") for k in state_dict)
    has_nbt = any(k.endswith(".num_batches_tracked") for k in state_dict)
    return "official" if has_bn and not has_nbt else "skd"


def official_key(key: str) -> str | None:
    """The name of an official SKD / toolbox key in this project's PSPNet, or None for ``fc.*`` (dropped)."""
    if key.split(".", 1)[0] == "fc":
        return None
    if key.startswith("head.0."):
        return "pspmodule." + key[len("head.0.") :]
    if key.startswith("head.1."):
        return "head." + key[len("head.1.") :]
    return key


def convert_official_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official SKD / toolbox layout -> this project's (skd_spec §1.3).

    Drops ``fc.*``, renames ``head.0.`` -> ``pspmodule.`` and ``head.1.`` -> ``head.``, and for every
    BN/InPlace-ABN layer (one with a ``running_var``) sets ``weight := |weight| + 1e-5`` and adds a
    zero ``num_batches_tracked``.
    """
    out: dict[str, Tensor] = {}
    for k, v in state_dict.items():
        name = official_key(k)
        if name is not None:
            out[name] = v
    for k in [k for k in out if k.endswith(".running_var")]:
        prefix = k[: -len("running_var")]
        if prefix + "weight" in out:
            out[prefix + "weight"] = out[prefix + "weight"].abs() + ABN_EPS
        out.setdefault(prefix + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return out


# ----------------------------------------------------------------------------------------------------
# loading


def load_weights(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    weights_format: str = "auto",
    strict: bool = True,
    state_dict: WeightsFile | None = None,
) -> LoadReport:
    """Load a whole-model checkpoint into ``model`` (see the module docstring for layouts).

    A backbone alone (ImageNet weights, another project's checkpoint) initialises a student through
    :func:`pipeline.recognize.load_backbone`, which maps other key layouts first.

    Args:
        weights_format: "auto", "official" or "skd".
        strict: raise on any missing, unexpected or mis-shaped key (after conversion); with False
            the fitting tensors are loaded and the rest is reported.
        state_dict: ``path`` as :func:`read_state_dict` already read it; the file is not read again.

    Raises:
        ModelError: an unknown ``weights_format``.
        WeightsError: one line naming the file and what is wrong.
    """
    if weights_format not in WEIGHTS_FORMATS:
        raise ModelError(f"unknown weights format {weights_format!r}; give one of {', '.join(WEIGHTS_FORMATS)}")
    sd, meta, source = state_dict if state_dict is not None else read_state_dict(path)
    fmt = detect_format(sd) if weights_format == "auto" else weights_format
    # what is dropped on purpose: the classifier of an official checkpoint
    ignored = [k for k in sd if (fmt == "official" and official_key(k) is None)]
    if fmt == "official":
        sd = convert_official_state_dict(sd)
    model_sd = model.state_dict()
    _fill_num_batches_tracked(sd, model_sd)
    missing, unexpected, mismatched = _compare(model_sd, sd, model_sd)
    if strict and (missing or mismatched or unexpected):
        raise _misfit_error(model, path, meta, missing, unexpected, mismatched)
    loaded = _copy_fitting(model, sd, model_sd)
    converted_from = "official" if fmt == "official" else ("safetensors" if source == "safetensors" else "skd")
    return LoadReport(missing, unexpected, mismatched, converted_from, str(path), loaded, ignored, meta)


def _model_name(model: nn.Module) -> str:
    return getattr(model, "model_name", None) or type(model).__name__


def _fill_num_batches_tracked(sd: dict[str, Tensor], model_keys: Iterable[str]) -> None:
    # checkpoints from before PyTorch 0.4.1 (e.g. the CSAIL ImageNet ResNets) lack the counter
    for k in model_keys:
        stem = k[: -len("num_batches_tracked")]
        if k.endswith(".num_batches_tracked") and k not in sd and stem + "running_var" in sd:
            sd[k] = torch.tensor(0, dtype=torch.long)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _compare(model_sd: Mapping[str, Tensor], sd: Mapping[str, Tensor], keys: Iterable[str]):
    keys = list(keys)
    missing = [k for k in keys if k not in sd]
    unexpected = [k for k in sd if k not in model_sd]
    mismatched = [(k, _shape(sd[k]), _shape(model_sd[k])) for k in keys if k in sd and sd[k].shape != model_sd[k].shape]
    return missing, unexpected, mismatched


def _misfit_error(model, path, meta, missing, unexpected, mismatched) -> WeightsError:
    """One line naming the file, the model and the first keys that do not fit."""
    name, misfit = _model_name(model), _misfit(missing, unexpected, mismatched)
    said = ", ".join(f"{k}={meta[k]}" for k in ("model_name", "num_classes") if k in meta)
    return WeightsError(
        f"checkpoint {path} does not fit {name}: {misfit} — is it a checkpoint of another architecture or "
        "class count?" + (f" (its metadata says {said})" if said else "")
    )


def _few(items: list[str], n: int = 3) -> str:
    # the bookkeeping counters say nothing about the mismatch: name real weights first
    items = sorted(items, key=lambda k: k.split(":")[0].endswith("num_batches_tracked"))
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _misfit(missing, unexpected, mismatched) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
    if mismatched:
        shapes = [f"{k}: checkpoint {a} vs model {b}" for k, a, b in mismatched]
        parts.append(f"{len(mismatched)} mis-shaped ({_few(shapes)})")
    return ", ".join(parts)


def _copy_fitting(model: nn.Module, sd: Mapping[str, Tensor], model_sd: Mapping[str, Tensor]) -> int:
    fitting = {k: v for k, v in sd.items() if k in model_sd and v.shape == model_sd[k].shape}
    model.load_state_dict(fitting, strict=False)
    return len(fitting)


# ----------------------------------------------------------------------------------------------------
# saving


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s state dict as safetensors with string metadata.

    ``model_name``, ``num_classes`` and ``architecture`` are filled from the model when it has them,
    and ``family`` (its normalisation, grid, align_corners, ignore index) for project models;
    non-string metadata values are JSON-encoded. The file is written to a temporary name and renamed.
    """
    from safetensors.torch import save_file

    p = Path(path)
    meta: dict[str, str] = {"format": "skd-weights"}
    for key in ("model_name", "num_classes", "architecture"):
        value = getattr(model, key, None)
        if value is not None:
            meta[key] = str(value)
    if hasattr(model, "input_norm"):
        meta["family"] = json.dumps(family_of(model).to_dict())
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a half-written file beside the real one
        raise
    return p
