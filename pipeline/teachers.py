"""The project's one model registry, teacher creation, and safe checkpoint loading.

Every architecture (teacher or student) is registered here by name, timm-style::

    @register_model("psp18", description="...")
    def psp18(num_classes: int = 19, **kwargs) -> nn.Module: ...

    model = create_model("psp18", num_classes=19)
    model = create_model("my_pkg.my_models:make", num_classes=19)   # a custom import path
    teacher = create_teacher("psp101", weights="CS_scenes_38413_0.7832174615268139.pth")

A model honours the contract of :mod:`pipeline.models` (raw RGB 0–255 input with NaN padding, an
``input_norm`` first module, a ``SegOutput`` result).

Checkpoints are untrusted: they are read with ``safetensors`` or ``torch.load(weights_only=True)``,
and files whose pickle names other classes (mmsegmentation's ``meta``) with the restricted reader of
:mod:`pipeline.checkpoint_io`, which rebuilds the tensors without importing or calling anything else
and refuses pickles that name code-running callables. Accepted layouts (:func:`load_weights`):

* a state dict, or a dict holding one under ``"model"`` (the project's training checkpoints, with
  optional ``"model_name"`` / ``"num_classes"``) or ``"state_dict"``; a ``module.`` prefix is removed;
* ``.safetensors`` files (the project's :func:`save_weights`), recognised by content too;
* the **official SKD layout** (skd_spec §1.3): toolbox names ``head.0.`` -> ``pspmodule.`` and
  ``head.1.`` -> ``head.``, ``fc.*`` dropped, and InPlace-ABN weights converted for BatchNorm
  (``weight := |weight| + 1e-5``, ``num_batches_tracked`` added). With ``weights_format="auto"`` a
  checkpoint is taken as official **iff it has BatchNorm-like entries (``*.running_var``) and no
  ``*.num_batches_tracked`` entry** (InPlace-ABN never had that buffer; ``nn.BatchNorm2d`` has saved
  it since PyTorch 0.4.1). ``"official"`` / ``"skd"`` force the choice.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from cache_tools.errors import ModelError, SkdError, WeightsError
from pipeline.checkpoint_io import Skipped, load_torch_file, sniff
from pipeline.models.base import InputNorm
from pipeline.models.deeplab import DeepLabV3
from pipeline.models.mobilenet import DeepLabV3MobileNetV2
from pipeline.models.pspnet import PSPNet
from pipeline.models.resnet import BasicBlock, Bottleneck

__all__ = [
    "LoadReport",
    "ModelEntry",
    "Teacher",
    "TeacherInfo",
    "convert_official_state_dict",
    "create_model",
    "create_teacher",
    "detect_format",
    "list_models",
    "list_teachers",
    "load_backbone_weights",
    "load_weights",
    "read_state_dict",
    "register_model",
    "save_weights",
    "weights_sha256",
]

ROLES = ("teacher", "student")
WEIGHTS_FORMATS = ("auto", "official", "skd")
#: InPlace-ABN uses |weight| + eps as the BN scale; eps of the official layers.
ABN_EPS = 1e-5


# ----------------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture: ``factory(num_classes=K, **kwargs)`` builds it."""

    name: str
    description: str
    factory: Callable[..., nn.Module]
    roles: tuple[str, ...]  # subset of ("teacher", "student"): listing hints, not enforced


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, description: str, roles: Iterable[str] = ROLES):
    """Decorator registering a factory under ``name`` (a warning is issued when a name is replaced)."""
    roles = tuple(roles)
    if not roles or any(r not in ROLES for r in roles):
        raise ValueError(f"roles must be a non-empty subset of {ROLES}, got {roles}")
    if not name or ":" in name:
        raise ValueError(f"invalid model name {name!r} (':' marks custom import paths)")

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            warnings.warn(f"model {name!r} is registered again; the new factory replaces the old one", stacklevel=2)
        _REGISTRY[name] = ModelEntry(name=name, description=description, factory=factory, roles=roles)
        return factory

    return decorator


