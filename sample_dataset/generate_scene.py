"""A seeded synthetic Landsat 8 C2 L2 scene, for the scene-mapping tests, benchmark and demo.

    python -m sample_dataset.generate_scene --out DIR [--height 2400 --width 2400 --seed 0]
        [--layout bands|stack] [--region-size 480]

Like a real scene, the raster is a north-up UTM grid (EPSG:32633, 30 m pixels on the Landsat
grid) in which the imaged path/row footprint is a rotated rectangle: outside it every band is 0
(fill) and QA_PIXEL has its fill bit. Inside, the land cover is a grid of square regions, each
one EuroSAT-L class drawn with the sample generator's surfaces and spectra
(:func:`sample_dataset.generate_sample_dataset.eurosat_reflectance`), so that a probe trained on
the bundled EuroSAT-L sample can map them; a few clouds (bright, with the QA cloud bits) cover
parts of it.

Cost does not grow with the scene beyond writing it: each class has a bank of ``variants``
textured tiles of ``TILE`` pixels drawn once, and the scene is assembled from them row band by
row band, written as it goes (uncompressed, striped: fast to write and to read by windows).

Files (``<product>`` is a Landsat product id such as ``LC08_L2SP_190027_20210714_..._T1``):
``<product>_SR_B1.TIF`` ... ``_SR_B7.TIF`` and ``_QA_PIXEL.TIF`` (layout ``bands``), or one
7-band ``<product>_SR.TIF`` (layout ``stack``, no QA band); ``<product>_MTL.txt`` with
``DATE_ACQUIRED`` and ``SCENE_CENTER_TIME``; ``truth.json``: the region size, the class of
every region (row-major), the class names and the footprint.
"""

from __future__ import annotations

import argparse
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.windows import Window

from datasets.landsat_scene import QA_BITS, SR_BANDS
from sample_dataset.generate_sample_dataset import (PIXEL_SIZE, SEED, eurosat_reflectance,
                                                    greenness_of, to_digital_numbers)
from utils.data_config import EuroSATInfo
from utils.errors import run_cli
from utils.files import write_json, write_text

SCENE_EPSG = 32633                 # UTM 33N (Austria)
SCENE_LEFT, SCENE_TOP = 399990.0, 5400000.0  # on the 30 m Landsat grid (odd multiples of 15)
ACQUIRED = datetime(2021, 7, 14, 9, 53, 41)
PRODUCT = "LC08_L2SP_190027_20210714_20210721_02_T1"
TILE = 40                          # px of one texture tile (one model chip)
FOOTPRINT_ANGLE = 12.0             # degrees: a descending Landsat orbit's heading
QA_CLEAR = 1 << 6
QA_FILL = 1 << QA_BITS["fill"]
QA_CLOUD = (1 << QA_BITS["cloud"]) | (1 << QA_BITS["dilated_cloud"])
CLOUD_DN = 23000                   # bright in every band


def texture_bank(rng: np.random.Generator, variants: int, greenness: float) -> np.ndarray:
    """(classes, variants, 7, TILE, TILE) uint16 DN tiles of every EuroSAT-L class."""
    bank = np.empty((len(EuroSATInfo.CLASSES), variants, len(SR_BANDS), TILE, TILE), np.uint16)
    for k, name in enumerate(EuroSATInfo.CLASSES):
        for v in range(variants):
            reflectance = eurosat_reflectance(rng, name, TILE, greenness)
            bank[k, v] = to_digital_numbers(reflectance, rng, haze=0.01, illumination=1.0)
    return bank


def footprint(rows: np.ndarray, cols: np.ndarray, height: int, width: int,
              margin: float) -> np.ndarray:
    """True inside the rotated path/row rectangle (rows, cols: pixel centres, broadcastable)."""
    angle = math.radians(FOOTPRINT_ANGLE)
    y, x = rows - height / 2, cols - width / 2
    along = x * math.sin(angle) + y * math.cos(angle)
    across = x * math.cos(angle) - y * math.sin(angle)
    half = (1 - margin) / 2 / (math.cos(angle) + math.sin(angle))
    return (np.abs(along) <= half * height) & (np.abs(across) <= half * width)


