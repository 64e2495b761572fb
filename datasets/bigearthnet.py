"""BigEarthNet-Landsat (BEN-L) read from its GeoTIFF chips, with geo-temporal metadata.

Layout of ``root_dir``::

    images/<patch>.tif                    7 bands (SR_B1..SR_B7), uint16, UTM CRS, about 41..45 px a side
    labels/<patch>_labels_metadata.json   BigEarthNet-S2 v1 label file (43-class names in "labels")

Label files are read only for supervised items: pretraining, reconstruction and unsupervised
embeddings need the image alone (the real data has patches without a label file).

Every image is checked where it is read, and a bad one is an error naming the patch and the
file: the data type must be uint16 (the digital numbers BEN-L publishes; a float, uint8 or
int16 tile is a different product, and uint16 cannot hold NaN or inf), 7 bands, and at least
``chip_size`` (the model's input, 40) and at most ``max_chip_size`` (64) pixels a side: a
300x300 tile is not a BEN-L chip, and silently cropping its centre would hide that.

Each item is ``(img, target, meta_week, meta_hour, meta_lat, meta_lon)`` as in the published
loader:

* ``img``: the chip as read, (7, H, W) uint16, then passed through ``transform`` (the model's
  pipeline is ``Compose([ToFloat(), CenterCrop(40), ZScoreNormalize(mean, std)])``);
* ``target``: multi-hot long tensor over 19 or 43 classes when ``supervised``, else an empty
  float32 tensor (the published ``torch.tensor([])``);
* ``meta_*``: float32 (2,) tensors, the (sin, cos) encodings of :mod:`utils.data_utils`: ISO
  week and hour of the acquisition time in the patch name, latitude and longitude of the chip's
  centre (the middle of its bounds, reprojected from the chip's CRS to EPSG:4326).

The hour: the published loader read only the first digit of the hour (see
:func:`utils.data_utils.parse_patch_timestamp`); ``legacy_hour=True`` reproduces it, for
evaluating the published checkpoints. The default is the correct hour.

Speed: one ``rasterio.open`` per item reads the pixels and, on a patch's first visit, its bounds
and CRS. The metadata encodings live in one (N, 4, 2) float32 array: week and hour are computed
from the names at construction (which also rejects malformed names early); a patch's latitude
and longitude are filled in on its first visit, so later epochs neither read the CRS nor
reproject (keep DataLoader workers alive with ``persistent_workers=True`` so that their copies
survive between epochs). ``rasterio.warp.transform`` builds a PROJ transformation on each call,
so it is called once per patch, never per item. Files are opened with
``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR``: otherwise GDAL lists the whole ``images/`` folder
(270k files for the full training split) on every open, looking for sidecar files.
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import rasterio
import torch
from matplotlib.figure import Figure
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.warp import transform as warp_transform
from torch.utils.data import Dataset

from utils.data_config import BigEarthNetInfo
from utils.data_utils import (GDAL_READ_OPTIONS, error_text, normalize_latlon, normalize_timestamp,
                              parse_patch_timestamp, rgb_bands, save_figure, stretch,
                              stretch_limits)
from utils.errors import UserInputError

PathLike = Union[str, os.PathLike]
Transform = Callable[[torch.Tensor], torch.Tensor]
Item = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

NUM_BANDS = len(BigEarthNetInfo.BAND_NAMES)
CHIP_DTYPE = "uint16"
CHIP_SIZE = 40      # the model's input: smaller chips cannot be centre-cropped to it
MAX_CHIP_SIZE = 64  # published chips are 41..52 px a side; larger ones are not BEN-L chips
CLASS_INDEX_43 = {name: index for index, name in enumerate(BigEarthNetInfo.CLASSES[43])}
WGS84 = CRS.from_epsg(4326)

# <mission>_<product>_<YYYYMMDDTHHMMSS>_<row>_<col>; the time may have 5 digits.
PATCH_NAME = re.compile(r"^[A-Za-z0-9]+_[A-Za-z0-9]+_\d{8}T\d{5,6}_\d+_\d+$", re.ASCII)


def read_split_csv(csv_file: PathLike, image_names: Optional[set] = None) -> List[str]:
    """Patch names from a BEN-L split CSV: the first field of each non-blank row.

    The CSV has one column (patch) or two (``S2 name,S1 name``) and may start with a header.
    Header rule: the first row is a header when its first field is neither shaped like a patch
    name (``<mission>_<product>_<YYYYMMDDTHHMMSS>_<row>_<col>``) nor the name of an image in
    ``image_names`` (file names such as ``X.tif``). So ``0`` (the real ``samples.csv``) and
    ``patch_id`` are headers, and the first patch of a header-less CSV is kept.
    """
    csv_file = Path(csv_file)
    try:
        with open(csv_file, newline="", encoding="utf-8-sig") as f:  # tolerate a BOM
            rows = [(line_number, [field.strip() for field in row])
                    for line_number, row in enumerate(csv.reader(f), start=1)]
    except OSError as exc:
        raise UserInputError(f"{csv_file}: cannot read split CSV ({exc.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserInputError(f"{csv_file}: not a text CSV ({exc})") from None

    rows = [(line_number, row) for line_number, row in rows if any(row)]
    for line_number, row in rows:
        if len(row) > 2:
            raise UserInputError(f"{csv_file} line {line_number}: expected 1 or 2 columns "
                                 f"(patch name[, S1 name]), got {len(row)}")
        if not row[0]:
            raise UserInputError(f"{csv_file} line {line_number}: empty patch name")
    if rows:
        first = rows[0][1][0]
        is_patch = PATCH_NAME.match(first) or (image_names is not None
                                               and f"{first}.tif" in image_names)
        if not is_patch:
            rows = rows[1:]
    if not rows:
        raise UserInputError(f"{csv_file}: no patch names (the split CSV is empty)")
    first_line: Dict[str, int] = {}
    for line_number, row in rows:
        seen = first_line.setdefault(row[0], line_number)
        if seen != line_number:  # it would be counted twice in every epoch and metric
            raise UserInputError(f"{csv_file}: patch {row[0]} is listed twice (lines {seen} and "
                                 f"{line_number}); a split lists each patch once")
    return [row[0] for _, row in rows]


def check_chip(patch: str, image_path: Path, dtypes: Sequence[str], count: int, height: int,
               width: int, chip_size: int = CHIP_SIZE,
               max_chip_size: int = MAX_CHIP_SIZE) -> None:
    """A BEN-L chip's data type, band count and size (see the module docstring)."""
    where = f"patch {patch}: image {image_path}"
    if count != NUM_BANDS:
        raise UserInputError(f"{where} has {count} bands, expected {NUM_BANDS} "
                             f"({', '.join(BigEarthNetInfo.BAND_NAMES)})")
    bad_types = sorted(set(dtypes) - {CHIP_DTYPE})
    if bad_types:
        raise UserInputError(f"{where} is {', '.join(bad_types)}, expected {CHIP_DTYPE} (the "
                             f"digital numbers BEN-L publishes)")
    if min(height, width) < chip_size:
        raise UserInputError(f"{where} is {height}x{width} pixels, smaller than the "
                             f"{chip_size}x{chip_size} model input")
    if max(height, width) > max_chip_size:
        raise UserInputError(f"{where} is {height}x{width} pixels, larger than "
                             f"max_chip_size {max_chip_size} (BEN-L chips are about 41..45 px a side; "
                             f"raise max_chip_size to centre-crop larger tiles)")


