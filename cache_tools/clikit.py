"""What both CLIs share: running a typer app with one-line user errors, consoles, progress bars.

Only the CLI modules import this (it pulls in typer and rich); the libraries never print.
"""

from __future__ import annotations

import _thread
import importlib
import inspect
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .errors import ConfigError, SchemaError, SkdError

F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "new_app",
    "Opt",
    "with_options",
    "console",
    "err_console",
    "run_app",
    "setup_logging",
    "verbose",
    "set_interrupt_hint",
    "parse_storage_options",
    "progress_bar",
    "print_json",
    "fail",
    "hw",
    "names",
    "config_from_flags",
    "floats",
    "in_range",
    "check_destination",
]

console = Console()
err_console = Console(stderr=True)


def new_app(name: str, help: str, verbose_help: str) -> typer.Typer:
    """A typer app with the settings both CLIs share and a top-level ``--verbose`` (``-v``) that sets up logging.

    Pretty tracebacks are off because :func:`run_app` turns every failure into one line.
    """
    app = typer.Typer(
        name=name,
        help=help,
        no_args_is_help=True,
        rich_markup_mode="rich",
        context_settings={"help_option_names": ["-h", "--help"]},
        pretty_exceptions_enable=False,
        add_completion=False,
    )

    @app.callback()
    def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help=verbose_help)) -> None:
        setup_logging(verbose)

    return app


class Opt(NamedTuple):
    """One row of a command's option table (:func:`with_options`).

    Attributes:
        type: the parameter's type (``int``, ``str | None``, ``Path``, ``list[str] | None`` ...).
        default: its default; ``...`` makes the option required.
        help: the help line.
        names: the option's names; default ``--param-name`` (a bool is then a single on-flag).
    """

    type: Any
    default: Any
    help: str
    names: tuple[str, ...] = ()


def with_options(options: dict[str, Opt]) -> Callable[[F], F]:
    """Give a typer command the options of a table, in the table's order; the command takes ``**flags``.

    A command with sixty options then reads as what it does, and its options read as a table, one row
    an option (typer reads the signature set here exactly as it reads a written one). The CLI tests
    compare such a table with the command's config dataclass: flags, defaults and choices.
    """
    params = []
    for name, opt in options.items():
        names = opt.names or (("--" + name.replace("_", "-"),) if opt.type is bool else ())
        info = typer.Option(opt.default, *names, help=opt.help)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=opt.type))

    def declare(command: F) -> F:
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        return command

    return declare


_verbose = False


def setup_logging(verbose: bool) -> None:
    """Install a rich log handler once (library modules log with ``logging.getLogger(__name__)``).

    ``--verbose`` also turns on tracebacks for errors (see :func:`run_app`). Third-party loggers that
    talk at INFO (dask's ``distributed``, ``bokeh``, ``tornado``) stay at WARNING unless asked for.
    """
    global _verbose
    _verbose = verbose
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)


#: loggers of libraries that log routine INFO lines (a dask cluster prints dozens per build)
QUIET_LOGGERS = ("distributed", "bokeh", "tornado", "fsspec", "asyncio")


def verbose() -> bool:
    """Whether the top-level ``--verbose`` was given (set by :func:`setup_logging`)."""
    return _verbose


_interrupt_hint = ""


def set_interrupt_hint(hint: str) -> None:
    """What the interrupt line adds after ``interrupted``, e.g. how to resume (set by resumable commands)."""
    global _interrupt_hint
    _interrupt_hint = hint


def fail(message: str, code: int = 1) -> None:
    """Print one red line to stderr and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _click_classes(name: str) -> tuple[type, ...]:
    """Click's exception class ``name`` wherever it lives with this typer.

    typer >= 0.20 vendors click as ``typer._click`` (``Abort``/``Exit`` moved to ``typer.exceptions``);
    older typers use click itself. Both are looked up, so either install reads the same.
    """
    found = []
    for mod_name in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(mod_name), name, None)
        except ImportError:
            continue
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _handle_click(exc: BaseException) -> int | None:
    """Show a click usage error as click does (usage line, hint, ``Error:`` line); its exit code, or None."""
    if isinstance(exc, _click_classes("ClickException")):
        exc.show()  # type: ignore[attr-defined]
        return exc.exit_code  # type: ignore[attr-defined]
    if isinstance(exc, _click_classes("Abort")):
        err_console.print("[yellow]aborted[/]")
        return 1
    if isinstance(exc, _click_classes("Exit")):
        return exc.exit_code  # type: ignore[attr-defined]
    return None


def _traceback() -> None:
    """The current exception's traceback on stderr (only with ``--verbose``)."""
    import traceback

    sys.stderr.write(traceback.format_exc())
    sys.stderr.flush()


