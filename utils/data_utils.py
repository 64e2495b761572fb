"""Helpers shared by the datasets and scripts: metadata encodings, patch-name timestamps,
un-normalising images and RGB figures.

Metadata encodings (what the model's four metadata tokens receive, each a (sin, cos) pair):

* week: ISO week number * 2pi / 52; hour: hour of the day * 2pi / 24;
* latitude and longitude: the angle in radians.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import yaml
from matplotlib.figure import Figure

from utils.checkpoint import load_model  # noqa: F401  (the published helper's name and place)
from utils.data_config import BigEarthNetInfo
from utils.errors import UserInputError
from utils.files import atomic_path

SinCos = Tuple[float, float]

# <YYYYMMDD>T<HHMMSS>, where the time may have lost its leading zero (T94030 = 09:40:30).
_PATCH_TIMESTAMP = re.compile(r"^(\d{8})T(\d{5,6})$", re.ASCII)

RGB_BANDS = ("SR_B4", "SR_B3", "SR_B2")  # red, green, blue

# GDAL config for reading chips: on each open GDAL otherwise lists the file's whole folder
# looking for sidecar files, which dominates the read when a folder holds 270k chips.
GDAL_READ_OPTIONS = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}


def normalize_timestamp(dt: datetime) -> Tuple[SinCos, SinCos]:
    """((sin, cos) of ISO week * 2pi/52, (sin, cos) of hour * 2pi/24), as Python floats."""
    week = dt.isocalendar()[1] * 2 * math.pi / 52
    hour = dt.hour * 2 * math.pi / 24
    return (math.sin(week), math.cos(week)), (math.sin(hour), math.cos(hour))


def normalize_latlon(lat: float, lon: float) -> Tuple[SinCos, SinCos]:
    """((sin, cos) of the latitude, (sin, cos) of the longitude); both given in degrees."""
    lat_rad = math.radians(lat)
    lon_rad = math.radians(lon)
    return (math.sin(lat_rad), math.cos(lat_rad)), (math.sin(lon_rad), math.cos(lon_rad))


def parse_patch_timestamp(name: str, legacy_hour: bool = False) -> datetime:
    """Acquisition time in a BEN-L patch name ``<mission>_<product>_<YYYYMMDDTHHMMSS>_<row>_<col>``.

    The time field has 6 digits, or 5 when the hour lost its leading zero
    (``20180525T94030`` is 09:40:30).

    ``legacy_hour=True`` reproduces the published loader exactly: it parses only the first 10
    characters of the field with ``%Y%m%dT%H``, so the hour is the first digit of the time
    (10:10:31 -> 1, 09:33:51 -> 0, and 9 for the 5-digit ``T94030``); minutes and seconds are 0.
    The published checkpoints were trained on that encoding.
    """
    parts = name.split("_")
    match = _PATCH_TIMESTAMP.match(parts[2]) if len(parts) >= 3 else None
    if match is None:
        raise UserInputError(
            f"patch name {name!r}: expected <mission>_<product>_<YYYYMMDDTHHMMSS>_<row>_<col>"
        )
    try:
        if legacy_hour:
            return datetime.strptime(parts[2][0:10], "%Y%m%dT%H")
        date, time = match.group(1), match.group(2).zfill(6)
        return datetime(int(date[0:4]), int(date[4:6]), int(date[6:8]),
                        int(time[0:2]), int(time[2:4]), int(time[4:6]))
    except ValueError as exc:
        raise UserInputError(f"patch name {name!r}: invalid date or time ({exc})") from None


def error_text(exc: BaseException) -> str:
    """One line: an exception's message and its cause's (rasterio puts GDAL's reason there)."""
    text = str(exc)
    if exc.__cause__ is not None:
        text += f" ({exc.__cause__})"
    return " ".join(text.split())


def unnormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo a per-band z-score: ``x * std + mean`` for x of shape (C, H, W) or (B, C, H, W)."""
    if x.dim() not in (3, 4):
        raise UserInputError(f"unnormalize: expected a (C, H, W) or (B, C, H, W) tensor, got shape "
                             f"{tuple(x.shape)}")
    channels = x.shape[-3]
    if len(mean) != channels or len(std) != channels:
        raise UserInputError(f"unnormalize: {channels} bands but {len(mean)} means and "
                             f"{len(std)} stds")
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x * std_t + mean_t


def rgb_bands(img: Union[torch.Tensor, np.ndarray],
              band_names: Sequence[str] = BigEarthNetInfo.BAND_NAMES) -> np.ndarray:
    """Red, green and blue (SR_B4, SR_B3, SR_B2) of a (C, H, W) image, as (H, W, 3) float64."""
    array = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if array.ndim != 3 or array.shape[0] != len(band_names):
        raise UserInputError(f"expected a ({len(band_names)}, H, W) image, got shape {array.shape}")
    indices = [list(band_names).index(band) for band in RGB_BANDS]
    return np.moveaxis(array[indices].astype(np.float64), 0, -1)


def stretch_limits(rgb: np.ndarray, low: float = 2.0, high: float = 98.0) -> Tuple[float, float]:
    """The low and high percentiles over all three bands of an (H, W, 3) image."""
    lo, hi = np.percentile(rgb, [low, high])
    return float(lo), float(max(hi, lo + 1e-12))


def stretch(rgb: np.ndarray, limits: Tuple[float, float]) -> np.ndarray:
    """Map ``limits`` to [0, 1] and clip. One stretch for the three bands keeps colours true."""
    lo, hi = limits
    return np.clip((rgb - lo) / (hi - lo), 0.0, 1.0)


def save_figure(fig: Figure, path: Union[str, Path]) -> None:
    """Write ``fig`` as a PNG atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def show_side_by_side(img1: Union[torch.Tensor, np.ndarray], img2: Union[torch.Tensor, np.ndarray],
                      path: Optional[Union[str, Path]], title1: str = "Original",
                      title2: str = "Reconstruction") -> Figure:
    """Two (7, H, W) images as RGB (SR_B4, SR_B3, SR_B2) next to each other, saved as a PNG.

    Both panels use the 2-98 percentile stretch of ``img1`` so that their brightness compares.
    The figure is a plain ``matplotlib.figure.Figure`` (Agg canvas, never registered with pyplot),
    so it needs no display and there is nothing to close: it is freed once unreferenced.
    ``path=None`` only returns the figure.
    """
    rgb1, rgb2 = rgb_bands(img1), rgb_bands(img2)
    limits = stretch_limits(rgb1)
    fig = Figure(figsize=(6, 3.2))
    for position, rgb, title in ((1, rgb1, title1), (2, rgb2, title2)):
        ax = fig.add_subplot(1, 2, position)
        ax.imshow(stretch(rgb, limits), interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    if path is not None:
        save_figure(fig, path)
    return fig


# ----------------------------------------------------------- published helper names


def load_config(path: Union[str, Path]) -> dict:
    """The published helper: a YAML file as a dict, without validation (the scripts validate
    their configs with :func:`utils.config.load_config` and a schema)."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)
