"""Config fields that know their flag, choices and range, and one validator for all of them.

A config dataclass (``BuildConfig``, ``TrainConfig``) declares each field with :func:`option`; its
``__post_init__`` calls :func:`check_options`, so a library caller gets the same one-line
:class:`~cache_tools.errors.ConfigError` as a CLI user. The CLI tests compare each command's flags
with these fields (every field has a flag unless ``internal``, defaults agree, every choice is named
in the flag's help), so a default exists once and cannot drift.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class C:
    ...     views: int = option(4, lo=1)
    ...     def __post_init__(self):
    ...         check_options(self)
    >>> C(views=0)
    Traceback (most recent call last):
    ...
    cache_tools.errors.ConfigError: --views must be at least 1, got 0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from .errors import ConfigError

__all__ = ["option", "check_options", "flag_of", "MAX_SIDE", "MAX_SEED"]

#: the largest crop/tile side a config accepts: bounded from the number alone, before anything is
#: allocated (an 8192 x 8192 float32 map of 19 classes is already 5 GB)
MAX_SIDE = 8192
#: seeds go to numpy's and torch's generators, which take non-negative 63-bit integers
MAX_SEED = 2**63 - 1


def option(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    flag: str | None = None,
    choices: Sequence[str] | None = None,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    internal: bool = False,
) -> Any:
    """A dataclass field with its CLI flag, choices and closed range ``[lo, hi]`` (``(lo, hi]`` with lo_open).

    Args:
        flag: the CLI flag (default ``--field-name``); named in every error message.
        choices: the allowed values of a string field.
        lo, hi: bounds of a number (or of every number in a tuple); NaN and inf are always refused.
        internal: no CLI flag on purpose (library callers and tests only).
    """
    meta = {"flag": flag, "choices": tuple(choices) if choices else None, "lo": lo, "hi": hi}
    meta.update(lo_open=lo_open, internal=internal)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"skd": meta})


def flag_of(f: dataclasses.Field) -> str:
    """The CLI flag of a config field."""
    meta = f.metadata.get("skd", {})
    return meta.get("flag") or "--" + f.name.replace("_", "-")


def _check_number(flag: str, x: Any, meta: dict) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ConfigError(f"{flag} must be a number, got {x!r}")
    if not math.isfinite(x):
        raise ConfigError(f"{flag} must be a finite number, got {x}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and meta.get("lo_open") and not x > lo:
        raise ConfigError(f"{flag} must be greater than {lo:g}, got {x:g}")
    if lo is not None and not meta.get("lo_open") and x < lo:
        raise ConfigError(f"{flag} must be at least {lo:g}, got {x:g}")
    if hi is not None and x > hi:
        raise ConfigError(f"{flag} must be at most {hi:g}, got {x:g}")


def check_options(config: Any) -> None:
    """Check every field declared with :func:`option`: choices, finiteness and range (``None`` = unset).

    Raises:
        ConfigError: naming the flag, the allowed values and the value given.
    """
    for f in dataclasses.fields(config):
        meta = f.metadata.get("skd")
        value = getattr(config, f.name)
        if meta is None or value is None:
            continue
        flag = flag_of(f)
        if meta["choices"] is not None:
            if value not in meta["choices"]:
                raise ConfigError(f"{flag} must be one of {', '.join(meta['choices'])}; got {value!r}")
            continue
        if meta["lo"] is None and meta["hi"] is None:
            continue
        for x in value if isinstance(value, (tuple, list)) else (value,):
            _check_number(flag, x, meta)
