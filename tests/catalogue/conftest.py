"""Helpers shared by the bad-input catalogue: installed console scripts in a subprocess, file snapshots.

The catalogue runs the commands a user types (``skdcache``, ``skdstudent`` as installed on PATH), not
the typer apps in-process, so it sees what a fresh install prints (e.g. typer's vendored click).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "snapshot",
    "run_console",
    "assert_usage_error",
    "assert_one_line",
    "console_script",
    "flag_drift",
    "slow_teacher",
]


def snapshot(path: str | os.PathLike) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``path`` (or of ``path`` itself when a file).

    Compare two snapshots to prove a command left pre-existing files byte-identical.
    """
    root = Path(path)
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def console_script(name: str) -> str:
    """Absolute path of an installed console script; skips the test when it is not installed."""
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"console script {name!r} is not installed (pip install -e .)")
    return found


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # one thread and a wide, plain terminal: output assertions never depend on the runner
    env.update(COLUMNS="200", TERM="dumb", NO_COLOR="1", OMP_NUM_THREADS="1")
    env.pop("FORCE_COLOR", None)
    return env


def run_console(
    script: str, *args: str, cwd: str | os.PathLike | None = None, timeout: float = 120, env: dict | None = None
) -> tuple[int, str, str]:
    """Run an installed console script (``skdcache``/``skdstudent``) -> (exit code, stdout, stderr)."""
    proc = subprocess.run(
        [console_script(script), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**_env(), **(env or {})},
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


def assert_usage_error(code: int, err: str, *fragments: str) -> None:
    """Exit code 2 and click's short usage block (``Usage:`` line, hint, ``Error:`` line), no traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert 1 <= len(lines) <= 4, err
    assert lines[0].startswith("Usage:"), err
    assert lines[-1].startswith("Error:"), err
    flat = " ".join(err.split())
    for f in fragments:
        assert f in flat, err


def assert_one_line(code: int, err: str, *fragments: str, expected_code: int = 1) -> None:
    """One ``error:`` line on stderr, the expected non-zero exit code, no traceback, every fragment in it."""
    assert code == expected_code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for f in fragments:
        assert f in lines[0], err


def slow_teacher(num_classes: int = 19, seconds: float = 1.0, **kwargs):
    """A tiny teacher that sleeps ``seconds`` in every forward (``tests.catalogue.conftest:slow_teacher``).

    Lets a subprocess test interrupt a build while it is surely running, whatever the machine's speed.
    """
    import time

    from tests.pipeline.custom_teacher import TinySeg

    class SlowSeg(TinySeg):
        def forward(self, x):
            time.sleep(seconds)
            return super().forward(x)

    return SlowSeg(num_classes, **kwargs)


def _as_field_value(cli_default: Any, field_default: Any) -> Any:
    """A flag's default in the config field's type: ``"512x512"`` -> (512, 512), ``"a,b"`` -> ("a", "b")."""
    if isinstance(cli_default, os.PathLike):
        return str(cli_default)
    if isinstance(field_default, tuple) and isinstance(cli_default, str):
        if len(field_default) == 2 and all(isinstance(x, int) for x in field_default):
            from cache_tools.schema import parse_hw

            return parse_hw(cli_default)
        kind = type(field_default[0]) if field_default else str
        return tuple(kind(x.strip()) for x in cli_default.split(",") if x.strip())
    return cli_default


def flag_drift(app: Any, command: str, config_cls: type, cli_only: set[str]) -> list[str]:
    """Where a command's flags and its config dataclass disagree (empty when they agree).

    Every field has its flag (``cache_tools.options.flag_of``) unless marked internal; every flag
    has a field unless its parameter is in ``cli_only``; a flag's default equals the field's (``None``
    at the CLI means "the field's default"); the help of a choice flag names every choice.
    """
    import dataclasses

    import typer.main

    from cache_tools.options import flag_of

    cmd = typer.main.get_command(app).commands[command]
    params = {opt: p for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
    problems, flags = [], set()
    for f in dataclasses.fields(config_cls):
        meta = f.metadata.get("skd", {})
        if meta.get("internal"):
            continue
        flag = flag_of(f)
        flags.add(flag)
        p = params.get(flag)
        if p is None:
            problems.append(f"field {f.name!r} has no flag {flag}")
            continue
        problems += [
            f"{flag}: help does not name the choice {c!r}" for c in meta.get("choices") or () if c not in (p.help or "")
        ]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if not p.required:
                problems.append(f"{flag}: the field is required but the flag is not")
            continue
        want = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        got = p.default
        if got is None:
            continue
        if isinstance(want, bool) and flag.startswith("--no-"):
            got = not got
        if _as_field_value(got, want) != want:
            problems.append(f"{flag}: the CLI default {got!r} differs from the code's {want!r}")
    problems += [
        f"flag {opt} ({p.name}) has no config field"
        for opt, p in params.items()
        if opt.startswith("--") and opt not in flags and p.name not in cli_only
    ]
    return problems