_interrupted = False


def _on_sigint(signum: int, frame: Any) -> None:
    """Remember the interrupt, then raise KeyboardInterrupt as Python does.

    Needed because typer >= 0.20 turns a KeyboardInterrupt into a silent exit code 130 and older
    click into ``Abort``: the flag lets :func:`run_app` say what happened either way.
    """
    global _interrupted
    _interrupted = True
    signal.default_int_handler(signum, frame)


@contextmanager
def _interrupt_handling() -> Iterator[None]:
    """Within: SIGINT is remembered (:func:`_on_sigint`), and one landing in a finaliser is raised again.

    A Ctrl-C arriving while, say, a DataLoader's ``__del__`` waits for its workers would otherwise be
    printed as "Exception ignored ..." with a traceback, and the command would carry on. The previous
    handler and hook are restored afterwards (tests run the CLI in-process).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous_hook, previous_handler = sys.unraisablehook, signal.getsignal(signal.SIGINT)

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _thread.interrupt_main()
            return
        previous_hook(unraisable)

    sys.unraisablehook = hook
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGINT, previous_handler)


def _say_interrupted() -> None:
    # a fresh console: the interrupt may have landed inside a progress-bar refresh, which leaves
    # err_console buffering (nothing it printed afterwards would appear)
    Console(stderr=True).print(f"[yellow]interrupted[/]{_interrupt_hint}", highlight=False, soft_wrap=True)


def run_app(app: typer.Typer, argv: list[str] | None = None) -> None:
    """Run a typer app: every failure ends as one line (usage errors as click's short usage block).

    Exit codes: 1 for a user error (SkdError) or an unexpected error, 2 for a usage error, 130 for an
    interrupt (Ctrl-C). Tracebacks are printed only with the top-level ``--verbose``.
    """
    global _interrupted
    _interrupted = False
    try:
        # standalone_mode=False makes click *return* the code of a typer.Exit instead of exiting
        with _interrupt_handling():
            code = app(args=argv, standalone_mode=False)
    except SkdError as exc:
        if _verbose:
            _traceback()
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        code = 130
    except OSError as exc:
        if _verbose and not _interrupted:
            raise
        # a file-system refusal the command did not foresee: still one line that names the path
        where = f" ({exc.filename})" if exc.filename else ""
        if not _interrupted:
            err_console.print(
                f"[bold red]error:[/] {exc.strerror or exc}{where}: check the path, its permissions and free space",
                highlight=False,
                soft_wrap=True,
            )
        code = 1
    except Exception as exc:
        code = 130 if _interrupted else _handle_click(exc)
        if code is None:
            if _verbose:
                raise
            err_console.print(
                f"[bold red]error:[/] unexpected {type(exc).__name__}: {exc} (re-run with --verbose for the "
                "traceback and report it)",
                highlight=False,
                soft_wrap=True,
            )
            code = 1
    if _interrupted:
        _say_interrupted()
        code = 130
    if isinstance(code, int) and code:
        sys.exit(code)


def config_from_flags(cls: type, values: dict[str, Any], convert: dict[str, Callable[[Any, str], Any]]) -> Any:
    """A config dataclass from a command's parameters, matched by each field's flag (one mapping, not a copy).

    The parameter of field ``f`` is named after ``flag_of(f)`` (``--shard-size`` -> ``shard_size``); a
    ``--no-X`` flag sets its boolean field to the opposite; ``None`` leaves the field's default;
    ``convert[field]`` parses text (``"512x512"``, ``"a,b"``) and paths become strings.
    """
    import dataclasses

    from .options import flag_of

    kwargs = {}
    for f in dataclasses.fields(cls):
        flag = flag_of(f)
        value = values.get(flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        if f.name in convert:
            value = convert[f.name](value, flag)
        elif isinstance(value, bool) and flag.startswith("--no-"):
            value = not value
        elif isinstance(value, os.PathLike):
            value = str(value)
        choices = f.metadata.get("skd", {}).get("choices")
        if choices and value not in choices:  # a bad choice is a usage error, shown as click shows one
            _usage_error(f"Invalid value for '{flag}': {value!r}; {flag} must be one of {', '.join(choices)}.")
        kwargs[f.name] = value
    return cls(**kwargs)


def _usage_error(message: str) -> None:
    """Raise click's UsageError in the running command's context (usage line + ``Error:``, exit 2).

    Outside a click command (a library call) the same message is a :class:`ConfigError`.
    """
    for name in ("typer._click", "click"):  # typer >= 0.20 vendors click as typer._click
        try:
            where = importlib.import_module(f"{name}.globals")
            exceptions = importlib.import_module(f"{name}.exceptions")
        except ImportError:
            continue
        ctx = where.get_current_context(silent=True)
        if ctx is not None:
            raise exceptions.UsageError(message, ctx=ctx)
    raise ConfigError(message)


def names(value: str, flag: str) -> tuple[str, ...]:
    """A comma-separated list of names of a flag (``train,val``) -> a tuple, blanks dropped."""
    return tuple(x.strip() for x in value.split(",") if x.strip())


def hw(value: str, flag: str) -> tuple[int, int]:
    """``HxW`` (or ``N``) of a flag -> (h, w); a malformed value is a one-line ConfigError naming the flag."""
    from .schema import parse_hw

    try:
        return parse_hw(value, flag)
    except SchemaError as exc:
        raise ConfigError(str(exc)) from None


def floats(value: str, flag: str) -> tuple[float, ...]:
    """A comma-separated list of numbers of a flag (``0.75,1,1.25``) -> floats, or a one-line ConfigError."""
    items = [x.strip() for x in value.split(",") if x.strip()]
    try:
        out = tuple(float(x) for x in items)
    except ValueError:
        raise ConfigError(f"{flag} must be numbers separated by commas (e.g. 0.75,1,1.5), got {value!r}") from None
    if not out:
        raise ConfigError(f"{flag} needs at least one number")
    return out


def in_range(flag: str, value: float | None, lo: float | None = None, hi: float | None = None) -> None:
    """Refuse a flag's number outside ``[lo, hi]`` (or not finite) in one line; ``None`` means unset."""
    import math

    if value is None:
        return
    if not math.isfinite(value):
        raise ConfigError(f"{flag} must be a finite number, got {value}")
    if lo is not None and value < lo:
        raise ConfigError(f"{flag} must be at least {lo:g}, got {value:g}")
    if hi is not None and value > hi:
        raise ConfigError(f"{flag} must be at most {hi:g}, got {value:g}")


#: kernel pseudo file systems: writing a cache or a run there can only fail, often obscurely
_PSEUDO_FS = ("/proc", "/sys", "/dev")


def check_destination(url: str, flag: str) -> None:
    """Refuse a local destination that cannot hold files (under /proc, /sys, /dev, or a non-directory parent).

    Remote URLs are left to their file system. Nothing is created here.
    """
    from .storage import is_remote, local_path

    if is_remote(url):
        return
    path = local_path(url).absolute()
    for root in _PSEUDO_FS:
        if path == Path(root) or Path(root) in path.parents:
            raise ConfigError(
                f"cannot write to {flag} {url}: {root} is a kernel file system, not storage; choose a directory on disk"
            )
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent != path and not parent.is_dir():
        raise ConfigError(f"cannot write to {flag} {url}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot write to {flag} {url}: {parent} is not writable")


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
    except BaseException:
        if started:  # an error line follows: take the bar off stderr so that line stands alone
            prog.live.transient = True
        raise
    finally:
        if started:
            prog.stop()


def print_json(obj: Any) -> None:
    """Machine-readable output on stdout (no rich markup)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()
