"""Feature matrices read in row blocks, so that a probe's memory is bounded by a block, not by
the number of rows.

A :class:`RowSource` is an (N, D) feature matrix that can only be read block by block:
``source.blocks()`` yields ``(start, block)`` with ``block`` a (B, D) float32 torch tensor of
rows ``start .. start + B``. Two kinds of storage:

- :class:`ArrayRows`: an array in memory (float16 stays float16; each block is converted to
  float32 when it is read).
- :class:`NpzRows`: one array of an ``.npz`` file on disk. A member stored uncompressed (as
  ``compute_embeddings.py`` writes it, and ``np.savez``) is read with positioned reads at its
  byte offset into one reused buffer; a compressed member (``np.savez_compressed``) is
  decompressed as a stream. Either way, file pages are not mapped into the process, so they do
  not count in its memory.

On top of either, :meth:`RowSource.view` applies token pooling (mean over tokens) and a
column range per block, and :meth:`RowSource.select` keeps a subset of the rows. A transformed
source whose result fits ``cache_bytes`` is read once into memory (:meth:`RowSource.cached`),
so that, e.g., the 144 CLS columns of a 16 GB all-token file are read from disk once.

:func:`column_stats` computes the mean and variance of every column in one streamed pass
(numerically stable merging of per-block moments, float64) and counts rows holding a NaN or
inf.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

DEFAULT_BLOCK_BYTES = 16 << 20  # stored bytes per block read from disk
DEFAULT_CACHE_BYTES = 1 << 30  # a transformed source up to this size is held in memory


class RowSource:
    """An (N, D) matrix read in row blocks; see the module docstring."""

    shape: tuple
    dtype: np.dtype  # the stored dtype (float16, float32, ...)

    def __len__(self) -> int:
        return self.shape[0]

    def blocks(self, block_rows: Optional[int] = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, (B, D) float32 tensor)`` in row order, covering every row once.

        The tensor is one buffer, refilled for every block: the caller may change it in place
        but must copy it to keep it. (A fresh tens-of-MB tensor per block fragments the C heap:
        peak memory then grows with the number of blocks, i.e. with the rows.)"""
        buffer = None
        for start, block in self.raw_blocks(block_rows):
            if buffer is None or buffer.shape[0] < len(block):
                buffer = torch.empty(block.shape, dtype=torch.float32)
            out = buffer[:len(block)]
            out.copy_(torch.from_numpy(block))
            yield start, out

    def raw_blocks(self, block_rows: Optional[int] = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, (B, D) array of the stored dtype)``; the array may be reused by the
        next block (copy it to keep it)."""
        raise NotImplementedError

    def default_block_rows(self) -> int:
        row_bytes = max(1, int(np.prod(self.shape[1:])) * np.dtype(self.dtype).itemsize)
        return max(1, DEFAULT_BLOCK_BYTES // row_bytes)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def view(self, pool_tokens: Optional[tuple[int, int]] = None,
             columns: Optional[tuple[int, int]] = None) -> "RowSource":
        """Mean over ``pool_tokens = (T, E)`` tokens ((N, T*E) -> (N, E)), then columns
        ``columns = (a, b)``."""
        if pool_tokens is None and columns is None:
            return self
        return TransformedRows(self, pool_tokens, columns)

    def select(self, rows: np.ndarray) -> "RowSource":
        """The rows ``rows`` (sorted, unique indices), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == len(self) and np.array_equal(rows, np.arange(len(self))):
            return self
        return SelectedRows(self, rows)

    def cached(self, cache_bytes: int = DEFAULT_CACHE_BYTES) -> "RowSource":
        """This source held in memory (read once) when it fits ``cache_bytes``, else itself."""
        if isinstance(self, ArrayRows) or self.nbytes > cache_bytes:
            return self
        return ArrayRows(self.to_array())

    def stats(self) -> "ColumnStats":
        """Column statistics (:func:`column_stats`), computed on first use and kept."""
        if getattr(self, "_stats", None) is None:
            self._stats = column_stats(self)
        return self._stats

    def to_array(self) -> np.ndarray:
        """All rows in memory, stored dtype."""
        out = np.empty(self.shape, dtype=self.dtype)
        for start, block in self.raw_blocks():
            out[start:start + len(block)] = block
        return out


class ArrayRows(RowSource):
    """An in-memory (N, D) array (any float or integer dtype)."""

    def __init__(self, array: np.ndarray):
        if array.ndim == 3:
            array = array.reshape(array.shape[0], -1)
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = array.dtype

    def raw_blocks(self, block_rows=None):
        step = block_rows or self.default_block_rows()
        for start in range(0, len(self), step):
            yield start, self.array[start:start + step]

    def to_array(self) -> np.ndarray:
        return self.array


@dataclass
class NpyMember:
    """Where an array of an .npz file lives: shape, dtype and, for an uncompressed member, the
    byte offset of its data in the file (None for a compressed one)."""

    path: Path
    name: str
    shape: tuple
    dtype: np.dtype
    fortran_order: bool
    data_offset: Optional[int]


def npy_member(path, key: str) -> NpyMember:
    """Locate array ``key`` in the .npz ``path`` without reading its data."""
    path = Path(path)
    name = f"{key}.npy"
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
        with archive.open(info) as member:
            shape, fortran_order, dtype = _read_npy_header(member)
            header_length = member.tell()
    data_offset = None
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            name_length, extra_length = struct.unpack("<HH", local[26:30])
        data_offset = info.header_offset + 30 + name_length + extra_length + header_length
    return NpyMember(path, name, tuple(shape), np.dtype(dtype), fortran_order, data_offset)


