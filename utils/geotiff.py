"""Writing map rasters: tiled, compressed GeoTIFFs with overviews, written block by block and
atomically.

:func:`write_geotiff` takes the raster as an iterator of row blocks (so no more than one block
is ever held), writes them into a temporary file next to the destination (DEFLATE, tiles of
``BLOCK`` pixels, BigTIFF when needed), adds band descriptions, tags, a colour table, nodata and
overviews (factors 2, 4, ... down to about one tile), then moves it into place: a run stopped
midway leaves no half-written map. GDAL's block cache is capped (``GDAL_CACHEMAX_MB``) so that
memory does not follow the raster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from utils.files import atomic_path

BLOCK = 256               # tile size; rows are best written in blocks of this height
GDAL_CACHEMAX_MB = 64
ColourTable = Dict[int, Tuple[int, int, int, int]]


def overview_factors(height: int, width: int, smallest: int = BLOCK) -> list:
    """2, 4, 8, ... while the overview is still larger than ``smallest`` pixels a side."""
    factors, factor = [], 2
    while max(height, width) / factor >= smallest / 2 and factor <= 1024:
        factors.append(factor)
        factor *= 2
    return factors or [2]


def write_geotiff(path, blocks: Iterable[Tuple[int, np.ndarray]], *, count: int, height: int,
                  width: int, dtype: str, crs, transform, nodata,
                  band_names: Sequence[str], tags: Optional[dict] = None,
                  colour_table: Optional[ColourTable] = None,
                  resampling: Resampling = Resampling.average) -> None:
    """Write ``blocks``, ``(first_row, array (count, rows, width))`` pairs covering the raster,
    to the GeoTIFF ``path`` (see the module docstring). ``resampling``: of the overviews
    (``nearest`` for class maps)."""
    predictor = 3 if np.issubdtype(np.dtype(dtype), np.floating) else 2
    profile = dict(driver="GTiff", count=count, height=height, width=width, dtype=dtype,
                   crs=crs, transform=transform, nodata=nodata, tiled=True, blockxsize=BLOCK,
                   blockysize=BLOCK, compress="deflate", predictor=predictor, BIGTIFF="IF_SAFER",
                   interleave="pixel" if count <= 4 else "band")
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHEMAX_MB), atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            written = 0
            for first_row, block in blocks:
                rows = block.shape[1]
                dst.write(block.astype(dtype, copy=False), window=Window(0, first_row, width, rows))
                written += rows
            if written != height:
                raise RuntimeError(f"{path}: wrote {written} of {height} rows")
            for band, name in enumerate(band_names, start=1):
                dst.set_band_description(band, name)
            if tags:
                dst.update_tags(**{key: str(value) for key, value in tags.items()})
            if colour_table is not None:
                dst.write_colormap(1, colour_table)
            dst.build_overviews(overview_factors(height, width), resampling)
            dst.update_tags(ns="rio_overview", resampling=resampling.name)

