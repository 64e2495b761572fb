"""Packed BEN-L: a split converted once into a memory-mapped array, read ~100x faster than GeoTIFFs.

    python -m datasets.pack --csv SPLIT.csv --root ROOT --out DIR [--skip-invalid] [--workers N]

``DIR`` then holds:

* ``images.npy``: uint16 (N, 7, 40, 40), each chip centre-cropped exactly as ``CenterCrop(40)``
  crops it (top = (H - 40) // 2, left = (W - 40) // 2);
* ``metadata.npz``: ``patch_ids`` (N,) str; ``datetime`` (N, 6) int16, the acquisition year,
  month, day, hour, minute, second; ``legacy_hour`` (N,) int8, the hour the published loader
  reads (see :func:`utils.data_utils.parse_patch_timestamp`); ``latlon`` (N, 2) float64, the
  chip centre's latitude and longitude in degrees; ``labels43`` (N, 43) uint8 multi-hot;
* ``info.json``: format name and version, source CSV and root, band names, count.

Raw values are stored (not encodings) so that ``legacy_hour`` and 19 or 43 classes are chosen
when loading. :class:`PackedBigEarthNetDataset` returns exactly the items of
:class:`datasets.bigearthnet.BigEarthNetDatasetLS`, except that ``transform`` receives the
already-cropped (7, 40, 40) chip: with
``Compose([ToFloat(), CenterCrop(40), ZScoreNormalize(...)])`` both give identical tensors.

Writing is atomic: everything goes to a temporary folder next to ``DIR`` that replaces ``DIR``
only when complete (an existing ``DIR`` must be empty or a previous packed folder).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from rasterio.crs import CRS
from torch.utils.data import Dataset
from tqdm import tqdm

from datasets.bigearthnet import (BigEarthNetDatasetLS, Item, PathLike, Transform,
                                  centres_to_latlon, check_num_classes, read_chip,
                                  read_label_indices)
from transformation.transformer import CenterCrop
from utils.data_config import BigEarthNetInfo
from utils.data_utils import normalize_latlon, normalize_timestamp, parse_patch_timestamp
from utils.errors import UserInputError, run_cli

FORMAT = "bigearthnet-l-packed"
FORMAT_VERSION = 1
CROP_SIZE = 40
NUM_BANDS = len(BigEarthNetInfo.BAND_NAMES)
IMAGES_FILE = "images.npy"
METADATA_FILE = "metadata.npz"
INFO_FILE = "info.json"
METADATA_ARRAYS = ("patch_ids", "datetime", "legacy_hour", "latlon", "labels43")


# ----------------------------------------------------------------------------- writing


def _read_patch(job: Tuple[str, Path, Path]) -> Tuple[np.ndarray, str, float, float, List[int]]:
    """One patch: cropped pixels (7, 40, 40) uint16, CRS as WKT, centre x, y, 43-class indices."""
    patch, image_path, label_path = job
    pixels, (crs, x, y) = read_chip(patch, image_path)
    height, width = pixels.shape[1:]
    if height < CROP_SIZE or width < CROP_SIZE:
        raise UserInputError(f"patch {patch}: image {image_path} is {height}x{width} pixels, "
                             f"smaller than the {CROP_SIZE}x{CROP_SIZE} crop")
    cropped = CenterCrop(CROP_SIZE)(torch.from_numpy(pixels)).numpy()
    return cropped, crs.to_wkt(), x, y, read_label_indices(patch, label_path)


def _check_destination(out_dir: Path) -> None:
    """``out_dir`` may be replaced only if absent, empty, or a previous packed folder."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserInputError(f"--out {out_dir}: exists and is not a folder")
    if not any(out_dir.iterdir()):
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
    trash = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
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


