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
