"""Output files: atomic, with ordinary permissions, checked before any work, and locked folders.

Atomic writes: every writer goes to a temporary file ``.<name>.<random>.tmp`` in the
destination's folder and then ``os.replace``-s it onto the destination, which is atomic on
POSIX and Windows. If the writer fails (or the process is interrupted), the previous file, if
any, is left untouched and the temporary file is removed; after a kill (SIGKILL, power loss)
it stays behind, and :func:`remove_stale_temporaries` clears it at the next start of the
program that owns the folder. An ``OSError`` while writing (a full disk) names the
destination, not the temporary file, so the error message says which output it was.

Permissions: a new output gets the mode a plain ``open(path, "w")`` would give, ``0o666``
minus the umask (``mkstemp`` alone makes ``0o600``, which colleagues on a shared file system
cannot read); a replaced file keeps the mode it had.

Checks before work: :func:`check_output_file` and :func:`check_output_dir` fail with one line
(``UserInputError``) when an output could not be written (a folder where a file should go, a
file where a folder should go, no write permission, a read-only file system), so that a script
stops before hours of computation rather than after.

Folder ownership: :class:`FolderLock` holds an exclusive ``fcntl.flock`` on a file in a folder
for a run's lifetime; the lock file records the holder's pid for the message of a second run.
The kernel releases the lock when the holder exits, however it exits (a lock file left by a
killed run is not held by anyone, so it does not block the next run).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional, Union

from utils.errors import UserInputError

PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------- permissions


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path, default: int) -> int:
    """The mode a plain open()/mkdir() of ``path`` would leave: the existing file's, else
    ``default`` minus the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return default & ~current_umask()


def make_temp_dir(parent: PathLike, name: str) -> Path:
    """A new temporary folder ``.<name>.<random>.tmp`` in ``parent``, with the mode of an
    ordinary folder (``mkdtemp`` makes it private)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp"))
    os.chmod(folder, 0o777 & ~current_umask())
    return folder


# ------------------------------------------------------------------------ atomic writes


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp_path = Path(tmp)
    try:
        os.fchmod(fd, _mode_for(path, 0o666))
        os.close(fd)
        fd = None
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as exc:
        if fd is not None:
            os.close(fd)
        tmp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and (exc.filename is None or str(tmp_path) in (
                str(exc.filename), str(exc.filename2))):
            # the file being written is the destination (a copy names its source first)
            exc.filename, exc.filename2 = str(path), None
        raise


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C (SIGINT) during the block takes effect when the block ends, with the handler
    that was in place before (a ``KeyboardInterrupt``, normally). Where no handler can be set
    (outside the main thread) or SIGINT is ignored, the block runs as it is."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None):
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)


def torch_save(obj: Any, path: PathLike) -> None:
    import torch

    # torch.save's C++ writer calls back into the Python file's write(): a KeyboardInterrupt
    # raised there leaves the writer broken, and its cleanup raises a RuntimeError (a
    # traceback instead of "error: interrupted") or aborts the process. So Ctrl-C waits for
    # the end of the write (milliseconds for a checkpoint); the file is then complete.
    with interrupts_deferred(), atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)  # through a Python file: a full disk is an OSError, not a RuntimeError


def copy_file(source: PathLike, path: PathLike) -> None:
    """Copy ``source`` onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)


def joblib_dump(obj: Any, path: PathLike) -> None:
    import joblib

    with atomic_path(path) as tmp:
        joblib.dump(obj, tmp)


def save_npz(path: PathLike, **arrays: Any) -> None:
    """``np.savez`` to exactly ``path`` (numpy would append .npz to a temporary name)."""
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinite floats replaced by None (JSON has no NaN: ``json.dumps``
    would write the invalid token ``NaN``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(value) for value in obj]
    return obj


def write_json(path: PathLike, obj: Any) -> None:
    """Valid JSON always: non-finite floats are written as null (see :func:`json_safe`)."""
    write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False)
               + "\n")


def write_csv(path: PathLike, rows, columns=None) -> None:
    """Rows (dicts) as a CSV with a header; ``columns`` defaults to the first row's keys.
    Keys outside ``columns`` are left out."""
    rows = list(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns or (rows[0] if rows else [])),
                            extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def remove_stale_temporaries(folder: PathLike, names: Iterable[str]) -> List[Path]:
    """Remove the temporary files and folders that writes of ``names`` in ``folder`` left
    behind when killed (``.<name>.<random>.tmp``); returns what was removed. Call it only
    while holding the folder (:class:`FolderLock`), so that no live write is removed."""
    folder = Path(folder)
    patterns = [re.compile(rf"^\.{re.escape(name)}\.[A-Za-z0-9_]+\.tmp$") for name in names]
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if any(pattern.match(entry.name) for pattern in patterns):
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# ---------------------------------------------------------------- checks before work


def _nearest_existing(path: Path) -> Path:
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _check_writable_folder(folder: Path, path: Path, what: str) -> None:
    if not folder.is_dir():
        raise UserInputError(f"{what} {path}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UserInputError(f"{what} {path}: cannot write in {folder} "
                             f"({exc.strerror or exc})") from None


def check_output_dir(path: PathLike, what: str = "output folder") -> None:
    """``path`` can be (or already is) a folder this process can write in; nothing is created.
    ``what`` names the option in the message (e.g. ``--out``, ``training.weight_path``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"{what} {path}: exists and is not a folder")
    _check_writable_folder(_nearest_existing(path), path, what)


def check_output_file(path: PathLike, what: str = "output file") -> None:
    """``path`` can be written as a file (it is not a folder, its folder can be created and
    written in); nothing is created."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{what} {path}: is a folder, expected a file name")
    _check_writable_folder(_nearest_existing(path.parent), path, what)


# --------------------------------------------------------------------- folder ownership


class FolderBusy(UserInputError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """An exclusive, non-blocking ``flock`` on ``folder/<name>`` held until :meth:`release`
    (or the process's end, however it ends). ``acquire`` raises :class:`FolderBusy` naming
    the holder's pid. The lock file is removed on release; one left by a killed holder is
    simply locked again."""

    def __init__(self, folder: PathLike, name: str = ".lock", what: str = "folder"):
        self.path = Path(folder) / name
        self.what = what
        self._fd: Optional[int] = None

    def acquire(self) -> "FolderLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise FolderBusy(f"{self.what} {self.path.parent} is in use by another run "
                                 f"(pid {holder}, lock {self.path}); wait for it to end or "
                                 f"choose another folder") from None
            try:  # the holder we waited for may have removed the file meanwhile: lock anew
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still holding it (see acquire)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