def list_models(role: str | None = None) -> list[ModelEntry]:
    """Registered models sorted by name, optionally only those with ``role`` ("teacher" / "student")."""
    if role is not None and role not in ROLES:
        raise ModelError(f"unknown role {role!r}; give one of {', '.join(ROLES)}")
    return [e for _, e in sorted(_REGISTRY.items()) if role is None or role in e.roles]


def list_teachers() -> list[ModelEntry]:
    return list_models("teacher")


def _import_factory(path: str) -> Callable[..., nn.Module]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr or not all(p.isidentifier() for p in (*module_name.split("."), attr)):
        raise ModelError(f"invalid custom model path {path!r}; expected package.module:factory")
    top = module_name.split(".", 1)[0]
    if top in sys.stdlib_module_names:
        # os:system, subprocess:run, builtins:eval ... are never model factories: refuse before importing
        raise ModelError(
            f"custom model path {path!r} names {module_name!r}, a Python standard-library module, not a model "
            "package; give package.module:factory of a function that returns an nn.Module"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(f"cannot import {module_name!r} for model {path!r}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"{module_name!r} has no callable {attr!r} (model {path!r})")
    return factory


def _resolve_factory(name: str) -> Callable[..., nn.Module]:
    # A name with ':' is always an import path; it never falls back to a same-named registry entry.
    if ":" in name:
        return _import_factory(name)
    entry = _REGISTRY.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" — did you mean {close[0]!r}?" if close else ""
        raise ModelError(
            f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))} (or give package.module:factory){hint}"
        )
    return entry.factory


def create_model(name: str, *, num_classes: int = 19, **kwargs: Any) -> nn.Module:
    """Build a registered model, or one from a ``package.module:factory`` path.

    Options that are ``None`` are dropped, so callers can forward unset CLI options. The model gets
    a ``model_name`` attribute (the name it was created under) unless its factory set one.

    Raises:
        ModelError: unknown name, unimportable path, an option the factory does not take, or a
            factory that does not return an ``nn.Module`` with an ``input_norm``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    factory = _resolve_factory(name)
    try:
        model = factory(num_classes=num_classes, **kwargs)
    except SkdError:
        raise
    except TypeError as e:
        if "unexpected keyword argument" in str(e) and any(f"'{k}'" in str(e) for k in kwargs):
            raise ModelError(f"model {name!r} does not take this option: {e}") from None
        raise _factory_failed(name, factory, e) from e
    except Exception as e:  # a factory is user code: name it in one line (--verbose: traceback)
        raise _factory_failed(name, factory, e) from e
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory of model {name!r} returned a {type(model).__name__}, not an nn.Module")
    if not isinstance(getattr(model, "input_norm", None), InputNorm):
        raise ModelError(
            f"model {name!r} has no `input_norm` (InputNorm) module; every model takes raw RGB pixels "
            "and must start with one (see pipeline.models.base)"
        )
    if getattr(model, "model_name", None) is None or name in _REGISTRY:
        model.model_name = name
    return model


def _factory_failed(name: str, factory: Callable[..., Any], e: Exception) -> ModelError:
    label = name if ":" in name else f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', '?')}"
    return ModelError(
        f"model {name!r}: its factory {label}(num_classes=...) failed with {type(e).__name__}: {_one_line(e, 160)} "
        "— a model factory must take num_classes and return an nn.Module"
    )


def _model_name(model: nn.Module) -> str:
    return getattr(model, "model_name", None) or type(model).__name__


# ----------------------------------------------------------------------------------------------------
# teachers


@dataclass(frozen=True)
class TeacherInfo:
    """Who made a cache's targets; stamped into stores (JSON via :meth:`to_dict`)."""

    name: str
    architecture: str  # e.g. "PSPNet(resnet101, psp_out=512, dsn)"
    num_classes: int
    feature_channels: int
    weights_sha256: str | None
    weights_path: str | None
    random_weights: bool
    seed: int | None  # the init seed, for random weights only
    normalization: dict  # InputNormSpec.to_dict()
    parameters: int

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "architecture": self.architecture,
            "num_classes": self.num_classes,
            "feature_channels": self.feature_channels,
            "weights_sha256": self.weights_sha256,
            "weights_path": self.weights_path,
            "random_weights": self.random_weights,
            "seed": self.seed,
            "normalization": dict(self.normalization),
            "parameters": self.parameters,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TeacherInfo:
        def opt(key: str, conv):
            return None if d.get(key) is None else conv(d[key])

        return cls(
            name=str(d["name"]),
            architecture=str(d["architecture"]),
            num_classes=int(d["num_classes"]),
            feature_channels=int(d["feature_channels"]),
            weights_sha256=opt("weights_sha256", str),
            weights_path=opt("weights_path", str),
            random_weights=bool(d["random_weights"]),
            seed=opt("seed", int),
            normalization=dict(d["normalization"]),
            parameters=int(d["parameters"]),
        )


