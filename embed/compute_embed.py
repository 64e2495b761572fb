"""Frozen-encoder embeddings of a whole dataset, streamed to an ``.npz`` file.

:func:`compute_embeddings` runs the encoder over a DataLoader and appends each batch's rows
to a raw array file as they are computed, so memory does not grow with the dataset (BEN-L's
269,695 chips x 15,120 features would be 16 GB); at the end the rows are packed into the
``.npz`` without being read into memory, and the ``.npz`` replaces the destination atomically.

Output keys: ``x`` (N, D) float32 or float16; ``y`` (N,) int64 class indices or (N, C) uint8
multi-hot rows; ``ids`` (N,) str (patch ids or file names); ``settings`` (a 0-d string array
holding JSON: pooling, normed, use_metadata, num_tokens, embed_dim, dtype, class names, ...).
The probes (``train_logistic_regression.py``) read this format.

``keys="published"`` writes the keys of the published notebooks instead, so that their
evaluation and t-SNE notebooks read the file unchanged: ``x_<split>`` (N, D) and ``y_<split>``
int16 (one-hot rows for a multiclass dataset, multi-hot for multilabel), next to ``ids`` and
``settings``; the probes read both layouts. Members are stored uncompressed, so the probes
read the features in row blocks at their byte offset (classification_models/rows.py).

Under ``torchrun`` every process embeds a contiguous shard of the dataset and process 0
merges the shards in dataset order (the output folder must be visible to all processes).

:func:`compute_geomoemae_embeddings` keeps the published notebooks' in-memory helper.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from datasets.builders import split_batch
from models.moe_mae import MOEEncoder, POOLINGS
from utils.errors import UserInputError
from utils.files import current_umask

DTYPES = {"float32": np.float32, "float16": np.float16}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtype

KEY_STYLES = ("ours", "published")


def output_keys(keys: str, split: Optional[str]) -> Tuple[str, str]:
    """(feature key, label key) of an embedding file: ``x``, ``y`` or ``x_<split>``, ``y_<split>``."""
    if keys not in KEY_STYLES:
        raise UserInputError(f"unknown embedding keys {keys!r}; choose ours or published")
    if keys == "ours":
        return "x", "y"
    if not split:
        raise UserInputError("published embedding keys (x_<split>, y_<split>) need the split name")
    return f"x_{split}", f"y_{split}"


def published_labels(y: np.ndarray, n_classes: Optional[int]) -> np.ndarray:
    """Labels as the published notebooks stored them: int16, class indices as one-hot rows."""
    if y.ndim == 1:
        width = n_classes if n_classes else int(y.max()) + 1
        y = np.eye(width, dtype=np.int16)[y]
    return y.astype(np.int16)


class _RowFile:
    """An .npy file of known row count, written batch by batch with plain file writes (file
    pages are not mapped into the process, so they do not count in its memory)."""

    def __init__(self, path: Path, rows: int, dtype, row_shape: Tuple[int, ...]):
        self.path, self.rows, self.written = path, rows, 0
        self.file = open(path, "wb")
        np.lib.format.write_array_header_1_0(self.file, {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
            "shape": (rows, *row_shape)})
        self.dtype, self.row_shape = np.dtype(dtype), row_shape

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.row_shape or self.written + len(block) > self.rows:
            raise ValueError(f"rows of shape {block.shape} do not fit {self.path}")
        self.file.write(block.tobytes())
        self.written += len(block)

    def close(self) -> None:
        self.file.close()
        if self.written != self.rows:
            raise RuntimeError(f"{self.path}: wrote {self.written} of {self.rows} rows")


def dataset_ids(dataset: Dataset) -> list:
    """Sample ids for the ``ids`` key: patch ids, file names, or indices."""
    if isinstance(dataset, Subset):
        ids = dataset_ids(dataset.dataset)
        return [ids[i] for i in dataset.indices]
    for attribute in ("patch_ids", "file_names"):
        if hasattr(dataset, attribute):
            return [str(v) for v in getattr(dataset, attribute)]
    return [str(i) for i in range(len(dataset))]


def _labels(targets) -> np.ndarray:
    targets = torch.as_tensor(targets)
    if targets.ndim == 2:
        return targets.to(torch.uint8).numpy()
    return targets.to(torch.int64).numpy()


def _shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    start = len(dataset) * rank // world_size
    end = len(dataset) * (rank + 1) // world_size
    return Subset(dataset, range(start, end))


@torch.inference_mode()
def compute_embeddings(encoder: MOEEncoder, dataset: Dataset, output: Optional[Union[str, Path]],
                       *, pooling: str = "all", normed: bool = False, use_metadata: bool = True,
                       dtype: str = "float32", batch_size: int = 256, num_workers: int = 0,
                       device: Union[str, torch.device] = "cpu", settings: Optional[dict] = None,
                       progress: bool = True, precision: str = "fp32", compile: bool = False,
                       keys: str = "ours", split: Optional[str] = None):
    """Embed every sample of ``dataset`` (items ``(img, target[, week, hour, lat, lon])``).

    pooling, normed: see :meth:`MOEEncoder.embed`. use_metadata=False feeds zeros instead of
    the dataset's metadata (ablation). dtype: float32 or float16 rows. ``output``: the .npz
    path (written atomically), or None to return a dict of the arrays instead (for
    notebooks; then everything is held in memory). keys, split: the key names (see the module
    docstring; ``split`` names the published keys). With an output, returns
    ``np.load(output)`` (arrays read lazily, on access) on process 0 and None on the others.
    precision: the encoder runs in fp32, or under bf16/fp16 autocast (rows are stored as
    ``dtype`` either way). compile: ``torch.compile`` the encoder's embedding function.
    """
    if pooling not in POOLINGS:
        raise UserInputError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if dtype not in DTYPES:
        raise UserInputError(f"unknown dtype {dtype!r}; choose float32 or float16")
    if precision not in PRECISIONS:
        raise UserInputError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    key_names = output_keys(keys, split)
    distributed = torch_dist.is_available() and torch_dist.is_initialized()
    rank, world_size = (torch_dist.get_rank(), torch_dist.get_world_size()) if distributed \
        else (0, 1)
    if len(dataset) == 0:
        raise UserInputError("the dataset is empty: nothing to embed")
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    shard = _shard(dataset, rank, world_size) if world_size > 1 else dataset
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    row_shape = (_embedding_size(encoder, pooling),)
    embed = _embedder(encoder, device, precision, compile)
    settings = {**(settings or {}), "pooling": pooling, "normed": normed,
                "use_metadata": use_metadata, "dtype": dtype, "precision": precision,
                "num_tokens": encoder.num_tokens, "embed_dim": encoder.embed_dim,
                "num_samples": len(dataset)}

    ids = dataset_ids(shard)
    if output is None:
        if world_size > 1:
            raise UserInputError("embedding into memory (output=None) needs a single process")
        rows, labels, done = [], [], 0
        for imgs, targets, meta in _batches(loader, progress and rank == 0):
            rows.append(_finite_rows(_embed_batch(embed, imgs, meta, pooling, normed,
                                                  use_metadata, device),
                                     ids, done).astype(DTYPES[dtype]))
            done += len(rows[-1])
            labels.append(_labels(targets))
        y = _stored_labels(np.concatenate(labels), keys, settings)
        return {key_names[0]: np.concatenate(rows), key_names[1]: y,
                "ids": np.array(dataset_ids(dataset)), "settings": np.array(json.dumps(settings))}

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    parts = output.parent / f".{output.name}.parts"
    if rank == 0:
        parts.mkdir(exist_ok=True)
    if distributed:
        torch_dist.barrier()
    x_file = _RowFile(parts / f"x.{rank}.npy", len(shard), DTYPES[dtype], row_shape)
    labels = []
    try:
        for imgs, targets, meta in _batches(loader, progress and rank == 0):
            x_file.append(_finite_rows(_embed_batch(embed, imgs, meta, pooling, normed,
                                                    use_metadata, device),
                                       ids, x_file.written))
            labels.append(_labels(targets))
        x_file.close()
        np.save(parts / f"y.{rank}.npy", np.concatenate(labels))
        if distributed:
            torch_dist.barrier()
        if rank == 0:
            _merge_parts(parts, world_size, len(dataset), DTYPES[dtype], row_shape, output,
                         np.array(dataset_ids(dataset)), settings, keys, key_names)
    finally:
        x_file.file.close()
        if rank == 0:
            _remove_tree(parts)
    if distributed:
        torch_dist.barrier()
    return np.load(output) if rank == 0 else None


def _embedding_size(encoder: MOEEncoder, pooling: str) -> int:
    tokens = {"cls": 1, "mean": 1, "all": encoder.num_tokens, "meta_cls": 5}[pooling]
    return tokens * encoder.embed_dim


def _batches(loader: DataLoader, progress: bool) -> Iterable:
    for batch in tqdm(loader, desc="embedding", disable=not progress, mininterval=1.0):
        yield split_batch(batch)


def _finite_rows(rows: np.ndarray, ids: list, start: int) -> np.ndarray:
    """``rows`` (the samples ``start``... of ``ids``) if all finite; else an error naming them
    (a NaN row would silently poison every probe trained on the file)."""
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        bad = [ids[start + i] for i in np.flatnonzero(~finite)]
        raise UserInputError(f"non-finite embeddings (NaN or inf) for {len(bad)} sample(s) of "
                             f"a batch: {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''} "
                             f"(check these chips and the checkpoint); the file was not written")
    return rows


def _embedder(encoder: MOEEncoder, device: torch.device, precision: str, compile: bool):
    """``encoder.embed``, compiled if asked, under autocast for bf16/fp16."""
    embed = torch.compile(encoder.embed) if compile else encoder.embed
    amp_dtype = PRECISIONS[precision]
    if amp_dtype is None:
        return embed

    def embed_in_precision(*args, **kwargs):
        with torch.autocast(device.type, dtype=amp_dtype):
            return embed(*args, **kwargs)

    return embed_in_precision


def _embed_batch(embed, imgs, meta, pooling, normed, use_metadata, device) -> np.ndarray:
    meta = [None if m is None or not use_metadata else m.to(device) for m in meta]
    embeddings = embed(imgs.to(device), *meta, pooling=pooling, normed=normed)
    return embeddings.float().cpu().numpy()


def _stored_labels(y: np.ndarray, keys: str, settings: dict) -> np.ndarray:
    if keys == "published":
        names = settings.get("class_names")
        return published_labels(y, len(names) if names else None)
    return y


def _merge_parts(parts: Path, world_size: int, rows: int, dtype, row_shape, output: Path,
                 ids: np.ndarray, settings: dict, keys: str = "ours",
                 key_names: Tuple[str, str] = ("x", "y")) -> None:
    """Concatenate the shards' rows (streamed) and labels into the final .npz, atomically."""
    merged_x = parts / "x.npy"
    if world_size == 1:
        os.replace(parts / "x.0.npy", merged_x)
    else:
        with open(merged_x, "wb") as out:
            np.lib.format.write_array_header_1_0(out, {
                "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                "shape": (rows, *row_shape)})
            for rank in range(world_size):
                with open(parts / f"x.{rank}.npy", "rb") as part:
                    np.lib.format.read_magic(part)
                    np.lib.format.read_array_header_1_0(part)
                    while chunk := part.read(1 << 24):
                        out.write(chunk)
    y = _stored_labels(np.concatenate([np.load(parts / f"y.{rank}.npy")
                                       for rank in range(world_size)]), keys, settings)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~current_umask())  # what open() gives, not mkstemp's private 0o600
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as npz:
            npz.write(merged_x, arcname=f"{key_names[0]}.npy")  # streamed in chunks, not loaded
            arrays = ((key_names[1], y), ("ids", ids), ("settings", np.array(json.dumps(settings))))
            for name, array in arrays:
                with npz.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove_tree(folder: Path) -> None:
    if folder.is_dir():
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


# ------------------------------------------------------------------ published helper


@torch.inference_mode()
def compute_geomoemae_embeddings(model, dataloader: Iterable, device="cuda",
                                 use_autocast: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """The published notebooks' helper: ``(x, y)`` arrays held in memory.

    Calls ``model(x, **meta)`` (metadata when the batch has it) and keeps the last output:
    for the encoder, the tokens before the final norm, (N, 105, 144) for size S. Batches are
    ``(x, y[, week, hour, lat, lon])`` tuples or ``{"x", "y", "meta_*"}`` dicts.
    """
    device = torch.device(device)
    model.eval().to(device)
    xs, ys = [], []
    for batch in tqdm(dataloader, desc="Computing embeddings"):
        if isinstance(batch, dict):
            x, y = batch["x"], batch["y"]
            meta = {k: batch[k].to(device) for k in ("meta_week", "meta_hour", "meta_lat",
                                                     "meta_lon") if batch.get(k) is not None}
        else:
            x, y, *rest = batch
            names = ("meta_week", "meta_hour", "meta_lat", "meta_lon")
            meta = {name: value.to(device) for name, value in zip(names, rest)}
        autocast = torch.autocast(device.type) if use_autocast else nullcontext()
        with autocast:
            out = model(x.to(device), **meta)
        embeddings = out[-1] if isinstance(out, (tuple, list)) else out
        xs.append(embeddings.float().cpu())
        ys.append(torch.as_tensor(y).cpu())
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()