def generate_scene(out: Path, height: int = 2400, width: int = 2400, seed: int = 0,
                   layout: str = "bands", region_size: int = 480, variants: int = 6,
                   clouds: int = 3, margin: float = 0.08) -> dict:
    """Write the scene into ``out`` (see the module docstring); returns the truth record."""
    rng = np.random.default_rng([SEED, 4, seed])
    out.mkdir(parents=True, exist_ok=True)
    bank = texture_bank(rng, variants, greenness_of(ACQUIRED, 47.5))
    region_rows, region_cols = -(-height // region_size), -(-width // region_size)
    regions = rng.integers(len(EuroSATInfo.CLASSES), size=(region_rows, region_cols))
    tile_rows, tile_cols = -(-height // TILE), -(-width // TILE)
    variant_of_tile = rng.integers(variants, size=(tile_rows, tile_cols))
    cloud_centres = rng.uniform(0.25, 0.75, size=(clouds, 2)) * (height, width)
    cloud_radii = rng.uniform(0.02, 0.05, size=clouds) * min(height, width)

    transform = Affine(PIXEL_SIZE, 0.0, SCENE_LEFT, 0.0, -PIXEL_SIZE, SCENE_TOP)
    profile = dict(driver="GTiff", width=width, height=height, dtype="uint16",
                   crs=CRS.from_epsg(SCENE_EPSG), transform=transform, nodata=0)
    if layout == "bands":
        names = [f"{PRODUCT}_{band}.TIF" for band in SR_BANDS] + [f"{PRODUCT}_QA_PIXEL.TIF"]
        outputs = [rasterio.open(out / name, "w", count=1, **profile) for name in names]
    else:
        outputs = [rasterio.open(out / f"{PRODUCT}_SR.TIF", "w", count=len(SR_BANDS),
                                 **profile)]
    try:
        for tile_row in range(tile_rows):
            top = tile_row * TILE
            rows = np.arange(top, min(top + TILE, height))
            band = np.concatenate([  # (7, TILE, tile_cols * TILE)
                bank[regions[tile_row * TILE // region_size, tile_col * TILE // region_size],
                     variant_of_tile[tile_row, tile_col]] for tile_col in range(tile_cols)],
                axis=2)[:, :len(rows), :width]
            r, c = rows[:, None] + 0.5, np.arange(width)[None, :] + 0.5
            inside = footprint(r, c, height, width, margin)
            cloudy = np.zeros_like(inside)
            for (cy, cx), radius in zip(cloud_centres, cloud_radii):
                cloudy |= (r - cy) ** 2 + (c - cx) ** 2 <= radius ** 2
            cloudy &= inside
            band[:, cloudy] = CLOUD_DN
            band[:, ~inside] = 0
            qa = np.where(inside, np.where(cloudy, QA_CLOUD, QA_CLEAR), QA_FILL).astype(np.uint16)
            window = Window(0, top, width, len(rows))
            if layout == "bands":
                for dst, pixels in zip(outputs, [*band, qa]):
                    dst.write(pixels, 1, window=window)
            else:
                outputs[0].write(band, window=window)
    finally:
        for dst in outputs:
            dst.close()

    write_text(out / f"{PRODUCT}_MTL.txt", mtl_text(height, width))
    truth = {"region_size": region_size, "regions": regions.tolist(),
             "class_names": list(EuroSATInfo.CLASSES), "footprint_margin": margin,
             "footprint_angle": FOOTPRINT_ANGLE, "height": height, "width": width,
             "acquired": ACQUIRED.isoformat() + "Z"}
    write_json(out / "truth.json", truth)
    return truth


def region_class(truth: dict, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Class index of the region holding each pixel (rows, cols: arrays of pixel positions)."""
    size = truth["region_size"]
    return np.asarray(truth["regions"])[np.asarray(rows) // size, np.asarray(cols) // size]


def mtl_text(height: int, width: int) -> str:
    """The MTL lines a reader needs, in the Collection 2 ODL layout."""
    return "\n".join([
        "GROUP = LANDSAT_METADATA_FILE",
        "  GROUP = PRODUCT_CONTENTS",
        f'    LANDSAT_PRODUCT_ID = "{PRODUCT}"',
        '    PROCESSING_LEVEL = "L2SP"',
        "  END_GROUP = PRODUCT_CONTENTS",
        "  GROUP = IMAGE_ATTRIBUTES",
        '    SPACECRAFT_ID = "LANDSAT_8"',
        "    WRS_PATH = 190",
        "    WRS_ROW = 27",
        f"    DATE_ACQUIRED = {ACQUIRED:%Y-%m-%d}",
        f'    SCENE_CENTER_TIME = "{ACQUIRED:%H:%M:%S}.1234560Z"',
        "  END_GROUP = IMAGE_ATTRIBUTES",
        "  GROUP = PROJECTION_ATTRIBUTES",
        f"    REFLECTIVE_LINES = {height}",
        f"    REFLECTIVE_SAMPLES = {width}",
        f"    UTM_ZONE = {SCENE_EPSG - 32600}",
        "  END_GROUP = PROJECTION_ATTRIBUTES",
        "END_GROUP = LANDSAT_METADATA_FILE",
        "END", ""])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--height", type=int, default=2400)
    parser.add_argument("--width", type=int, default=2400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=("bands", "stack"), default="bands")
    parser.add_argument("--region-size", type=int, default=480)
    args = parser.parse_args(argv)
    generate_scene(args.out, args.height, args.width, args.seed, args.layout, args.region_size)
    print(f"[saved] {args.height}x{args.width} scene in {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