class Teacher(NamedTuple):
    """A frozen teacher: ``model`` is in eval mode with ``requires_grad`` off."""

    model: nn.Module
    info: TeacherInfo
    report: LoadReport | None = None  # how the weights were loaded (None for random weights)


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


def _calibrate_batchnorm(model: nn.Module, side: int = 97) -> None:
    """Set every BN's running stats to those of one noise batch (2 x 3 x side x side, pixels 0–255)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the stats exactly
    param = next(model.parameters())
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            model(torch.rand(2, 3, side, side, device=param.device) * 255.0)
    finally:
        model.train(was_training)
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum


def create_teacher(
    name: str,
    *,
    num_classes: int = 19,
    weights: str | os.PathLike | None = None,
    random_weights: bool = False,
    seed: int = 0,
    weights_format: str = "auto",
    device: str | torch.device = "cpu",
    **model_kwargs: Any,
) -> Teacher:
    """Build a frozen teacher (eval mode, no grads) and describe it.

    Args:
        name: a registered name or ``package.module:factory``.
        weights: checkpoint to load strictly (see :func:`load_weights`).
        random_weights: build with random weights instead (smoke tests only). The init is drawn
            from ``torch.manual_seed(seed)`` inside a forked RNG, so two builds are identical and
            the caller's RNG state is untouched. The BatchNorm statistics are then set from one
            seeded noise batch, so the outputs have unit scale (a random net in eval mode with
            running stats 0/1 gives logits of 1e5..1e7, which overflow fp16 caches).
        weights_format: "auto", "official" or "skd".
        model_kwargs: extra options for the factory.

    Raises:
        ModelError: no weights and no ``random_weights``, or both.
        WeightsError: the checkpoint cannot be read or does not fit.
    """
    if weights is not None and random_weights:
        raise ModelError(f"teacher {name!r}: give either --weights PATH or --random-weights, not both")
    if weights is None and not random_weights:
        raise ModelError(
            f"teacher {name!r} needs --weights PATH; random targets are useless — "
            "pass --random-weights only for smoke tests"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(name, num_classes=num_classes, **model_kwargs)
        if random_weights:
            _calibrate_batchnorm(model)
    report = None
    if weights is not None:
        report = load_weights(model, weights, weights_format=weights_format, strict=True)
    model.eval()
    model.requires_grad_(False)
    model.to(device)
    feature_channels = getattr(model, "feature_channels", None)
    if feature_channels is None:
        feature_channels = _probe_outputs(model, name, num_classes)
    info = TeacherInfo(
        name=name,
        architecture=str(getattr(model, "architecture", type(model).__name__)),
        num_classes=num_classes,
        feature_channels=int(feature_channels),
        weights_sha256=weights_sha256(weights) if weights is not None else None,
        weights_path=str(Path(weights).resolve()) if weights is not None else None,
        random_weights=bool(random_weights),
        seed=int(seed) if random_weights else None,
        normalization=model.input_norm.spec.to_dict(),
        parameters=sum(p.numel() for p in model.parameters()),
    )
    return Teacher(model, info, report)


# ----------------------------------------------------------------------------------------------------
# weights


@dataclass
class LoadReport:
    """What :func:`load_weights` / :func:`load_backbone_weights` did."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple, tuple]]  # (key, checkpoint shape, model shape)
    converted_from: str  # "skd" | "official" | "safetensors"
    path: str = ""
    loaded: int = 0  # tensors copied into the model
    ignored: list[str] = field(default_factory=list)  # dropped on purpose (fc.*, non-backbone keys)
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


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str], str]:
    """Read a checkpoint safely: ``(state dict, metadata, "safetensors" | "torch")``.

    Nothing is unpickled: torch files go through ``torch.load(weights_only=True)``, or, when their
    pickle names other classes (mmsegmentation's ``meta``), through the restricted reader of
    :mod:`pipeline.checkpoint_io`, which extracts the tensors without importing or calling anything;
    what it skipped is in ``metadata["skipped"]``.

    Raises:
        WeightsError: missing, empty, unreadable, truncated or corrupt file, one that is not a
            checkpoint, one whose pickle names something hostile, or one holding no state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"checkpoint {p} does not exist" if not p.exists() else f"checkpoint {p} is not a file")
    try:
        is_st = _is_safetensors(p)
    except OSError as e:
        raise WeightsError(f"cannot read checkpoint {p}: {_one_line(e)}") from None
    if is_st:
        return (*_read_safetensors(p), "safetensors")
    try:
        loaded = load_torch_file(p)
    except OSError as e:
        raise WeightsError(f"cannot read checkpoint {p}: {_one_line(e)}") from None
    sd, meta = _extract_state_dict(loaded.obj, p)
    if loaded.skipped:
        meta["skipped"] = loaded.note()
    return sd, meta, "torch"


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
        raise WeightsError(f"cannot read checkpoint {p}: not a valid safetensors file ({_one_line(e)})") from None
    return _extract_state_dict(sd, p)[0], meta


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


def load_weights(
    model: nn.Module, path: str | os.PathLike, *, weights_format: str = "auto", strict: bool = True
) -> LoadReport:
    """Load a checkpoint into ``model`` (see the module docstring for the accepted layouts).

    With ``strict=True`` any missing, unexpected or mis-shaped key (after conversion) raises;
    with ``strict=False`` the fitting tensors are loaded and the rest is reported.

    Raises:
        WeightsError: one line naming the file and what is wrong.
    """
    if weights_format not in WEIGHTS_FORMATS:
        raise ModelError(f"unknown weights format {weights_format!r}; give one of {', '.join(WEIGHTS_FORMATS)}")
    sd, meta, source = read_state_dict(path)
    fmt = detect_format(sd) if weights_format == "auto" else weights_format
    ignored: list[str] = []
    if fmt == "official":
        ignored = [k for k in sd if k.split(".", 1)[0] == "fc"]
        sd = convert_official_state_dict(sd)
    model_sd = model.state_dict()
    _fill_num_batches_tracked(sd, model_sd)
    missing, unexpected, mismatched = _compare(model_sd, sd, model_sd)
    if strict and (missing or unexpected or mismatched):
        said = ", ".join(f"{k}={meta[k]}" for k in ("model_name", "num_classes") if k in meta)
        raise WeightsError(
            f"checkpoint {path} does not fit {_model_name(model)}: {_misfit(missing, unexpected, mismatched)} — "
            "is it a checkpoint of another architecture or class count?"
            + (f" (its metadata says {said})" if said else "")
        )
    loaded = _copy_fitting(model, sd, model_sd)
    converted_from = "official" if fmt == "official" else ("safetensors" if source == "safetensors" else "skd")
    return LoadReport(missing, unexpected, mismatched, converted_from, str(path), loaded, ignored, meta)


def load_backbone_weights(
    model: nn.Module, path: str | os.PathLike, *, weights_format: str = "skd", strict: bool = True
) -> LoadReport:
    """Initialise only the backbone of ``model`` (e.g. from CSAIL's ``resnet18-imagenet.pth``).

    Checkpoint keys outside the model's ``backbone_prefixes`` (``fc.*``, another model's head) are
    ignored. Backbone keys that are missing or mis-shaped are reported, and raise with
    ``strict=True``; unexpected backbone keys are only reported. ImageNet checkpoints are plain BN,
    so the default format is "skd" (no InPlace-ABN conversion); project checkpoints load too.

    Raises:
        WeightsError: unreadable file, or (strict) a backbone that does not fit, e.g. a torchvision
            ResNet with its 7x7 stem.
    """
    if weights_format not in WEIGHTS_FORMATS:
        raise ModelError(f"unknown weights format {weights_format!r}; give one of {', '.join(WEIGHTS_FORMATS)}")
    prefixes = tuple(getattr(model, "backbone_prefixes", ()))
    if not prefixes:
        raise ModelError(f"model {_model_name(model)} declares no backbone (backbone_prefixes) to initialise")
    sd, meta, source = read_state_dict(path)
    fmt = detect_format(sd) if weights_format == "auto" else weights_format
    if fmt == "official":
        sd = convert_official_state_dict(sd)
    ignored = [k for k in sd if not k.startswith(prefixes)]
    sd = {k: v for k, v in sd.items() if k.startswith(prefixes)}
    model_sd = model.state_dict()
    backbone_keys = [k for k in model_sd if k.startswith(prefixes)]
    _fill_num_batches_tracked(sd, backbone_keys)
    missing, unexpected, mismatched = _compare(model_sd, sd, backbone_keys)
    if strict and (missing or mismatched):
        name = _model_name(model)
        stem = next((m for m in mismatched if m[0] == "conv1.weight"), None)
        if stem is not None and stem[1][-2:] == (7, 7):
            raise WeightsError(
                f"checkpoint {path} does not fit the backbone of {name}: conv1.weight: checkpoint {stem[1]} vs "
                f"model {stem[2]} — this looks like a torchvision ResNet (7x7 stem); the official student needs "
                f"the CSAIL deep-stem weights (resnet18-imagenet.pth) ({_misfit(missing, [], mismatched)})"
            )
        raise WeightsError(
            f"checkpoint {path} does not fit the backbone of {name}: {_misfit(missing, [], mismatched)} — "
            "is it a checkpoint of another backbone or width?"
        )
    loaded = _copy_fitting(model, sd, model_sd)
    converted_from = "official" if fmt == "official" else ("safetensors" if source == "safetensors" else "skd")
    return LoadReport(missing, unexpected, mismatched, converted_from, str(path), loaded, ignored, meta)


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s state dict as safetensors with string metadata.

    ``model_name``, ``num_classes`` and ``architecture`` are filled from the model when it has them;
    non-string metadata values are JSON-encoded. The file is written to a temporary name and renamed.
    """
    from safetensors.torch import save_file

    p = Path(path)
    meta: dict[str, str] = {"format": "skd-weights"}
    for key in ("model_name", "num_classes", "architecture"):
        value = getattr(model, key, None)
        if value is not None:
            meta[key] = str(value)
    if hasattr(model, "input_norm"):  # the family's conventions: normalisation, grid, align_corners, ignore
        from .families import family_of

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