def read_chip(patch: str, image_path: Path, with_centre: bool = True,
              chip_size: int = CHIP_SIZE, max_chip_size: int = MAX_CHIP_SIZE
              ) -> Tuple[np.ndarray, Optional[Tuple[CRS, float, float]]]:
    """Pixels (7, H, W) uint16 and, if ``with_centre``, (CRS, x, y) of the chip's centre.

    One open of the file. Unreadable or truncated files and chips that :func:`check_chip`
    refuses raise UserInputError naming the patch and the file.
    """
    try:
        with rasterio.Env(**GDAL_READ_OPTIONS), rasterio.open(image_path) as src:
            check_chip(patch, image_path, src.dtypes, src.count, src.height, src.width,
                       chip_size, max_chip_size)
            pixels = src.read()
            centre = None
            if with_centre:
                if src.crs is None:
                    raise UserInputError(f"patch {patch}: image {image_path} has no CRS")
                bounds = src.bounds
                x, y = (bounds.left + bounds.right) / 2, (bounds.bottom + bounds.top) / 2
                centre = (src.crs, x, y)
    except RasterioError as exc:
        raise UserInputError(f"patch {patch}: cannot read image {image_path}: "
                             f"{error_text(exc)}") from None
    return pixels, centre


def centres_to_latlon(crs: CRS, xs: Sequence[float], ys: Sequence[float]
                      ) -> Tuple[List[float], List[float]]:
    """Latitudes and longitudes (degrees) of points in ``crs``: one PROJ transformation for all."""
    lons, lats = warp_transform(crs, WGS84, list(xs), list(ys))
    return list(lats), list(lons)


