"""Tiled inference over a Landsat scene: chips, their metadata, embeddings and probe scores.

The chip grid (:class:`ChipGrid`): chip (r, c) is the ``chip x chip`` window whose top-left
pixel is (r * stride, c * stride); the output rasters have one pixel per chip, and their
transform (:meth:`ChipGrid.output_transform`) puts the centre of output pixel (r, c) on the
centre of chip (r, c). With stride 40 the output pixels tile the scene; with stride 20 they are
half a chip apart and the chips overlap.

Each chip is read as it would be for training: the 7 digital-number bands, z-scored with the
dataset statistics (:mod:`transformation.transformer`); its metadata is the encoding the
datasets use (:mod:`utils.data_utils`): ISO week and hour of the acquisition time, latitude
and longitude of the chip's centre (the scene's CRS reprojected to EPSG:4326 with rasterio,
one PROJ transformation per row band). With the published hour encoding (``legacy_hour``) the
hour is read from a BEN-L-style name of the time exactly as the published loader did.

A chip is skipped (its output pixels get nodata) when more than ``max_invalid_share`` of its
pixels are fill (0 in any band) or carry a QA_PIXEL flag of ``qa_mask``.

Memory: :func:`map_rows` reads one row band of chips at a time (``rows_per_band`` chip rows,
the full scene width), embeds its valid chips in batches and yields the band's rows; nothing
holds the scene. Under torchrun every process maps whole row bands (:func:`shard_rows`), so the
batches, and hence the results, do not depend on the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from rasterio.transform import Affine
from rasterio.transform import xy as rasterio_xy

from datasets.bigearthnet import centres_to_latlon
from datasets.landsat_scene import LandsatScene
from transformation.transformer import ZScoreNormalize
from utils.data_config import BigEarthNetInfo, EuroSATInfo
from utils.data_utils import normalize_latlon, normalize_timestamp, parse_patch_timestamp
from utils.errors import UserInputError

NORMALIZATIONS = {"bigearthnet": BigEarthNetInfo.STATISTICS, "eurosat": EuroSATInfo.STATISTICS}
MAPPED, SKIPPED_FILL, SKIPPED_QA = 0, 1, 2  # chip status codes


@dataclass(frozen=True)
class ChipGrid:
    """Chips of ``chip`` pixels every ``stride`` pixels over a ``height`` x ``width`` scene
    (only whole chips: the last row and column of pixels that do not fill a chip are left)."""

    height: int
    width: int
    chip: int
    stride: int

    @property
    def rows(self) -> int:
        return max(0, (self.height - self.chip) // self.stride + 1)

    @property
    def cols(self) -> int:
        return max(0, (self.width - self.chip) // self.stride + 1)

    def output_transform(self, scene_transform: Affine) -> Affine:
        """Scene transform -> output transform: output pixel (r, c) centred on chip (r, c)."""
        offset = (self.chip - self.stride) / 2
        return scene_transform @ Affine.translation(offset, offset) @ Affine.scale(self.stride)

    def centres(self, rows: range) -> Tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (row, col), each (len(rows), cols), of the chip centres."""
        half = self.chip / 2
        centre_rows = np.asarray(rows, dtype=np.float64) * self.stride + half
        centre_cols = np.arange(self.cols, dtype=np.float64) * self.stride + half
        return np.meshgrid(centre_rows, centre_cols, indexing="ij")


@dataclass(frozen=True)
class ChipSettings:
    """How chips become model inputs (must match the probe's training embeddings)."""

    pooling: str = "cls"
    normed: bool = False
    use_metadata: bool = True
    normalization: str = "bigearthnet"
    legacy_hour: bool = False
    acquired: Optional[datetime] = None  # UTC; required with use_metadata
    max_invalid_share: float = 0.0
    qa_mask: int = 0
    batch_size: int = 256
    rows_per_band: int = 4