# ----------------------------------------------------------------------------------------------------
# the registered architectures


def _psp(block, layers, num_classes: int, defaults: dict, kwargs: dict) -> PSPNet:
    return PSPNet(block, layers, num_classes=num_classes, **{**defaults, **kwargs})


@register_model(
    "psp101",
    description="PSPNet-ResNet101, the official SKD teacher (Bottleneck [3,4,23,3], PSP 2048->512, dsn; 70.44 M)",
    roles=("teacher",),
)
def psp101(num_classes: int = 19, **kwargs: Any) -> PSPNet:
    return _psp(Bottleneck, (3, 4, 23, 3), num_classes, {"psp_out": 512}, kwargs)


@register_model("psp50", description="PSPNet-ResNet50 (Bottleneck [3,4,6,3], PSP 2048->512, dsn)")
def psp50(num_classes: int = 19, **kwargs: Any) -> PSPNet:
    return _psp(Bottleneck, (3, 4, 6, 3), num_classes, {"psp_out": 512}, kwargs)


@register_model("psp34", description="PSPNet-ResNet34 (BasicBlock [3,4,6,3], PSP 512->128, dsn)")
def psp34(num_classes: int = 19, **kwargs: Any) -> PSPNet:
    return _psp(BasicBlock, (3, 4, 6, 3), num_classes, {"psp_out": 128}, kwargs)