def pack_split(csv_file: PathLike, root_dir: PathLike, out_dir: PathLike,
               skip_invalid: bool = False, workers: int = 1, progress: bool = True) -> Path:
    """Convert a BEN-L split (CSV + root with images/ and labels/) to a packed folder; returns it.

    Patches with a missing image or label file raise UserInputError, or are skipped with one
    warning when ``skip_invalid``; an unreadable image always raises (nothing is written).
    ``workers`` > 1 reads the GeoTIFFs in that many processes.
    """
    if workers < 1:
        raise UserInputError(f"--workers must be at least 1, got {workers}")
    out_dir = Path(out_dir)
    _check_destination(out_dir)
    source = BigEarthNetDatasetLS(csv_file, root_dir, skip_invalid=skip_invalid)
    patches = source.patch_ids
    count = len(patches)
    datetimes = [parse_patch_timestamp(patch) for patch in patches]
    legacy_hours = [parse_patch_timestamp(patch, legacy_hour=True).hour for patch in patches]
    jobs = [(patch, source.image_path(patch), source.label_path(patch)) for patch in patches]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_dir, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        images = np.lib.format.open_memmap(tmp_dir / IMAGES_FILE, mode="w+", dtype=np.uint16,
                                           shape=(count, NUM_BANDS, CROP_SIZE, CROP_SIZE))
        labels43 = np.zeros((count, len(BigEarthNetInfo.CLASSES[43])), dtype=np.uint8)
        centres = np.zeros((count, 2), dtype=np.float64)
        crs_index: Dict[str, int] = {}  # each distinct CRS (WKT) once, not once per patch
        crs_rows = np.zeros(count, dtype=np.int32)
        results = pool.imap(_read_patch, jobs, chunksize=32) if pool else map(_read_patch, jobs)
        for row, (pixels, crs_wkt, x, y, indices) in enumerate(
                tqdm(results, total=count, desc=f"packing {Path(csv_file).name}", unit="patch",
                     disable=not progress)):
            images[row] = pixels
            labels43[row, indices] = 1
            centres[row] = (x, y)
            crs_rows[row] = crs_index.setdefault(crs_wkt, len(crs_index))
        images.flush()
        del images

        np.savez(tmp_dir / METADATA_FILE,
                 patch_ids=np.array(patches, dtype=np.str_),
                 datetime=np.array([(d.year, d.month, d.day, d.hour, d.minute, d.second)
                                    for d in datetimes], dtype=np.int16).reshape(count, 6),
                 legacy_hour=np.array(legacy_hours, dtype=np.int8),
                 latlon=_latlon_by_crs(list(crs_index), crs_rows, centres),
                 labels43=labels43)
        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "source_csv": str(Path(csv_file).resolve()),
            "source_root": str(Path(root_dir).resolve()),
            "band_names": BigEarthNetInfo.BAND_NAMES,
            "crop_size": CROP_SIZE,
            "count": count,
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
    """

    def __init__(self, packed_dir: PathLike, transform: Optional[Transform] = None,
                 supervised: bool = False, num_classes: int = 19, legacy_hour: bool = False):
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
        self.patch_ids: List[str] = metadata["patch_ids"].tolist()
        self._metadata = self._encode_metadata(metadata["datetime"], metadata["legacy_hour"],
                                               metadata["latlon"])
        labels = metadata["labels43"] if num_classes == 43 else _labels_19(metadata["labels43"])
        self._targets = labels.astype(np.int64)
        self._images: Optional[np.ndarray] = None

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
        if info.get("format_version") != FORMAT_VERSION:
            raise self._fail(f"format version {info.get('format_version')!r}, this code reads "
                             f"version {FORMAT_VERSION}")
        if not isinstance(info.get("count"), int) or info["count"] < 1:
            raise self._fail(f"{INFO_FILE} has no valid 'count'")
        return info

    def _read_metadata(self, count: int) -> dict:
        try:
            with np.load(self.packed_dir / METADATA_FILE, allow_pickle=False) as npz:
                metadata = {name: npz[name] for name in METADATA_ARRAYS}
        except (OSError, ValueError, KeyError) as exc:
            raise self._fail(f"{METADATA_FILE} is unreadable or incomplete ({exc})") from None
        expected = {"patch_ids": (count,), "datetime": (count, 6), "legacy_hour": (count,),
                    "latlon": (count, 2), "labels43": (count, 43)}
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

    def _encode_metadata(self, datetimes: np.ndarray, legacy_hours: np.ndarray,
                         latlon: np.ndarray) -> np.ndarray:
        """(N, 4, 2) float32: the (sin, cos) of week, hour, latitude, longitude per patch."""
        rows = []
        for (year, month, day, hour, _, _), legacy, (lat, lon) in zip(datetimes.tolist(),
                                                                      legacy_hours.tolist(),
                                                                      latlon.tolist()):
            when = datetime(year, month, day, legacy if self.legacy_hour else hour)
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
        img = torch.from_numpy(self._images[index].copy())
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
                        help="skip patches whose image or label file is missing (one warning)")
    parser.add_argument("--workers", type=int, default=1, help="reading processes (default 1)")
    args = parser.parse_args(argv)
    out_dir = pack_split(args.csv, args.root, args.out, skip_invalid=args.skip_invalid,
                         workers=args.workers)
    print(f"packed {len(PackedBigEarthNetDataset(out_dir))} patches into {out_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