def read_label_names(patch: str, label_path: Path) -> List[str]:
    """The 43-class names in a label file's ``labels`` list."""
    try:
        with open(label_path, encoding="utf-8") as f:
            labels = json.load(f)["labels"]
    except OSError as exc:
        raise UserInputError(f"patch {patch}: cannot read label file {label_path} "
                             f"({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"patch {patch}: label file {label_path} is not valid JSON "
                             f"({exc})") from None
    except (KeyError, TypeError):
        raise UserInputError(f"patch {patch}: label file {label_path} has no 'labels' "
                             f"list") from None
    if not isinstance(labels, list):
        raise UserInputError(f"patch {patch}: label file {label_path}: 'labels' is not a list")
    return labels


def read_label_indices(patch: str, label_path: Path) -> List[int]:
    """Indices in ``BigEarthNetInfo.CLASSES[43]`` of a label file's classes."""
    indices = []
    for name in read_label_names(patch, label_path):
        if name not in CLASS_INDEX_43:
            raise UserInputError(f"patch {patch}: label file {label_path}: unknown class {name!r}")
        indices.append(CLASS_INDEX_43[name])
    return indices


def to_19_classes(indices_43: Sequence[int]) -> List[int]:
    """19-class indices of 43-class indices; classes without a 19-class counterpart are dropped."""
    mapping = BigEarthNetInfo.MATCH_LABELS
    return sorted({mapping[i] for i in indices_43 if i in mapping})


def check_num_classes(num_classes: int) -> None:
    if num_classes not in (19, 43):
        raise UserInputError(f"num_classes must be 19 or 43, got {num_classes}")