@register_model(
    "psp18", description="PSPNet-ResNet18, the official SKD student (BasicBlock [2,2,2,2], PSP 512->128, dsn; 13.07 M)"
)
def psp18(num_classes: int = 19, **kwargs: Any) -> PSPNet:
    return _psp(BasicBlock, (2, 2, 2, 2), num_classes, {"psp_out": 128}, kwargs)


@register_model("deeplabv3_r18", description="DeepLabV3-ResNet18 (deep stem, OS8, ASPP 512->512, aux FCN on layer3)")
def deeplabv3_r18(num_classes: int = 19, **kwargs: Any) -> DeepLabV3:
    return DeepLabV3(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, **{"aspp_out": 512, **kwargs})


@register_model(
    "mbv2", description="DeepLabV3-MobileNetV2 (OS8 dilated, ASPP 320->128, aux on the 96-ch stage; grid 64 for 512)"
)
def mbv2(num_classes: int = 19, **kwargs: Any) -> DeepLabV3MobileNetV2:
    return DeepLabV3MobileNetV2(num_classes=num_classes, **{"aspp_out": 128, **kwargs})


@register_model("psp34_mini", description="CPU demo teacher: PSPNet, ResNet-34 layout at width 1/4, PSP out 64")
def psp34_mini(num_classes: int = 19, **kwargs: Any) -> PSPNet:
    return _psp(BasicBlock, (3, 4, 6, 3), num_classes, {"width": 0.25, "psp_out": 64}, kwargs)