def _read_npy_header(f) -> tuple:
    """(shape, fortran_order, dtype) of the .npy stream ``f``, left at the start of the data."""
    major, _ = np.lib.format.read_magic(f)
    if major == 1:
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


class NpzRows(RowSource):
    """Array ``key`` of an .npz file, read in row blocks (see the module docstring)."""

    def __init__(self, path, key: str):
        self.member = npy_member(path, key)
        if self.member.fortran_order or len(self.member.shape) not in (2, 3):
            raise ValueError(f"{path}: '{key}' must be a C-order (N, D) or (N, T, E) array")
        self.path, self.key = Path(path), key
        shape = self.member.shape
        self.shape = (shape[0], int(np.prod(shape[1:])))
        self.dtype = self.member.dtype

    def raw_blocks(self, block_rows=None):
        step = block_rows or self.default_block_rows()
        n_rows, dim = self.shape
        row_bytes = dim * self.dtype.itemsize
        buffer = np.empty((min(step, n_rows), dim), dtype=self.dtype)
        if self.member.data_offset is not None:
            with open(self.path, "rb", buffering=0) as f:
                for start in range(0, n_rows, step):
                    rows = min(step, n_rows - start)
                    _read_exactly(f, self.member.data_offset + start * row_bytes,
                                  memoryview(buffer[:rows]).cast("B"), self.path)
                    yield start, buffer[:rows]
            return
        with zipfile.ZipFile(self.path) as archive, archive.open(self.member.name) as member:
            _read_npy_header(member)
            for start in range(0, n_rows, step):
                rows = min(step, n_rows - start)
                _fill(member, memoryview(buffer[:rows]).cast("B"),
                      f"{self.path}: '{self.key}' is truncated")
                yield start, buffer[:rows]


def _read_exactly(f, offset: int, view: memoryview, path) -> None:
    f.seek(offset)
    _fill(f, view, f"{path}: the file ends before the data of its array")


def _fill(f, view: memoryview, truncated: str) -> None:
    """Read into all of ``view`` (readinto may return fewer bytes); ``truncated`` if the
    stream ends first."""
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise ValueError(truncated)
        done += got


class TransformedRows(RowSource):
    """Token pooling and/or a column range applied to every block of ``base``."""

    def __init__(self, base: RowSource, pool_tokens, columns):
        self.base, self.pool_tokens, self.columns = base, pool_tokens, columns
        dim = pool_tokens[1] if pool_tokens else base.shape[1]
        if columns:
            dim = columns[1] - columns[0]
        self.shape = (len(base), dim)
        self.dtype = np.dtype(np.float32) if pool_tokens else base.dtype

    def default_block_rows(self) -> int:
        return self.base.default_block_rows()

    def raw_blocks(self, block_rows=None):
        for start, block in self.base.raw_blocks(block_rows):
            if self.pool_tokens:
                tokens, embed_dim = self.pool_tokens
                block = block.reshape(len(block), tokens, embed_dim).mean(axis=1, dtype=np.float32)
            if self.columns:
                block = block[:, self.columns[0]:self.columns[1]]
            yield start, block


class SelectedRows(RowSource):
    """Rows ``rows`` (sorted indices) of ``base``: every base block is read, its selected rows
    kept (read once into memory by :meth:`cached` when they fit)."""

    def __init__(self, base: RowSource, rows: np.ndarray):
        self.base, self.rows = base, rows
        self.shape = (len(rows), *base.shape[1:])
        self.dtype = base.dtype

    def default_block_rows(self) -> int:
        return self.base.default_block_rows()

    def raw_blocks(self, block_rows=None):
        done = 0
        for start, block in self.base.raw_blocks(block_rows):
            end = np.searchsorted(self.rows, start + len(block))
            if end > done:
                yield done, block[self.rows[done:end] - start]
                done = end


# ------------------------------------------------------------------------- statistics


@dataclass
class ColumnStats:
    """Per-column mean and (population) variance of an (N, D) source, and the rows holding a
    non-finite value."""

    n_rows: int
    mean: np.ndarray  # (D,) float64
    var: np.ndarray  # (D,) float64
    bad_rows: int


def column_stats(source: RowSource, block_rows: Optional[int] = None) -> ColumnStats:
    """One streamed pass: mean and variance per column (float64, Chan et al.'s merge of
    per-block moments) and the number of rows with a NaN or inf."""
    dim = source.shape[1]
    count, mean, m2 = 0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)
    bad_rows = 0
    for _, block in source.blocks(block_rows):
        finite = torch.isfinite(block).all(dim=1)
        if not bool(finite.all()):
            bad_rows += int((~finite).sum())
            block = block[finite]
        if len(block) == 0:
            continue
        n = len(block)
        block_mean = block.sum(dim=0, dtype=torch.float64) / n
        block_m2 = block.sub_(block_mean.float()).square_().sum(dim=0, dtype=torch.float64)
        delta = block_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + block_m2 + delta ** 2 * (count * n / total)
        count = total
    var = (m2 / max(count, 1)).numpy()
    return ColumnStats(len(source), mean.numpy(), var, bad_rows)