class BigEarthNetDatasetLS(Dataset):
    """BEN-L split from GeoTIFFs; see the module docstring for the item format.

    Args:
        csv_file: split CSV (patch names; header row or none; one or two columns).
        root_dir: folder with ``images/`` and ``labels/``.
        transform: applied to the (7, H, W) uint16 tensor.
        supervised: return multi-hot targets (else an empty tensor); only then is a label
            file needed.
        num_classes: 19 (mapped with ``BigEarthNetInfo.MATCH_LABELS``) or 43.
        legacy_hour: reproduce the published hour encoding (first digit of the hour only).
        skip_invalid: drop patches whose image file (or, when ``supervised``, label file) is
            missing, with one warning, instead of raising. Checked at construction from the
            folder listings; an image that exists but is unreadable or not a valid chip is
            always an error when its item is loaded (it needs fixing, and dropping items in the
            middle of an epoch would change the epoch and break exact resumption).
        chip_size, max_chip_size: the accepted chip sizes (module docstring).
        allow_unlabelled: with ``supervised``, a patch without a label file gets an all-zero
            target instead of being an error (for statistics per class, which such a chip
            joins no class of; never for training or evaluating a probe). Its ids are in
            ``unlabelled``.
    """

    def __init__(self, csv_file: PathLike, root_dir: PathLike,
                 transform: Optional[Transform] = None, supervised: bool = False,
                 num_classes: int = 19, legacy_hour: bool = False, skip_invalid: bool = False,
                 chip_size: int = CHIP_SIZE, max_chip_size: int = MAX_CHIP_SIZE,
                 allow_unlabelled: bool = False):
        check_num_classes(num_classes)
        if chip_size > max_chip_size:
            raise UserInputError(f"max_chip_size {max_chip_size} is smaller than the chip size "
                                 f"{chip_size}")
        self.chip_size, self.max_chip_size = chip_size, max_chip_size
        self.csv_file = Path(csv_file)
        self.root_dir = Path(root_dir)
        self.images_dir = self.root_dir / "images"
        self.labels_dir = self.root_dir / "labels"
        self.transform = transform
        self.supervised = supervised
        self.num_classes = num_classes
        self.legacy_hour = legacy_hour

        image_names = self._list_folder(self.images_dir)
        label_names = self._list_folder(self.labels_dir) if supervised else set()
        names = read_split_csv(self.csv_file, image_names)
        self.unlabelled: set = set()
        if supervised and allow_unlabelled:
            self.unlabelled = {name for name in names
                               if f"{name}_labels_metadata.json" not in label_names}
        self.patch_ids = self._valid_patches(names, image_names, label_names, skip_invalid)
        self._metadata = np.zeros((len(self.patch_ids), 4, 2), dtype=np.float32)
        self._metadata[:, :2] = self._encode_times()
        self._has_position = np.zeros(len(self.patch_ids), dtype=bool)
        self._label_cache: Dict[str, List[int]] = {}

    @staticmethod
    def _list_folder(folder: Path) -> set:
        try:
            return set(os.listdir(folder))
        except OSError as exc:
            raise UserInputError(f"{folder}: cannot list the folder ({exc.strerror}); root_dir "
                                 f"must contain images/ and labels/") from None

    def _valid_patches(self, names: List[str], image_names: set, label_names: set,
                       skip_invalid: bool) -> List[str]:
        problems = []  # (patch, description)
        for name in names:
            if f"{name}.tif" not in image_names:
                problems.append((name, f"image file {self.image_path(name)} does not exist"))
            elif (self.supervised and name not in self.unlabelled
                  and f"{name}_labels_metadata.json" not in label_names):
                problems.append((name, f"label file {self.label_path(name)} does not exist"))
        if not problems:
            return names
        if not skip_invalid:
            name, description = problems[0]
            more = f"; {len(problems) - 1} more invalid patches" if len(problems) > 1 else ""
            raise UserInputError(f"{self.csv_file}: patch {name}: {description}{more} "
                                 f"(pass skip_invalid=True to skip such patches)")
        invalid = {name for name, _ in problems}
        kept = [name for name in names if name not in invalid]
        needed = "an image and a label file" if self.supervised else "an image file"
        if not kept:
            raise UserInputError(f"{self.csv_file}: none of its {len(names)} patches has "
                                 f"{needed} under {self.root_dir}")
        examples = ", ".join(name for name, _ in problems[:5])
        examples += ", ..." if len(problems) > 5 else ""
        warnings.warn(f"{self.csv_file}: skipped {len(problems)} of {len(names)} patches "
                      f"without {needed}: {examples}", stacklevel=3)
        return kept

    def _encode_times(self) -> List[Tuple[Tuple[float, float], Tuple[float, float]]]:
        """(week, hour) (sin, cos) pairs of every patch, from its name."""
        try:
            return [normalize_timestamp(parse_patch_timestamp(patch, self.legacy_hour))
                    for patch in self.patch_ids]
        except UserInputError as exc:
            raise UserInputError(f"{self.csv_file}: {exc}") from None

    def image_path(self, patch: str) -> Path:
        return self.images_dir / f"{patch}.tif"

    def label_path(self, patch: str) -> Path:
        return self.labels_dir / f"{patch}_labels_metadata.json"

    def __len__(self) -> int:
        return len(self.patch_ids)

    def __getitem__(self, index: int) -> Item:
        patch = self.patch_ids[index]
        has_position = self._has_position[index]
        pixels, centre = read_chip(patch, self.image_path(patch), not has_position,
                                   self.chip_size, self.max_chip_size)
        if not has_position:
            crs, x, y = centre
            lats, lons = centres_to_latlon(crs, [x], [y])
            self._metadata[index, 2:] = normalize_latlon(lats[0], lons[0])
            self._has_position[index] = True

        img = torch.from_numpy(pixels)
        if self.transform is not None:
            img = self.transform(img)
        # without supervision, an empty tensor like the published torch.tensor([])
        target = self.target(patch) if self.supervised else torch.empty(0)
        week, hour, lat, lon = torch.from_numpy(self._metadata[index].copy()).unbind(0)
        return img, target, week, hour, lat, lon

    def target(self, patch: str) -> torch.Tensor:
        """Multi-hot long tensor (num_classes,) of a patch's labels."""
        indices = self._label_cache.get(patch)
        if indices is None and patch in self.unlabelled:
            indices = []
        elif indices is None:
            indices = read_label_indices(patch, self.label_path(patch))
            if self.num_classes == 19:
                indices = to_19_classes(indices)
            self._label_cache[patch] = indices
        target = torch.zeros(self.num_classes, dtype=torch.long)
        target[indices] = 1
        return target

    def plot(self, index: int, path: Optional[PathLike] = None) -> Figure:
        """The chip as RGB (SR_B4, SR_B3, SR_B2, 2-98 percentile stretch) with its 43-class
        labels; saved as a PNG when ``path`` is given."""
        patch = self.patch_ids[index]
        pixels, _ = read_chip(patch, self.image_path(patch), False, self.chip_size,
                              self.max_chip_size)
        rgb = rgb_bands(pixels)
        label_path = self.label_path(patch)
        labels = read_label_names(patch, label_path) if label_path.is_file() \
            else ["(no label file)"]
        fig = Figure(figsize=(4.5, 5.2))
        ax = fig.add_subplot(1, 1, 1)
        ax.imshow(stretch(rgb, stretch_limits(rgb)), interpolation="nearest")
        ax.set_title(patch, fontsize=8)
        ax.axis("off")
        ax.text(0.0, -0.03, "\n".join(labels) or "(no labels)", transform=ax.transAxes,
                va="top", ha="left", fontsize=8)
        if path is not None:
            save_figure(fig, path)
        return fig
