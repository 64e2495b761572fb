"""A Landsat 8/9 Collection 2 Level-2 scene, read window by window.

Two layouts are accepted (``open_scene(path)``):

* a folder holding the scene as USGS delivers it: one file per band, ``*_SR_B1.TIF`` ...
  ``*_SR_B7.TIF`` (exactly one of each), plus ``*_QA_PIXEL.TIF`` and ``*_MTL.txt`` or
  ``*_MTL.json`` when present;
* a single GeoTIFF with the 7 bands SR_B1..SR_B7 in that order (a ``*_MTL.txt``/``.json``
  beside it, sharing its name up to ``_SR``/``.tif``, or any one in its folder, is read too).

Every file is checked when the scene is opened: one band per band file, 7 bands in a stacked
file, uint16 digital numbers, and the same CRS, transform and size as the first band (a mismatch
is an error naming the file and what differs). The acquisition time comes from the MTL
(``DATE_ACQUIRED`` and ``SCENE_CENTER_TIME``, UTC); without an MTL it is None and the caller
decides (a config key, or an error when the model needs metadata).

Pixels are never read whole: :meth:`LandsatScene.read` reads one window of the 7 bands (and
:meth:`LandsatScene.read_qa` of the QA band), so memory follows the window, not the scene.

QA_PIXEL bits used here (Landsat C2 L2 QA_PIXEL): 0 fill, 1 dilated cloud, 2 cirrus, 3 cloud,
4 cloud shadow, 5 snow.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window

from utils.data_config import BigEarthNetInfo
from utils.data_utils import GDAL_READ_OPTIONS, error_text
from utils.errors import UserInputError

SR_BANDS = tuple(BigEarthNetInfo.BAND_NAMES)  # SR_B1 .. SR_B7
SCENE_DTYPE = "uint16"
QA_BITS = {"fill": 0, "dilated_cloud": 1, "cirrus": 2, "cloud": 3, "cloud_shadow": 4, "snow": 5}
DEFAULT_QA_FLAGS = ("fill", "dilated_cloud", "cloud", "cloud_shadow")
_TIF = re.compile(r"\.tiff?$", re.IGNORECASE)


def qa_mask(flags: Sequence[str]) -> int:
    """The QA_PIXEL bit mask of flag names (see ``QA_BITS``); an unknown name is an error."""
    unknown = [name for name in flags if name not in QA_BITS]
    if unknown:
        raise UserInputError(f"unknown QA flag(s) {', '.join(unknown)}; known: "
                             f"{', '.join(QA_BITS)}")
    return sum(1 << QA_BITS[name] for name in set(flags))


@dataclass
class LandsatScene:
    """An opened scene: georeferencing of the grid, the files, the acquisition time.

    band_files: 7 paths (per-band layout) or one path (stacked layout); qa_file and mtl_file
    are None when absent; acquired: the UTC acquisition time from the MTL, or None.
    """

    source: Path
    band_files: List[Path]
    qa_file: Optional[Path]
    mtl_file: Optional[Path]
    crs: object
    transform: object
    height: int
    width: int
    acquired: Optional[datetime]
    _datasets: list = field(default_factory=list, repr=False)

    def read(self, row: int, col: int, height: int, width: int) -> np.ndarray:
        """(7, height, width) uint16 digital numbers of the window at (row, col)."""
        window = Window(col, row, width, height)
        try:
            if len(self.band_files) == 1:
                return self._open()[0].read(window=window)
            return np.stack([src.read(1, window=window) for src in self._open()[:len(SR_BANDS)]])
        except RasterioError as exc:
            raise UserInputError(f"{self.source}: cannot read the window at row {row}, col "
                                 f"{col}: {error_text(exc)}") from None

    def read_decimated(self, height: int, width: int) -> np.ndarray:
        """(7, height, width) uint16: the whole scene resampled (nearest) to a small size, for
        quicklooks; GDAL streams the file, memory follows the output."""
        datasets = self._open()
        if len(self.band_files) == 1:
            return datasets[0].read(out_shape=(len(SR_BANDS), height, width))
        return np.stack([src.read(1, out_shape=(height, width))
                         for src in datasets[:len(SR_BANDS)]])

    def read_qa(self, row: int, col: int, height: int, width: int) -> Optional[np.ndarray]:
        """(height, width) uint16 QA_PIXEL of the window, or None without a QA file."""
        if self.qa_file is None:
            return None
        try:
            return self._open()[-1].read(1, window=Window(col, row, width, height))
        except RasterioError as exc:
            raise UserInputError(f"{self.qa_file}: cannot read the window at row {row}, col "
                                 f"{col}: {error_text(exc)}") from None

    def _open(self) -> list:
        """The band datasets (and the QA dataset last), opened once per process."""
        if not self._datasets:
            with rasterio.Env(**GDAL_READ_OPTIONS):
                self._datasets = [rasterio.open(path) for path in self.band_files]
                if self.qa_file is not None:
                    self._datasets.append(rasterio.open(self.qa_file))
        return self._datasets

    def close(self) -> None:
        for dataset in self._datasets:
            dataset.close()
        self._datasets = []

    def __getstate__(self):  # open datasets do not travel to other processes
        return {**self.__dict__, "_datasets": []}


def open_scene(path) -> LandsatScene:
    """Find, check and describe the scene's files (see the module docstring); reads no pixels."""
    path = Path(path)
    if path.is_dir():
        band_files = [_one_file(path, f"*_{band}") for band in SR_BANDS]
        qa_file = _optional_file(path, "*_QA_PIXEL")
        mtl_file = _mtl_file(path, "*")
    elif path.is_file():
        band_files, qa_file = [path], None
        stem = re.sub(r"_SR(_B\d)?$", "", _TIF.sub("", path.name))
        mtl_file = _mtl_file(path.parent, stem) or _mtl_file(path.parent, "*")
    else:
        raise UserInputError(f"scene not found: {path} (a folder of *_SR_B1..B7.TIF files or a "
                             f"7-band GeoTIFF)")

    profiles = {file: _profile(file) for file in band_files + ([qa_file] if qa_file else [])}
    expected_count = len(SR_BANDS) if len(band_files) == 1 else 1
    for file in band_files:
        count = profiles[file]["count"]
        if count != expected_count:
            what = ("a stacked scene needs the 7 bands SR_B1..SR_B7" if expected_count > 1
                    else "a band file holds one band")
            raise UserInputError(f"{file} has {count} bands; {what}")
    for file, profile in profiles.items():
        bad = sorted(set(profile["dtypes"]) - {SCENE_DTYPE})
        if bad:
            raise UserInputError(f"{file} is {', '.join(bad)}, expected {SCENE_DTYPE} (Landsat C2 "
                                 f"L2 digital numbers)")
    reference_file = band_files[0]
    reference = profiles[reference_file]
    if reference["crs"] is None:
        raise UserInputError(f"{reference_file} has no CRS")
    for file, profile in profiles.items():
        for key, what in (("crs", "CRS"), ("transform", "transform"), ("shape", "size")):
            if profile[key] != reference[key]:
                raise UserInputError(f"{file}: {what} {_show(profile[key])} differs from "
                                     f"{reference_file.name}'s {_show(reference[key])}; the "
                                     f"scene's files must share one grid")
    height, width = reference["shape"]
    acquired = read_mtl_time(mtl_file) if mtl_file else None
    return LandsatScene(path, band_files, qa_file, mtl_file, reference["crs"],
                        reference["transform"], height, width, acquired)


