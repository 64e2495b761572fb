"""Atomic output files: a reader never sees a half-written checkpoint, .npz or .joblib.

Every writer goes to a temporary file in the destination's directory and then
``os.replace``-s it onto the destination, which is atomic on POSIX and Windows. If the writer
fails (or the process is killed), the previous file, if any, is left untouched and the
temporary file is removed (or, after a kill, left behind with a ``.tmp`` suffix).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def torch_save(obj: Any, path: PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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


def write_json(path: PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


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
