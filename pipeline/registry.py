"""The project's one model registry: every architecture (teacher or student) by name, timm-style.

Each architecture module of :mod:`pipeline.models` registers its own names when it is imported::

    @register_model("psp18", description="...")
    def psp18(num_classes: int = 19, **kwargs) -> nn.Module: ...

    model = create_model("psp18", num_classes=19)
    model = create_model("my_pkg.my_models:make", num_classes=19)   # a custom import path

A model honours the contract of :mod:`pipeline.models` (raw RGB 0–255 input with NaN padding, an
``input_norm`` first module, a ``SegOutput`` result). This module imports no architecture: the
listing and creation functions import :mod:`pipeline.models` on first use, which registers them all.
"""

from __future__ import annotations

import difflib
import importlib
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from cache_tools.errors import ModelError, SkdError

__all__ = ["ROLES", "ModelEntry", "create_model", "list_models", "list_teachers", "register_model"]

ROLES = ("teacher", "student")


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


def _registered() -> dict[str, ModelEntry]:
    # the architectures register themselves on import; importing them here, not at the top, keeps
    # `from pipeline.registry import register_model` in those modules free of an import cycle
    importlib.import_module("pipeline.models")
    return _REGISTRY


def list_models(role: str | None = None) -> list[ModelEntry]:
    """Registered models sorted by name, optionally only those with ``role`` ("teacher" / "student")."""
    if role is not None and role not in ROLES:
        raise ModelError(f"unknown role {role!r}; give one of {', '.join(ROLES)}")
    return [e for _, e in sorted(_registered().items()) if role is None or role in e.roles]


def list_teachers() -> list[ModelEntry]:
    """Registered models meant as teachers."""
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
    registry = _registered()
    entry = registry.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, registry, n=1)
        hint = f" — did you mean {close[0]!r}?" if close else ""
        raise ModelError(
            f"unknown model {name!r}; known: {', '.join(sorted(registry))} (or give package.module:factory){hint}"
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
    from pipeline.models.base import InputNorm

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
        f"model {name!r}: its factory {label}(num_classes=...) failed with {type(e).__name__}: {one_line(e, 160)} "
        "— a model factory must take num_classes and return an nn.Module"
    )


def one_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, cut to ``limit`` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
