"""One-line errors for the command-line entry points.

Every command (``roicodec``, ``jobs/*.py``) catches the errors bad input raises and prints
them as one ``PROG: error: MESSAGE`` line on stderr with a non-zero exit code, never a
traceback; :func:`run_cli` is that ``try``/``except`` written once.
"""

from __future__ import annotations

import sys
from typing import Callable

ExitCode = int | Callable[[BaseException], int]


def first_line(exc: BaseException) -> str:
    """The first non-blank line of ``exc``'s message, or its type's name when it has none."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def run_cli(body: Callable[[], int | None], prog: str | None, expected: tuple[type[BaseException], ...],
            *, exit_code: ExitCode = 1, message: Callable[[BaseException], str] = first_line,
            interrupt: bool = False) -> int:
    """``body()``'s exit code (None counts as 0); an ``expected`` error instead prints
    ``PROG: error: MESSAGE`` (``error: MESSAGE`` when ``prog`` is None) on stderr and returns
    ``exit_code`` (an int, or a function of the error). ``message`` picks the line to show.
    With ``interrupt``, Ctrl-C prints ``PROG: interrupted`` and returns 130. Other errors
    propagate: they are bugs, and their traceback is wanted."""
    label = f"{prog}: " if prog else ""
    try:
        result = body()
    except expected as exc:
        print(f"{label}error: {message(exc)}", file=sys.stderr)
        return exit_code(exc) if callable(exit_code) else exit_code
    except KeyboardInterrupt:
        if not interrupt:
            raise
        print(f"{label}interrupted", file=sys.stderr)
        return 130
    return 0 if result is None else result
