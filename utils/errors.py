"""User-facing errors: one clear line naming the file, key or value, and exit status 2.

Library code raises :class:`UserInputError` (or a subclass) for bad input: a missing file, an
unknown config key, a value out of range. Scripts wrap their ``main`` with :func:`run_cli`,
which turns the ways a run can end into one line on stderr and an exit status:

* ``UserInputError``: ``error: <message>``, status 2; raised in a DataLoader worker, it is
  unwrapped to the original message (PyTorch re-raises it as "Caught UserInputError in
  DataLoader worker process 0. Original Traceback ...");
* an operating-system error about a file (no space left, quota, permission denied, read-only
  file system, a folder where a file was expected, ...): ``error: <what> <file>``, status 2;
  outputs are written atomically (``utils/files.py``), so earlier versions stay intact;
* Ctrl-C (SIGINT): ``error: interrupted``, status 130 (128 + SIGINT, as shells report it).

Anything else (a bug) still raises with its full traceback.
"""

from __future__ import annotations

import errno
import sys
from typing import Callable, NoReturn, Optional, Sequence

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

# errno values that describe the environment of a file (not a bug), and how to say them
FILE_PROBLEMS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EISDIR: "is a folder",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files",
    errno.EIO: "input/output error",
}


class UserInputError(Exception):
    """Bad input from the user: a file, key or value; the message says which and why."""


def fail(message: str) -> NoReturn:
    raise UserInputError(message)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def user_message(exc: BaseException) -> str:
    """The one-line message of ``exc``; for an exception re-raised from a DataLoader worker,
    the original message (the last line of the worker's traceback)."""
    text = str(exc)
    if "in DataLoader worker process" in text and "Original Traceback" in text:
        cls = type(exc)
        prefixes = (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: ")
        lines = text.splitlines()
        for index in range(len(lines) - 1, -1, -1):
            prefix = next((p for p in prefixes if lines[index].startswith(p)), None)
            if prefix is not None:
                text = "\n".join([lines[index][len(prefix):]] + lines[index + 1:])
                break
    return one_line(text)


def file_problem(exc: OSError) -> Optional[str]:
    """One line for an OSError about a file's environment, or None for other OSErrors."""
    what = FILE_PROBLEMS.get(exc.errno)
    if what is None:
        return None
    where = exc.filename if exc.filename is not None else "(file unknown)"
    hint = " (free some space or choose another output folder)" \
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return one_line(f"{what}: {where}{hint}")


def run_cli(main: Callable[[Optional[Sequence[str]]], Optional[int]],
            argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Run ``main(argv)`` and exit with its return code (0 if None), or as the module
    docstring describes."""
    try:
        code = main(argv)
    except UserInputError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("error: interrupted; files written before are complete, the one being written "
              "was discarded", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except OSError as exc:
        message = file_problem(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    sys.exit(code or 0)
