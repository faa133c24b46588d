"""Running a CLI entry point in-process and checking its one-line user errors."""

from __future__ import annotations

from collections.abc import Callable


def run_cli(main: Callable[[list[str]], None], argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``main(argv)``."""
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """Exit code 1, one ``error:`` line on stderr, no traceback, every fragment in it."""
    assert code == 1, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    flat = err.replace("\n", " ")
    for f in fragments:
        assert f in flat, err


def assert_usage_error(code: int, err: str, *fragments: str) -> None:
    """Exit code 2 and click's short usage block (``Usage:``, ``Try ...``, ``Error: ...``), no traceback."""
    assert code == 2, err
    assert err.lstrip().startswith("Usage:") and "\nError: " in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.strip()]) <= 4, err
    flat = err.replace("\n", " ")
    for f in fragments:
        assert f in flat, err


def assert_refused(code: int, err: str, *fragments: str) -> None:
    """A bad value: a bad choice is a usage error (exit 2), any other a one-line error (exit 1)."""
    if code == 2:
        assert_usage_error(code, err, *fragments)
    else:
        assert_one_line_error(code, err, *fragments)