def chip_latlon(scene: LandsatScene, grid: ChipGrid, rows: range) -> Tuple[np.ndarray, np.ndarray]:
    """Latitude and longitude (degrees), each (len(rows), cols), of the chip centres."""
    pixel_rows, pixel_cols = grid.centres(rows)
    xs, ys = rasterio_xy(scene.transform, pixel_rows.ravel(), pixel_cols.ravel(), offset="ul")
    lats, lons = centres_to_latlon(scene.crs, xs, ys)
    return (np.asarray(lats).reshape(pixel_rows.shape), np.asarray(lons).reshape(pixel_rows.shape))


def time_encoding(acquired: datetime, legacy_hour: bool) -> Tuple[np.ndarray, np.ndarray]:
    """(week (2,), hour (2,)) float32 (sin, cos) encodings of the acquisition time, as the
    BEN-L loader computes them from a patch name holding that time."""
    name = f"LC08_L2SP_{acquired:%Y%m%dT%H%M%S}_0_0"
    week, hour = normalize_timestamp(parse_patch_timestamp(name, legacy_hour))
    return np.asarray(week, np.float32), np.asarray(hour, np.float32)


def shard_rows(grid: ChipGrid, rows_per_band: int, rank: int, world_size: int) -> range:
    """The chip rows of process ``rank``: a contiguous run of whole row bands."""
    bands = -(-grid.rows // rows_per_band)
    first, last = bands * rank // world_size, bands * (rank + 1) // world_size
    return range(min(first * rows_per_band, grid.rows), min(last * rows_per_band, grid.rows))


def read_band(scene: LandsatScene, grid: ChipGrid, rows: range
              ) -> Tuple[np.ndarray, Optional[np.ndarray], int]:
    """The pixels of chip rows ``rows``: (7, H, W) digital numbers, (H, W) QA_PIXEL or None,
    and the pixel step between chip rows in them. Chips that overlap or touch (stride <= chip)
    are read as one window (step = stride); farther apart, each chip row's strip is read
    alone and the strips stacked (step = chip), so the rows between them are never read."""
    width = (grid.cols - 1) * grid.stride + grid.chip
    if grid.stride <= grid.chip:
        top, height = rows.start * grid.stride, (len(rows) - 1) * grid.stride + grid.chip
        return scene.read(top, 0, height, width), scene.read_qa(top, 0, height, width), \
            grid.stride
    strips = [(scene.read(r * grid.stride, 0, grid.chip, width),
               scene.read_qa(r * grid.stride, 0, grid.chip, width)) for r in rows]
    qa = None if strips[0][1] is None else np.concatenate([q for _, q in strips])
    return np.concatenate([p for p, _ in strips], axis=1), qa, grid.chip


def chip_status(pixels: np.ndarray, qa: Optional[np.ndarray], grid: ChipGrid, row_step: int,
                settings: ChipSettings) -> np.ndarray:
    """(band rows, cols) status codes of the chips of a row band.

    pixels: (7, H, W) the band's digital numbers; qa: (H, W) QA_PIXEL or None; row_step:
    pixels between chip rows (see :func:`read_band`).
    """
    fill = (pixels == 0).any(axis=0)
    flagged = fill if qa is None else fill | ((qa & settings.qa_mask) != 0)

    def share(mask: np.ndarray) -> np.ndarray:
        windows = sliding_window_view(mask, (grid.chip, grid.chip))[::row_step, ::grid.stride]
        return windows.mean(axis=(-2, -1))[:, :grid.cols]

    status = np.full(share(flagged).shape, MAPPED, np.uint8)
    status[share(flagged) > settings.max_invalid_share] = SKIPPED_QA
    status[share(fill) > settings.max_invalid_share] = SKIPPED_FILL
    return status


@dataclass
class RowBand:
    """Results of one row band: ``rows`` (chip rows), ``status`` (n, cols) codes,
    ``embeddings`` (n, cols, D) float32 (NaN where skipped), ``scores`` (n, cols, K) float32
    probe probabilities (NaN where skipped) or None without a probe."""

    rows: range
    status: np.ndarray
    embeddings: np.ndarray
    scores: Optional[np.ndarray]


@torch.inference_mode()
def map_rows(encoder, scene: LandsatScene, grid: ChipGrid, rows: range, settings: ChipSettings,
             embed_dim: int, device: torch.device, probe=None, num_scores: int = 0,
             autocast_dtype: Optional[torch.dtype] = None) -> Iterator[RowBand]:
    """Embed (and score with ``probe``, a fitted probe whose ``predict_proba`` gives
    ``num_scores`` columns) every chip of ``rows``, one row band at a time; see the module
    docstring. Non-finite embeddings are an error naming the chips."""
    stats = NORMALIZATIONS[settings.normalization]
    normalize = ZScoreNormalize(stats["mean"], stats["std"])
    week = hour = None
    if settings.use_metadata:
        week, hour = (torch.from_numpy(v) for v in time_encoding(settings.acquired,
                                                                 settings.legacy_hour))
    for start in range(rows.start, rows.stop, settings.rows_per_band):
        band_rows = range(start, min(start + settings.rows_per_band, rows.stop))
        pixels, qa, row_step = read_band(scene, grid, band_rows)
        status = chip_status(pixels, qa, grid, row_step, settings)
        chip_r, chip_c = np.nonzero(status == MAPPED)
        embeddings = np.full((len(band_rows), grid.cols, embed_dim), np.nan, np.float32)
        scores = None if probe is None else \
            np.full((len(band_rows), grid.cols, num_scores), np.nan, np.float32)
        if len(chip_r):
            windows = sliding_window_view(pixels, (grid.chip, grid.chip), axis=(1, 2))
            chips = windows[:, chip_r * row_step, chip_c * grid.stride]  # (7, n, chip, chip)
            images = normalize(torch.from_numpy(
                np.ascontiguousarray(chips.transpose(1, 0, 2, 3), dtype=np.float32)))
            metas = [None] * 4
            if settings.use_metadata:
                lats, lons = chip_latlon(scene, grid, band_rows)
                latlon = np.asarray([normalize_latlon(lat, lon) for lat, lon in
                                     zip(lats[chip_r, chip_c], lons[chip_r, chip_c])], np.float32)
                metas = [week.expand(len(chip_r), 2), hour.expand(len(chip_r), 2),
                         torch.from_numpy(latlon[:, 0]), torch.from_numpy(latlon[:, 1])]
            vectors = embed_batches(encoder, images, metas, settings, device, autocast_dtype)
            bad = ~np.isfinite(vectors).all(axis=1)
            if bad.any():
                where = ", ".join(f"({start + r}, {c})" for r, c in
                                  zip(chip_r[bad][:5], chip_c[bad][:5]))
                raise UserInputError(f"{scene.source}: non-finite embeddings (NaN or inf) for "
                                     f"{int(bad.sum())} chip(s) at (row, col) {where}; check "
                                     f"the checkpoint")
            embeddings[chip_r, chip_c] = vectors
            if probe is not None:
                scores[chip_r, chip_c] = probe.predict_proba(vectors)
        yield RowBand(band_rows, status, embeddings, scores)


def embed_batches(encoder, images: torch.Tensor, metas: list, settings: ChipSettings,
                  device: torch.device, autocast_dtype: Optional[torch.dtype]) -> np.ndarray:
    """(n, 7, chip, chip) normalised chips and (n, 2) metadata (or None) -> (n, D) float32."""
    rows = []
    for start in range(0, len(images), settings.batch_size):
        part = slice(start, start + settings.batch_size)
        batch_metas = [None if m is None else m[part].to(device) for m in metas]
        with torch.autocast(device.type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            vectors = encoder.embed(images[part].to(device), *batch_metas,
                                    pooling=settings.pooling, normed=settings.normed)
        rows.append(vectors.float().cpu().numpy())
    return np.concatenate(rows)
