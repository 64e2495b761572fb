"""Packed BEN-L: a split converted once into a memory-mapped array, read ~100x faster than GeoTIFFs.

    python -m datasets.pack --csv SPLIT.csv --root ROOT --out DIR [--skip-invalid] [--workers N]

``DIR`` then holds:

* ``images.npy``: uint16 (N, 7, 40, 40), each chip centre-cropped exactly as ``CenterCrop(40)``
  crops it (top = (H - 40) // 2, left = (W - 40) // 2);
* ``metadata.npz``: ``patch_ids`` (N,) str; ``datetime`` (N, 6) int16, the acquisition year,
  month, day, hour, minute, second; ``legacy_hour`` (N,) int8, the hour the published loader
  reads (see :func:`utils.data_utils.parse_patch_timestamp`); ``latlon`` (N, 2) float64, the
  chip centre's latitude and longitude in degrees; ``labels43`` (N, 43) uint8 multi-hot;
  ``has_labels`` (N,) bool, False for a patch packed without a label file (its ``labels43``
  row is zeros);
* ``info.json``: format name and version, source CSV and root, band names, count.

Raw values are stored (not encodings) so that ``legacy_hour`` and 19 or 43 classes are chosen
when loading. :class:`PackedBigEarthNetDataset` returns exactly the items of
:class:`datasets.bigearthnet.BigEarthNetDatasetLS`, except that ``transform`` receives the
already-cropped (7, 40, 40) chip: with
``Compose([ToFloat(), CenterCrop(40), ZScoreNormalize(...)])`` both give identical tensors.

Every chip is validated as the raw loader validates it (uint16, 7 bands, 40 to
``--max-chip-size`` pixels a side): a bad tile stops the packing naming the patch, or, with
``--skip-invalid``, is left out with the patches whose image is missing (one warning listing
them). Patches without a label file are packed for unsupervised use (pretraining,
reconstruction, unsupervised embeddings); a supervised reader refuses them, or leaves them out
with ``skip_invalid``.

Writing is atomic: everything goes to a temporary folder next to ``DIR`` that replaces ``DIR``
only when complete (an existing ``DIR`` must be empty or a previous packed folder). One packer
at a time may write ``DIR`` (a lock next to it; a second one exits 2), and the temporary
folders of killed packers are removed when the next one starts.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from rasterio.crs import CRS
from torch.utils.data import Dataset
from tqdm import tqdm

from datasets.bigearthnet import (MAX_CHIP_SIZE, BigEarthNetDatasetLS, Item, PathLike,
                                  Transform, centres_to_latlon, check_num_classes, read_chip,
                                  read_label_indices)
from transformation.transformer import CenterCrop
from utils.config import check_range
from utils.data_config import BigEarthNetInfo
from utils.data_utils import normalize_latlon, normalize_timestamp, parse_patch_timestamp
from utils.errors import UserInputError, run_cli
from utils.files import FolderLock, check_output_dir, make_temp_dir, remove_stale_temporaries

FORMAT = "bigearthnet-l-packed"
FORMAT_VERSION = 2  # 2 added has_labels; version 1 folders (all patches labelled) still load
READABLE_VERSIONS = (1, 2)
CROP_SIZE = 40
NUM_BANDS = len(BigEarthNetInfo.BAND_NAMES)
IMAGES_FILE = "images.npy"
METADATA_FILE = "metadata.npz"
INFO_FILE = "info.json"
METADATA_ARRAYS = ("patch_ids", "datetime", "legacy_hour", "latlon", "labels43")
EXAMPLES_SHOWN = 5

# (pixels (7, 40, 40) uint16, CRS as WKT, centre x, y, 43-class indices or None) or an error
PatchResult = Tuple[Optional[Tuple[np.ndarray, str, float, float, Optional[List[int]]]],
                    Optional[str]]


# ----------------------------------------------------------------------------- writing


def _read_patch(job: Tuple[str, Path, Optional[Path], int, bool]) -> PatchResult:
    """One patch, or (None, message) for a bad one when ``skip_invalid``."""
    patch, image_path, label_path, max_chip_size, skip_invalid = job
    try:
        pixels, (crs, x, y) = read_chip(patch, image_path, True, CROP_SIZE, max_chip_size)
        cropped = CenterCrop(CROP_SIZE)(torch.from_numpy(pixels)).numpy()
        labels = read_label_indices(patch, label_path) if label_path is not None else None
    except UserInputError as exc:
        if not skip_invalid:
            raise
        return None, str(exc)
    return (cropped, crs.to_wkt(), x, y, labels), None


def _check_destination(out_dir: Path) -> None:
    """``out_dir`` may be replaced only if absent, empty, or a previous packed folder."""
    check_output_dir(out_dir, "--out")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    try:
        info = json.loads((out_dir / INFO_FILE).read_text(encoding="utf-8"))
        is_packed = info.get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        is_packed = False
    if not is_packed:
        raise UserInputError(f"--out {out_dir}: refusing to replace a non-empty folder that is "
                             f"not a packed BEN-L folder")


def _replace_directory(new_dir: Path, out_dir: Path) -> None:
    """Move the complete ``new_dir`` to ``out_dir``, replacing what is there."""
    if not out_dir.exists():
        os.replace(new_dir, out_dir)
        return
    trash = make_temp_dir(out_dir.parent, out_dir.name)  # removed at the next start if killed
    os.replace(out_dir, trash / out_dir.name)
    os.replace(new_dir, out_dir)
    shutil.rmtree(trash)


def _latlon_by_crs(crs_wkts: Sequence[str], crs_rows: np.ndarray,
                   centres: np.ndarray) -> np.ndarray:
    """(N, 2) latitude, longitude in degrees of the (N, 2) centres, whose CRS is
    ``crs_wkts[crs_rows[i]]``: one reprojection per CRS."""
    latlon = np.zeros((len(centres), 2), dtype=np.float64)
    for index, wkt in enumerate(crs_wkts):
        rows = np.flatnonzero(crs_rows == index)
        lats, lons = centres_to_latlon(CRS.from_wkt(wkt), centres[rows, 0], centres[rows, 1])
        latlon[rows, 0] = lats
        latlon[rows, 1] = lons
    return latlon


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:EXAMPLES_SHOWN])
    return shown + (", ..." if len(names) > EXAMPLES_SHOWN else "")


def pack_split(csv_file: PathLike, root_dir: PathLike, out_dir: PathLike,
               skip_invalid: bool = False, workers: int = 1, progress: bool = True,
               max_chip_size: int = MAX_CHIP_SIZE) -> Path:
    """Convert a BEN-L split (CSV + root with images/ and labels/) to a packed folder; returns it.

    Patches with a missing image file, or an image that is unreadable or not a valid chip,
    raise UserInputError (nothing is written), or are left out with one warning when
    ``skip_invalid``. Patches without a label file are packed with ``has_labels`` False.
    ``workers`` > 1 reads the GeoTIFFs in that many processes.
    """
    check_range("--workers", workers, 1, 1024)
    check_range("--max-chip-size", max_chip_size, CROP_SIZE, None)
    out_dir = Path(out_dir)
    _check_destination(out_dir)
    source = BigEarthNetDatasetLS(csv_file, root_dir, skip_invalid=skip_invalid)
    with FolderLock(out_dir.parent, f".{out_dir.name}.lock", what="--out"):
        stale = remove_stale_temporaries(out_dir.parent, [out_dir.name])
        if stale and progress:
            print(f"removed {len(stale)} temporary folder(s) that an interrupted packer left "
                  f"in {out_dir.parent}")
        return _pack(source, Path(csv_file), Path(root_dir), out_dir, skip_invalid, workers,
                     progress, max_chip_size)


def _pack(source: BigEarthNetDatasetLS, csv_file: Path, root_dir: Path, out_dir: Path,
          skip_invalid: bool, workers: int, progress: bool, max_chip_size: int) -> Path:
    listed = source.patch_ids
    label_files = set(os.listdir(source.labels_dir)) if source.labels_dir.is_dir() else set()
    jobs = [(patch, source.image_path(patch),
             source.label_path(patch) if source.label_path(patch).name in label_files else None,
             max_chip_size, skip_invalid) for patch in listed]

    tmp_dir = make_temp_dir(out_dir.parent, out_dir.name)
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        images = np.lib.format.open_memmap(tmp_dir / IMAGES_FILE, mode="w+", dtype=np.uint16,
                                           shape=(len(listed), NUM_BANDS, CROP_SIZE, CROP_SIZE))
        labels43 = np.zeros((len(listed), len(BigEarthNetInfo.CLASSES[43])), dtype=np.uint8)
        has_labels = np.zeros(len(listed), dtype=bool)
        centres = np.zeros((len(listed), 2), dtype=np.float64)
        crs_index: Dict[str, int] = {}  # each distinct CRS (WKT) once, not once per patch
        crs_rows = np.zeros(len(listed), dtype=np.int32)
        patches, skipped = [], []
        results = pool.imap(_read_patch, jobs, chunksize=32) if pool else map(_read_patch, jobs)
        for patch, (result, problem) in zip(listed, tqdm(
                results, total=len(listed), desc=f"packing {csv_file.name}", unit="patch",
                disable=not (progress and sys.stderr.isatty()))):  # logs get the summary
            if result is None:
                skipped.append((patch, problem))
                continue
            row = len(patches)
            pixels, crs_wkt, x, y, indices = result
            images[row] = pixels
            if indices is not None:
                labels43[row, indices] = 1
                has_labels[row] = True
            centres[row] = (x, y)
            crs_rows[row] = crs_index.setdefault(crs_wkt, len(crs_index))
            patches.append(patch)
        count = len(patches)
        if count == 0:
            raise UserInputError(f"{csv_file}: none of its {len(listed)} patches is a valid "
                                 f"chip ({skipped[0][1]})")
        images.flush()
        del images
        if skipped:
            warnings.warn(f"{csv_file}: left out {len(skipped)} of {len(listed)} patches whose "
                          f"image is not a valid chip (first: {skipped[0][1]}): "
                          f"{_listing([patch for patch, _ in skipped])}", stacklevel=3)
            _truncate_images(tmp_dir / IMAGES_FILE, count)
        unlabelled = [patch for patch, labelled in zip(patches, has_labels) if not labelled]
        if unlabelled and progress:
            print(f"note: {len(unlabelled)} of {count} patches have no label file and are "
                  f"packed for unsupervised use only: {_listing(unlabelled)}")

        datetimes = [parse_patch_timestamp(patch) for patch in patches]
        np.savez(tmp_dir / METADATA_FILE,
                 patch_ids=np.array(patches, dtype=np.str_),
                 datetime=np.array([(d.year, d.month, d.day, d.hour, d.minute, d.second)
                                    for d in datetimes], dtype=np.int16).reshape(count, 6),
                 legacy_hour=np.array([parse_patch_timestamp(patch, legacy_hour=True).hour
                                       for patch in patches], dtype=np.int8),
                 latlon=_latlon_by_crs(list(crs_index), crs_rows[:count], centres[:count]),
                 labels43=labels43[:count], has_labels=has_labels[:count])
        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "source_csv": str(csv_file.resolve()),
            "source_root": str(root_dir.resolve()),
            "band_names": BigEarthNetInfo.BAND_NAMES,
            "crop_size": CROP_SIZE,
            "count": count,
            "unlabelled": len(unlabelled),
        }
        (tmp_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _replace_directory(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
    return out_dir


def _truncate_images(path: Path, count: int) -> None:
    """Rewrite the .npy header for the first ``count`` rows and drop the rest of the file."""
    images = np.load(path, mmap_mode="r")
    shape, header_size = (count, *images.shape[1:]), images.offset
    del images
    with open(path, "r+b") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<u2", "fortran_order": False,
                                                 "shape": shape})
        if f.tell() != header_size:  # cannot happen: the header is padded to the same size
            raise RuntimeError(f"{path}: header size changed")
        f.truncate(header_size + int(np.prod(shape)) * 2)


# ----------------------------------------------------------------------------- reading


def _labels_19(labels43: np.ndarray) -> np.ndarray:
    """(N, 43) multi-hot -> (N, 19) multi-hot through ``BigEarthNetInfo.MATCH_LABELS``."""
    mapping = np.zeros((43, 19), dtype=np.int32)
    for index_43, index_19 in BigEarthNetInfo.MATCH_LABELS.items():
        mapping[index_43, index_19] = 1
    return (labels43.astype(np.int32) @ mapping > 0).astype(np.uint8)


class PackedBigEarthNetDataset(Dataset):
    """A packed BEN-L folder (see the module docstring), with the items of ``BigEarthNetDatasetLS``.

    ``transform`` receives (7, 40, 40) uint16 chips. The memory map is opened on first access in
    each process (and not pickled), so DataLoader workers each map the file themselves.
    The metadata encodings and targets are computed once here, (N, 4, 2) float32 and (N, C) int64.

    Patches packed without a label file: unsupervised readers see them like any other; a
    ``supervised`` reader refuses them (naming them), leaves them out with ``skip_invalid``,
    or gives them all-zero targets with ``allow_unlabelled`` (see ``BigEarthNetDatasetLS``).
    """

    def __init__(self, packed_dir: PathLike, transform: Optional[Transform] = None,
                 supervised: bool = False, num_classes: int = 19, legacy_hour: bool = False,
                 skip_invalid: bool = False, allow_unlabelled: bool = False):
        check_num_classes(num_classes)
        self.packed_dir = Path(packed_dir)
        self.transform = transform
        self.supervised = supervised
        self.num_classes = num_classes
        self.legacy_hour = legacy_hour

        self.info = self._read_info()
        count = self.info["count"]
        metadata = self._read_metadata(count)
        self._check_images(count)
        patch_ids: List[str] = metadata["patch_ids"].tolist()
        self.unlabelled = {patch for patch, labelled in zip(patch_ids, metadata["has_labels"])
                           if not labelled} if supervised and allow_unlabelled else set()
        # rows of the packed arrays that this dataset's items are (all, unless some are left out)
        self._rows = self._kept_rows(patch_ids, metadata["has_labels"], skip_invalid,
                                     allow_unlabelled)
        self.patch_ids = [patch_ids[row] for row in self._rows]
        self._metadata = self._encode_metadata(patch_ids, metadata["datetime"],
                                               metadata["legacy_hour"],
                                               metadata["latlon"])[self._rows]
        labels = metadata["labels43"] if num_classes == 43 else _labels_19(metadata["labels43"])
        self._targets = labels.astype(np.int64)[self._rows]
        self._images: Optional[np.ndarray] = None

    def _kept_rows(self, patch_ids: List[str], has_labels: np.ndarray, skip_invalid: bool,
                   allow_unlabelled: bool) -> np.ndarray:
        if not self.supervised or allow_unlabelled or has_labels.all():
            return np.arange(len(patch_ids))
        missing = [patch for patch, labelled in zip(patch_ids, has_labels) if not labelled]
        if not skip_invalid:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise UserInputError(f"{self.packed_dir}: patch {missing[0]}{more} has no labels "
                                 f"(packed without a label file), which supervised use needs "
                                 f"(pass skip_invalid=True to skip such patches)")
        if len(missing) == len(patch_ids):
            raise UserInputError(f"{self.packed_dir}: none of its {len(patch_ids)} patches has "
                                 f"labels")
        warnings.warn(f"{self.packed_dir}: skipped {len(missing)} of {len(patch_ids)} patches "
                      f"without labels: {_listing(missing)}", stacklevel=3)
        return np.flatnonzero(has_labels)

    def _fail(self, problem: str) -> UserInputError:
        return UserInputError(f"{self.packed_dir}: {problem} (recreate it with "
                              f"python -m datasets.pack)")

    def _read_info(self) -> dict:
        if not self.packed_dir.is_dir():
            raise UserInputError(f"{self.packed_dir}: packed BEN-L folder does not exist")
        for name in (INFO_FILE, IMAGES_FILE, METADATA_FILE):
            if not (self.packed_dir / name).is_file():
                raise self._fail(f"not a complete packed BEN-L folder, {name} is missing")
        try:
            info = json.loads((self.packed_dir / INFO_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise self._fail(f"{INFO_FILE} is unreadable ({exc})") from None
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise self._fail(f"{INFO_FILE} does not describe a {FORMAT} folder")
        if info.get("format_version") not in READABLE_VERSIONS:
            raise self._fail(f"format version {info.get('format_version')!r}, this code reads "
                             f"versions {', '.join(map(str, READABLE_VERSIONS))}")
        if not isinstance(info.get("count"), int) or info["count"] < 1:
            raise self._fail(f"{INFO_FILE} has no valid 'count'")
        return info

    def _read_metadata(self, count: int) -> dict:
        names = METADATA_ARRAYS + (("has_labels",) if self.info["format_version"] >= 2 else ())
        try:
            with np.load(self.packed_dir / METADATA_FILE, allow_pickle=False) as npz:
                metadata = {name: npz[name] for name in names}
        except (OSError, ValueError, KeyError) as exc:
            raise self._fail(f"{METADATA_FILE} is unreadable or incomplete ({exc})") from None
        metadata.setdefault("has_labels", np.ones(count, dtype=bool))  # version 1: all labelled
        expected = {"patch_ids": (count,), "datetime": (count, 6), "legacy_hour": (count,),
                    "latlon": (count, 2), "labels43": (count, 43), "has_labels": (count,)}
        for name, shape in expected.items():
            if metadata[name].shape != shape:
                raise self._fail(f"{METADATA_FILE}: {name} has shape {metadata[name].shape}, "
                                 f"expected {shape}")
        return metadata

    def _open_images(self) -> np.ndarray:
        """The (N, 7, 40, 40) uint16 memory map, as a plain ndarray (faster to index)."""
        try:
            images = np.load(self.packed_dir / IMAGES_FILE, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise self._fail(f"{IMAGES_FILE} is unreadable ({exc})") from None
        return np.asarray(images)

    def _check_images(self, count: int) -> None:
        images = self._open_images()
        expected = (count, NUM_BANDS, CROP_SIZE, CROP_SIZE)
        if images.shape != expected or images.dtype != np.uint16:
            raise self._fail(f"{IMAGES_FILE} is {images.dtype} {images.shape}, "
                             f"expected uint16 {expected}")

    def _encode_metadata(self, patch_ids: List[str], datetimes: np.ndarray,
                         legacy_hours: np.ndarray, latlon: np.ndarray) -> np.ndarray:
        """(N, 4, 2) float32: the (sin, cos) of week, hour, latitude, longitude per patch."""
        rows = []
        for patch, (year, month, day, hour, _, _), legacy, (lat, lon) in zip(
                patch_ids, datetimes.tolist(), legacy_hours.tolist(), latlon.tolist()):
            try:
                when = datetime(year, month, day, legacy if self.legacy_hour else hour)
            except ValueError as exc:
                raise self._fail(f"{METADATA_FILE}: patch {patch} has an invalid date "
                                 f"{year}-{month}-{day} {hour}h ({exc})") from None
            if not (np.isfinite(lat) and np.isfinite(lon)):
                raise self._fail(f"{METADATA_FILE}: patch {patch} has a non-finite position "
                                 f"({lat}, {lon})")
            rows.append(normalize_timestamp(when) + normalize_latlon(lat, lon))
        return np.array(rows, dtype=np.float32).reshape(-1, 4, 2)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_images"] = None  # each process maps the file itself
        return state

    def __len__(self) -> int:
        return len(self.patch_ids)

    def __getitem__(self, index: int) -> Item:
        if self._images is None:
            self._images = self._open_images()
        # Copies, so that no item holds on to the shared arrays (numpy is faster than torch here).
        img = torch.from_numpy(self._images[self._rows[index]].copy())
        if self.transform is not None:
            img = self.transform(img)
        if self.supervised:
            target = torch.from_numpy(self._targets[index].copy())
        else:
            target = torch.empty(0)
        week, hour, lat, lon = torch.from_numpy(self._metadata[index].copy()).unbind(0)
        return img, target, week, hour, lat, lon


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Pack a BEN-L split into a memory-mapped folder.")
    parser.add_argument("--csv", required=True, help="split CSV (patch names)")
    parser.add_argument("--root", required=True, help="BEN-L root with images/ and labels/")
    parser.add_argument("--out", required=True, help="output folder (created or replaced)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="leave out patches whose image is missing or not a valid chip "
                             "(one warning); patches without a label file are packed anyway")
    parser.add_argument("--workers", type=int, default=1, help="reading processes (default 1)")
    parser.add_argument("--max-chip-size", type=int, default=MAX_CHIP_SIZE,
                        help=f"larger chips are errors, not cropped (default {MAX_CHIP_SIZE})")
    args = parser.parse_args(argv)
    out_dir = pack_split(args.csv, args.root, args.out, skip_invalid=args.skip_invalid,
                         workers=args.workers, max_chip_size=args.max_chip_size)
    print(f"packed {len(PackedBigEarthNetDataset(out_dir))} patches into {out_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
