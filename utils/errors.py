"""User-facing errors: one clear line naming the file, key or value, and exit status 2.

Library code raises :class:`UserInputError` (or a subclass) for bad input: a missing file, an
unknown config key, a value out of range. Scripts wrap their ``main`` with :func:`run_cli`,
which prints ``error: <message>`` on one line to stderr and exits with status 2 instead of
showing a traceback. Anything else (a bug) still raises with its full traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn, Optional, Sequence

EXIT_USER_ERROR = 2


class UserInputError(Exception):
    """Bad input from the user: a file, key or value; the message says which and why."""


def fail(message: str) -> NoReturn:
    raise UserInputError(message)


def run_cli(main: Callable[[Optional[Sequence[str]]], Optional[int]],
            argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Run ``main(argv)`` and exit: its return code (0 if None), or 2 on UserInputError."""
    try:
        code = main(argv)
    except UserInputError as exc:
        message = " ".join(str(exc).split())  # always a single line
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    sys.exit(code or 0)
