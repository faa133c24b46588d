"""What both CLIs share: running a typer app with one-line user errors, consoles, progress bars.

Only the CLI modules import this (it pulls in typer and rich); the libraries never print.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .errors import SkdError

__all__ = [
    "console",
    "err_console",
    "run_app",
    "setup_logging",
    "parse_storage_options",
    "progress_bar",
    "print_json",
    "fail",
]

console = Console()
err_console = Console(stderr=True)


def setup_logging(verbose: bool) -> None:
    """Install a rich log handler once (library modules log with ``logging.getLogger(__name__)``)."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )


def fail(message: str, code: int = 1) -> None:
    """Print one red line to stderr and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run_app(app: typer.Typer, argv: list[str] | None = None) -> None:
    """Run a typer app; user errors (SkdError) become one line and exit code 1, no traceback."""
    try:
        # standalone_mode=False makes click *return* the code of a typer.Exit instead of exiting
        code = app(args=argv, standalone_mode=False)
    except SkdError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)


def parse_storage_options(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (values parsed as JSON when they parse) -> fsspec storage options.

    ``endpoint_url`` goes where s3fs expects it (``client_kwargs``). ``SKD_STORAGE_OPTIONS`` (a JSON
    object) supplies defaults, so a team can set its endpoint once in the environment.
    """
    out: dict[str, Any] = {}
    env = os.environ.get("SKD_STORAGE_OPTIONS")
    if env:
        try:
            out.update(json.loads(env))
        except json.JSONDecodeError:
            raise SkdError("SKD_STORAGE_OPTIONS must hold a JSON object") from None
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SkdError(f"--storage-option must look like KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    if "endpoint_url" in out:
        out.setdefault("client_kwargs", {})["endpoint_url"] = out.pop("endpoint_url")
    return out


@contextmanager
def progress_bar(description: str, total: int | None, unit: str = "items") -> Iterator[Callable[..., None]]:
    """A rich progress bar; yields ``update(completed, total=None, rate="", extra="")``."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(f"{unit}"),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[extra]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    prog = Progress(*columns, console=err_console, transient=False)
    task = prog.add_task(description, total=total, rate="", extra="")
    started = False

    def update(completed: int, total: int | None = None, rate: str = "", extra: str = "") -> None:
        # the bar appears on the first update, so errors found while setting up print cleanly
        nonlocal started
        if not started:
            prog.start()
            started = True
        if total is not None:
            prog.update(task, total=total)
        prog.update(task, completed=completed, rate=rate, extra=extra)

    try:
        yield update
    finally:
        if started:
            prog.stop()


def print_json(obj: Any) -> None:
    """Machine-readable output on stdout (no rich markup)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()