def _files(folder: Path, pattern: str, suffixes: Sequence[str]) -> List[Path]:
    return sorted(p for p in folder.glob(pattern + ".*")
                  if p.is_file() and p.suffix.lower() in suffixes)


def _one_file(folder: Path, pattern: str) -> Path:
    found = _files(folder, pattern, (".tif", ".tiff"))
    if not found:
        raise UserInputError(f"{folder}: no {pattern}.TIF band file (a Landsat C2 L2 scene has "
                             f"{', '.join(SR_BANDS)})")
    if len(found) > 1:
        raise UserInputError(f"{folder}: {len(found)} files match {pattern}.TIF "
                             f"({', '.join(p.name for p in found[:3])}); keep one scene per folder")
    return found[0]


def _optional_file(folder: Path, pattern: str) -> Optional[Path]:
    return _one_file(folder, pattern) if _files(folder, pattern, (".tif", ".tiff")) else None


def _mtl_file(folder: Path, stem: str) -> Optional[Path]:
    found = _files(folder, f"{stem}_MTL", (".txt", ".json"))
    if len(found) > 1 and len({p.stem for p in found}) > 1:
        raise UserInputError(f"{folder}: {len(found)} MTL files ({', '.join(p.name for p in found)});"
                             f" keep one scene per folder")
    return found[0] if found else None


def _profile(file: Path) -> Dict:
    try:
        with rasterio.Env(**GDAL_READ_OPTIONS), rasterio.open(file) as src:
            return {"count": src.count, "dtypes": src.dtypes, "crs": src.crs,
                    "transform": src.transform, "shape": (src.height, src.width)}
    except RasterioError as exc:
        raise UserInputError(f"{file}: not a readable GeoTIFF ({error_text(exc)})") from None


def _show(value) -> str:
    if hasattr(value, "to_string"):
        return value.to_string()
    if isinstance(value, tuple) and len(value) == 2:
        return f"{value[0]}x{value[1]}"
    return " ".join(str(tuple(value)[:6]).split())


# ------------------------------------------------------------------------------- MTL


def read_mtl_time(path: Path) -> datetime:
    """UTC acquisition time from an MTL file (``DATE_ACQUIRED`` + ``SCENE_CENTER_TIME``; the
    time is 00:00:00 when the file has only the date)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{path}: cannot read the MTL file ({exc})") from None
    if path.suffix.lower() == ".json":
        try:
            values = _json_values(json.loads(text))
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{path}: not valid JSON ({exc})") from None
    else:
        values = dict(re.findall(r'^\s*([A-Z0-9_]+)\s*=\s*"?([^"\n]*?)"?\s*$', text, re.MULTILINE))
    date = values.get("DATE_ACQUIRED")
    if not date:
        raise UserInputError(f"{path}: no DATE_ACQUIRED (the acquisition date)")
    clock = (values.get("SCENE_CENTER_TIME") or "00:00:00").rstrip("Z")
    try:
        day = datetime.strptime(date.strip(), "%Y-%m-%d")
        hours, minutes, seconds = clock.split(":")
        return day.replace(hour=int(hours), minute=int(minutes), second=int(float(seconds)),
                           tzinfo=timezone.utc)
    except ValueError:
        raise UserInputError(f"{path}: cannot read DATE_ACQUIRED {date!r} / SCENE_CENTER_TIME "
                             f"{clock!r} (expected YYYY-MM-DD and HH:MM:SS.sssZ)") from None


def _json_values(node, found=None) -> Dict[str, str]:
    """Every string value of a nested JSON MTL (``LANDSAT_METADATA_FILE`` -> groups), by key."""
    found = {} if found is None else found
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, (dict, list)):
                _json_values(value, found)
            else:
                found.setdefault(key, str(value))
    elif isinstance(node, list):
        for value in node:
            _json_values(value, found)
    return found