@register_model("psp18_mini", description="CPU demo student: PSPNet, ResNet-18 layout at width 1/4, PSP out 32")
def psp18_mini(num_classes: int = 19, **kwargs: Any) -> PSPNet:
    return _psp(BasicBlock, (2, 2, 2, 2), num_classes, {"width": 0.25, "psp_out": 32}, kwargs)


@register_model("deeplabv3_r18_mini", description="CPU student: DeepLabV3, ResNet-18 layout at width 1/4, ASPP out 32")
def deeplabv3_r18_mini(num_classes: int = 19, **kwargs: Any) -> DeepLabV3:
    return DeepLabV3(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, **{"width": 0.25, "aspp_out": 32, **kwargs})


@register_model(
    "mbv2_mini", description="CPU student: DeepLabV3-MobileNetV2 at width 1/2, ASPP out 32 (grid 64 for 512)"
)
def mbv2_mini(num_classes: int = 19, **kwargs: Any) -> DeepLabV3MobileNetV2:
    return DeepLabV3MobileNetV2(num_classes=num_classes, **{"width": 0.5, "aspp_out": 32, **kwargs})


@register_model("psp_tiny", description="test model: PSPNet, BasicBlock [1,1,1,1] at width 1/8, PSP out 16")
def psp_tiny(num_classes: int = 19, **kwargs: Any) -> PSPNet:
    return _psp(BasicBlock, (1, 1, 1, 1), num_classes, {"width": 0.125, "psp_out": 16}, kwargs)


# The mmsegmentation and CIRKD families register with this registry (last: they import register_model).
import pipeline.families  # noqa: E402, F401
