"""Generate the synthetic ``sample_dataset/``: a small BEN-L-format and EuroSAT-L-format sample.

    python -m sample_dataset.generate_sample_dataset [--out DIR]

Real BEN-L / EuroSAT-L tiles may not be committed, so the bundled sample is synthetic. Every
random draw comes from ``numpy.random.default_rng([SEED, part, index])``, so running the script
again reproduces the committed files byte for byte (same numpy and rasterio/GDAL versions).

How a chip is made:

1. Land cover: each class has a surface recipe (a spectrum in the 7 Landsat bands SR_B1..SR_B7
   and a texture: smooth water, canopy, field parcels, rows, scattered trees, urban blocks...).
   Vegetation spectra move between a winter and a summer spectrum with the acquisition date.
2. Layout: a BEN-L chip has 1-3 labels drawn from realistic combinations for its region
   (boreal, Atlantic, temperate, alpine, Mediterranean); each label gets a region of the chip
   (smooth random blobs, or a band for rivers and roads), so every label is visible in the
   pixels.
3. Reflectance -> Landsat Collection 2 digital numbers, DN = (reflectance + 0.2) / 2.75e-5,
   plus scene haze, illumination and sensor noise, clipped to 7000..25000.
4. Georeferencing: scenes in real BigEarthNet countries, in their UTM zones (EPSG:32629..32636),
   chips on a 1200 m grid like BigEarthNet patches, 30 m pixels snapped to the Landsat grid.

Outputs (relative to ``--out``): ``images/``, ``labels/``, ``samples.csv``,
``bigearthnet-{train,val,test}.csv`` and ``eurosat_l/`` (class folders of 8-band chips and
``eurosat-{train,val,test}.txt``). They are written to a temporary folder first and moved into
place at the end, so an interrupted run leaves the previous files untouched.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.warp import transform as warp_transform

from utils.data_config import BigEarthNetInfo, EuroSATInfo
from utils.errors import run_cli

SEED = 20250912
BEN_PART, EUROSAT_PART, SCENE_PART = 1, 2, 3
PIXEL_SIZE = 30.0  # m, Landsat
PATCH_SPACING = 1200  # m, a BigEarthNet patch (120 x 10 m)
CHIP_SIZES = [(41, 41), (41, 41), (43, 43), (43, 43), (45, 45), (44, 44), (45, 44), (44, 45)]
EUROSAT_SIZES = [21, 22, 22, 23]
DN_MIN, DN_MAX = 7000, 25000
BEN_SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}
EUROSAT_CHIPS_PER_CLASS = 20
EUROSAT_SPLIT_COUNTS = {"train": 12, "val": 4, "test": 4}
AGRICULTURE_WITH_NATURE = BigEarthNetInfo.CLASSES[43][20]  # "Land principally occupied by ..."

# ----------------------------------------------------------------------------- spectra

# Surface reflectance in SR_B1..SR_B7 (coastal, blue, green, red, NIR, SWIR1, SWIR2):
# (summer, winter). Vegetation is bright in NIR in summer; water is dark in NIR and SWIR.
SPECTRA: Dict[str, Tuple[Sequence[float], Sequence[float]]] = {
    "water": ([0.045, 0.040, 0.045, 0.028, 0.012, 0.006, 0.004],) * 2,
    "turbid_water": ([0.060, 0.062, 0.080, 0.070, 0.035, 0.012, 0.007],) * 2,
    "broadleaf": ([0.020, 0.026, 0.055, 0.030, 0.340, 0.170, 0.075],
                  [0.035, 0.040, 0.060, 0.070, 0.180, 0.200, 0.130]),
    "conifer": ([0.015, 0.018, 0.035, 0.020, 0.210, 0.095, 0.040],
                [0.017, 0.020, 0.035, 0.024, 0.160, 0.085, 0.038]),
    "shrub": ([0.030, 0.035, 0.060, 0.055, 0.260, 0.200, 0.110],
              [0.035, 0.040, 0.060, 0.070, 0.190, 0.210, 0.140]),
    "grass": ([0.030, 0.035, 0.075, 0.050, 0.330, 0.210, 0.110],
              [0.035, 0.040, 0.070, 0.070, 0.220, 0.220, 0.150]),
    "dry_grass": ([0.045, 0.055, 0.085, 0.100, 0.240, 0.290, 0.210],
                  [0.040, 0.050, 0.080, 0.090, 0.230, 0.270, 0.190]),
    "crop": ([0.030, 0.035, 0.080, 0.040, 0.420, 0.220, 0.100],
             [0.060, 0.070, 0.100, 0.120, 0.240, 0.270, 0.210]),
    "soil": ([0.070, 0.085, 0.120, 0.160, 0.230, 0.300, 0.250],) * 2,
    "urban": ([0.090, 0.100, 0.120, 0.135, 0.190, 0.210, 0.190],) * 2,
    "roof": ([0.150, 0.165, 0.185, 0.200, 0.240, 0.270, 0.250],) * 2,
    "asphalt": ([0.060, 0.065, 0.075, 0.085, 0.110, 0.130, 0.120],) * 2,
    "sand": ([0.150, 0.180, 0.230, 0.280, 0.330, 0.400, 0.350],) * 2,
    "rock": ([0.110, 0.125, 0.150, 0.175, 0.220, 0.280, 0.240],) * 2,
    "peat": ([0.025, 0.030, 0.050, 0.050, 0.170, 0.140, 0.080],
             [0.030, 0.035, 0.050, 0.060, 0.120, 0.130, 0.080]),
    "marsh": ([0.035, 0.040, 0.065, 0.055, 0.200, 0.120, 0.060],
              [0.040, 0.045, 0.060, 0.060, 0.110, 0.090, 0.050]),
    "heath": ([0.030, 0.035, 0.055, 0.060, 0.200, 0.190, 0.120],
              [0.035, 0.040, 0.055, 0.065, 0.150, 0.180, 0.120]),
    "sclerophyll": ([0.040, 0.050, 0.070, 0.080, 0.210, 0.250, 0.170],) * 2,
    "burnt": ([0.040, 0.045, 0.055, 0.065, 0.110, 0.190, 0.180],) * 2,
    "mud": ([0.060, 0.070, 0.090, 0.100, 0.120, 0.100, 0.070],) * 2,
    "salt": ([0.300, 0.320, 0.340, 0.350, 0.360, 0.300, 0.250],) * 2,
    "rice": ([0.030, 0.035, 0.070, 0.045, 0.300, 0.120, 0.050],
             [0.050, 0.050, 0.060, 0.050, 0.060, 0.040, 0.030]),
}


def spectrum(name: str, greenness: float) -> np.ndarray:
    """(7, 1, 1) reflectance of a surface; greenness 0 (winter) .. 1 (summer)."""
    summer, winter = (np.asarray(s, dtype=np.float64) for s in SPECTRA[name])
    return (winter + greenness * (summer - winter))[:, None, None]


def greenness_of(date: datetime, latitude: float) -> float:
    """Vegetation cycle: 1 in mid-July, 0 in mid-January; shorter summers further north."""
    day = date.timetuple().tm_yday
    season = 0.5 + 0.5 * math.cos(2 * math.pi * (day - 196) / 365.25)
    return float(season ** (1.0 + max(0.0, latitude - 50.0) / 10.0))


# ----------------------------------------------------------------------------- textures

Shape = Tuple[int, int]  # (height, width)


def smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """(H, W) zero-mean unit-std field: a (cells+1)^2 random grid, bilinearly interpolated."""
    grid = rng.standard_normal((cells + 1, cells + 1))
    ys, xs = np.linspace(0, cells, height), np.linspace(0, cells, width)
    y0, x0 = np.minimum(ys.astype(int), cells - 1), np.minimum(xs.astype(int), cells - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    field = top * (1 - fy) + bottom * fy
    return (field - field.mean()) / (field.std() + 1e-9)


def fractal_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W) blobs at three scales, zero mean, unit std."""
    field = sum(weight * smooth_noise(rng, height, width, cells)
                for weight, cells in ((1.0, 3), (0.5, 7), (0.25, 15)))
    return (field - field.mean()) / (field.std() + 1e-9)


def mix(a: np.ndarray, b: np.ndarray, share_b: np.ndarray) -> np.ndarray:
    """Per-pixel linear mixture of two (7, H, W) or (7, 1, 1) spectra; share_b is (H, W)."""
    return a * (1 - share_b) + b * share_b


def parcels(rng: np.random.Generator, height: int, width: int, count: int) -> np.ndarray:
    """(H, W) parcel ids: nearest of ``count`` random seeds, stretched along a random direction
    so that parcels look like elongated fields."""
    seeds = rng.uniform(0, 1, size=(count, 2)) * (height, width)
    angle = rng.uniform(0, math.pi)
    stretch = rng.uniform(1.5, 3.0)
    ys, xs = np.mgrid[0:height, 0:width]
    dy, dx = ys[None] - seeds[:, 0, None, None], xs[None] - seeds[:, 1, None, None]
    along = dx * math.cos(angle) + dy * math.sin(angle)
    across = -dx * math.sin(angle) + dy * math.cos(angle)
    return np.argmin((along / stretch) ** 2 + across ** 2, axis=0)


def band_mask(rng: np.random.Generator, height: int, width: int, band_width: float) -> np.ndarray:
    """(H, W) bool: a gently curved band across the chip (a river or a road)."""
    ys, xs = np.mgrid[0:height, 0:width]
    angle = rng.uniform(0, math.pi)
    centre = np.array([height, width]) / 2 + rng.uniform(-0.2, 0.2, size=2) * (height, width)
    across = -(xs - centre[1]) * math.sin(angle) + (ys - centre[0]) * math.cos(angle)
    along = (xs - centre[1]) * math.cos(angle) + (ys - centre[0]) * math.sin(angle)
    across = across - rng.uniform(2, 5) * np.sin(along / rng.uniform(6, 12) + rng.uniform(0, 6))
    return np.abs(across) <= band_width / 2


def texture_uniform(rng: np.random.Generator, shape: Shape, spec: np.ndarray,
                    roughness: float) -> np.ndarray:
    """A spectrum with brightness variations of relative amplitude ``roughness``."""
    return spec * (1 + roughness * fractal_noise(rng, *shape))


def texture_patchy(rng: np.random.Generator, shape: Shape, spec_a: np.ndarray, spec_b: np.ndarray,
                   share_b: float, roughness: float = 0.06) -> np.ndarray:
    """Blobs of spectrum b (about ``share_b`` of the area) in spectrum a."""
    noise = fractal_noise(rng, *shape)
    share = 1 / (1 + np.exp(-3 * (noise - np.quantile(noise, 1 - share_b))))
    return mix(spec_a, spec_b, share) * (1 + roughness * fractal_noise(rng, *shape))


def texture_fields(rng: np.random.Generator, shape: Shape, greenness: float, count: int,
                   surfaces: Sequence[str] = ("crop", "soil")) -> np.ndarray:
    """Parcels, each a surface of ``surfaces`` at its own growth stage, with field edges."""
    ids = parcels(rng, *shape, count)
    image = np.zeros((7,) + shape)
    for parcel in range(count):
        surface = surfaces[rng.integers(len(surfaces))]
        stage = greenness * rng.uniform(0.2, 1.0)
        if surface == "crop":
            spec = mix(spectrum("soil", 0), spectrum("crop", 1), np.array(stage))
        else:
            spec = spectrum(surface, greenness)
        inside = ids == parcel
        image[:, inside] = (spec * rng.uniform(0.92, 1.08))[:, 0]
    edges = np.zeros(shape, dtype=bool)
    edges[1:, :] |= ids[1:, :] != ids[:-1, :]
    edges[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    image[:, edges] = 0.7 * image[:, edges] + 0.3 * spectrum("grass", greenness)[:, 0]
    return image * (1 + 0.03 * fractal_noise(rng, *shape))


def texture_rows(rng: np.random.Generator, shape: Shape, greenness: float, plant: str,
                 period: float) -> np.ndarray:
    """Plantation rows: stripes of ``plant`` over soil at a random angle."""
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    angle = rng.uniform(0, math.pi)
    phase = (xs * math.cos(angle) + ys * math.sin(angle)) * 2 * math.pi / period
    share = 0.5 + 0.5 * np.sin(phase + rng.uniform(0, 2 * math.pi))
    image = mix(spectrum("soil", greenness), spectrum(plant, greenness), 0.25 + 0.6 * share)
    return image * (1 + 0.04 * fractal_noise(rng, *shape))


def texture_dots(rng: np.random.Generator, shape: Shape, greenness: float, tree: str, ground: str,
                 density: float) -> np.ndarray:
    """Scattered tree crowns (``density`` of the pixels) over a ground surface."""
    crowns = rng.uniform(size=shape) < density
    share = np.where(crowns, rng.uniform(0.6, 1.0, size=shape), rng.uniform(0.0, 0.15, size=shape))
    return mix(spectrum(ground, greenness), spectrum(tree, greenness), share)


def texture_urban(rng: np.random.Generator, shape: Shape, greenness: float, built_share: float,
                  block: int) -> np.ndarray:
    """Buildings (bright roofs, darker concrete) in blocks, a street grid, and green space."""
    height, width = shape
    rows, cols = -(-height // block), -(-width // block)
    block_values = rng.uniform(size=(rows, cols))
    per_pixel = np.kron(block_values, np.ones((block, block)))[:height, :width]
    built = np.where(per_pixel > 0.5, mix(spectrum("urban", 0), spectrum("roof", 0), np.array(0.8)),
                     spectrum("urban", 0) * 0.9)
    built = built * (1 + 0.12 * rng.standard_normal(shape))
    share = np.clip(built_share + 0.2 * fractal_noise(rng, *shape), 0, 1)
    image = mix(spectrum("grass", greenness), built, share)
    offset = rng.integers(block + 2)
    streets = np.zeros(shape, dtype=bool)
    streets[offset::block + 2, :] = True
    streets[:, (offset + 1) % (block + 2)::block + 2] = True
    image[:, streets] = mix(image[:, streets], spectrum("asphalt", 0)[:, 0], np.array(0.6))
    return image


def class_surface(name: str, rng: np.random.Generator, shape: Shape, g: float) -> np.ndarray:
    """(7, H, W) reflectance of a whole chip covered by the 43-class ``name``."""
    u = lambda spec, roughness: texture_uniform(rng, shape, spectrum(spec, g), roughness)
    p = lambda a, b, share: texture_patchy(rng, shape, spectrum(a, g), spectrum(b, g), share)
    recipes = {
        "Continuous urban fabric": lambda: texture_urban(rng, shape, g, 0.9, 2),
        "Discontinuous urban fabric": lambda: texture_urban(rng, shape, g, 0.55, 3),
        "Industrial or commercial units": lambda: texture_urban(rng, shape, g, 0.95, 5) * 1.15,
        "Port areas": lambda: texture_urban(rng, shape, g, 0.85, 6) * 1.1,
        "Road and rail networks and associated land": lambda: u("asphalt", 0.08),
        "Non-irrigated arable land": lambda: texture_fields(rng, shape, g, int(rng.integers(4, 9))),
        "Permanently irrigated land":
            lambda: texture_fields(rng, shape, max(g, 0.6), int(rng.integers(5, 10))),
        "Rice fields": lambda: texture_fields(rng, shape, g, int(rng.integers(3, 6)), ("rice",)),
        "Vineyards": lambda: texture_rows(rng, shape, g, "shrub", 3.0),
        "Fruit trees and berry plantations": lambda: texture_rows(rng, shape, g, "broadleaf", 4.0),
        "Olive groves": lambda: texture_dots(rng, shape, g, "sclerophyll", "dry_grass", 0.35),
        "Pastures": lambda: u("grass", 0.05),
        "Complex cultivation patterns":
            lambda: texture_fields(rng, shape, g, int(rng.integers(12, 20)),
                                   ("crop", "soil", "grass")),
        AGRICULTURE_WITH_NATURE:
            lambda: mix(texture_fields(rng, shape, g, int(rng.integers(6, 10)), ("crop", "grass")),
                        spectrum("shrub", g), (fractal_noise(rng, *shape) > 0.4).astype(float)),
        "Agro-forestry areas": lambda: texture_dots(rng, shape, g, "broadleaf", "dry_grass", 0.2),
        "Broad-leaved forest": lambda: u("broadleaf", 0.10),
        "Coniferous forest": lambda: u("conifer", 0.10),
        "Mixed forest": lambda: p("conifer", "broadleaf", 0.45),
        "Natural grassland": lambda: p("grass", "dry_grass", 0.4),
        "Moors and heathland": lambda: p("heath", "peat", 0.3),
        "Sclerophyllous vegetation": lambda: p("sclerophyll", "soil", 0.25),
        "Transitional woodland/shrub": lambda: p("shrub", "broadleaf", 0.35),
        "Beaches, dunes, sands": lambda: u("sand", 0.05),
        "Bare rock": lambda: texture_uniform(rng, shape, spectrum("rock", g), 0.15)
                             * (1 + 0.08 * rng.standard_normal(shape)),
        "Sparsely vegetated areas": lambda: p("rock", "dry_grass", 0.4),
        "Burnt areas": lambda: p("burnt", "shrub", 0.2),
        "Inland marshes": lambda: p("marsh", "water", 0.2),
        "Peatbogs": lambda: p("peat", "marsh", 0.3),
        "Salt marshes": lambda: p("marsh", "mud", 0.35),
        "Salines":
            lambda: texture_fields(rng, shape, g, int(rng.integers(6, 12)),
                                   ("salt", "turbid_water")),
        "Intertidal flats": lambda: p("mud", "turbid_water", 0.3),
        "Water courses": lambda: u("turbid_water", 0.03),
        "Water bodies": lambda: u("water", 0.03),
        "Coastal lagoons": lambda: u("turbid_water", 0.04),
        "Estuaries": lambda: p("turbid_water", "water", 0.4),
        "Sea and ocean": lambda: u("water", 0.02) * 0.95,
    }
    return recipes[name]()


# ----------------------------------------------------------------------------- BEN-L scenes

# Parts of BigEarthNet countries: (country, UTM EPSG, latitude range, longitude range, biome).
REGIONS = [
    ("Finland", 32634, (60.2, 65.5), (21.2, 23.8), "boreal"),
    ("Finland", 32635, (60.5, 66.0), (24.5, 29.5), "boreal"),
    ("Finland", 32636, (61.0, 64.5), (30.1, 31.0), "boreal"),
    ("Lithuania", 32634, (54.2, 56.2), (21.2, 23.8), "temperate"),
    ("Lithuania", 32635, (54.2, 56.2), (24.2, 26.5), "temperate"),
    ("Ireland", 32629, (51.8, 54.8), (-9.8, -6.2), "atlantic"),
    ("Ireland", 32630, (52.3, 54.0), (-6.4, -6.0), "atlantic"),
    ("Portugal", 32629, (37.2, 41.8), (-8.9, -6.5), "mediterranean"),
    ("Austria", 32633, (46.8, 48.6), (13.2, 16.8), "temperate"),
    ("Switzerland", 32632, (46.3, 47.6), (7.0, 9.5), "alpine"),
    ("Belgium", 32631, (50.0, 51.2), (3.2, 5.8), "temperate"),
    ("Serbia", 32634, (42.5, 45.8), (19.2, 22.5), "temperate"),
]
# Scenes per region (28 scenes of 10 chips).
REGION_SCENES = [3, 3, 2, 2, 2, 3, 1, 4, 3, 1, 2, 2]
CHIPS_PER_SCENE = 10

# Label combinations per biome, with weights. Each list is one chip's 43-class labels.
BIOME_LABELS: Dict[str, List[Tuple[int, List[str]]]] = {
    "boreal": [
        (3, ["Coniferous forest"]),
        (3, ["Coniferous forest", "Mixed forest"]),
        (2, ["Coniferous forest", "Transitional woodland/shrub"]),
        (2, ["Coniferous forest", "Peatbogs"]),
        (2, ["Coniferous forest", "Water bodies"]),
        (1, ["Mixed forest", "Transitional woodland/shrub", "Water bodies"]),
        (1, ["Coniferous forest", "Non-irrigated arable land"]),
        (1, ["Coniferous forest", "Sea and ocean"]),
        (1, ["Discontinuous urban fabric", "Coniferous forest"]),
    ],
    "atlantic": [
        (4, ["Pastures"]),
        (2, ["Pastures", "Peatbogs"]),
        (1, ["Discontinuous urban fabric", "Pastures"]),
        (2, ["Natural grassland", "Moors and heathland", "Peatbogs"]),
        (1, ["Beaches, dunes, sands", "Pastures", "Sea and ocean"]),
        (1, ["Coniferous forest", "Pastures"]),
        (1, ["Continuous urban fabric", "Industrial or commercial units"]),
    ],
    "temperate": [
        (3, ["Non-irrigated arable land"]),
        (2, ["Non-irrigated arable land", "Pastures"]),
        (2, ["Broad-leaved forest", "Complex cultivation patterns", AGRICULTURE_WITH_NATURE]),
        (2, ["Broad-leaved forest", "Mixed forest"]),
        (2, ["Discontinuous urban fabric", "Non-irrigated arable land"]),
        (1, ["Continuous urban fabric", "Industrial or commercial units"]),
        (1, ["Broad-leaved forest", "Discontinuous urban fabric", "Pastures"]),
        (1, ["Broad-leaved forest", "Pastures", "Water courses"]),
        (1, ["Complex cultivation patterns", "Fruit trees and berry plantations"]),
        (1, ["Non-irrigated arable land", "Vineyards"]),
        (1, ["Inland marshes", "Water bodies", "Pastures"]),
        (1, ["Road and rail networks and associated land", "Non-irrigated arable land",
             "Discontinuous urban fabric"]),
    ],
    "alpine": [
        (2, ["Coniferous forest", "Natural grassland", "Bare rock"]),
        (2, ["Pastures", "Coniferous forest"]),
        (1, ["Mixed forest", "Pastures", "Discontinuous urban fabric"]),
        (1, ["Water bodies", "Discontinuous urban fabric", "Broad-leaved forest"]),
        (1, ["Sparsely vegetated areas", "Bare rock"]),
    ],
    "mediterranean": [
        (2, ["Olive groves", "Sclerophyllous vegetation"]),
        (2, ["Agro-forestry areas", "Non-irrigated arable land"]),
        (2, ["Broad-leaved forest", "Sclerophyllous vegetation", "Transitional woodland/shrub"]),
        (1, ["Complex cultivation patterns", "Vineyards"]),
        (1, ["Beaches, dunes, sands", "Discontinuous urban fabric", "Sea and ocean"]),
        (1, ["Burnt areas", "Coniferous forest", "Transitional woodland/shrub"]),
        (1, ["Permanently irrigated land", "Rice fields"]),
        (1, ["Estuaries", "Intertidal flats", "Salt marshes"]),
        (1, ["Continuous urban fabric", "Port areas", "Sea and ocean"]),
        (1, ["Salines", "Coastal lagoons", "Salt marshes"]),
    ],
}
LINEAR_CLASSES = {"Water courses": (3, 6), "Road and rail networks and associated land": (2, 3)}
FIRST_DATE = datetime(2017, 6, 1)
LATITUDE_BANDS = "CDEFGHJKLMNPQRSTUVWX"


def choose(rng: np.random.Generator, weighted: Sequence[Tuple[int, object]]):
    weights = np.array([w for w, _ in weighted], dtype=np.float64)
    return weighted[rng.choice(len(weighted), p=weights / weights.sum())][1]


def layout(rng: np.random.Generator, shape: Shape, labels: Sequence[str]) -> np.ndarray:
    """(H, W) index into ``labels``: blobs, the first label the largest, each label >= 8% of
    the chip; rivers and roads are bands drawn over the blobs."""
    areal = [i for i, name in enumerate(labels) if name not in LINEAR_CLASSES]
    label_map = np.full(shape, areal[0])
    if len(areal) > 1:
        bias = np.zeros(len(areal))
        bias[0] = 0.5
        for _ in range(30):
            fields = np.stack([fractal_noise(rng, *shape) + b for b in bias])
            winner = np.argmax(fields, axis=0)
            shares = np.bincount(winner.ravel(), minlength=len(areal)) / winner.size
            if shares.min() >= 0.08:
                break
            bias[np.argmin(shares)] += 0.4
        label_map = np.asarray(areal)[winner]
    for i, name in enumerate(labels):
        if name in LINEAR_CLASSES:
            low, high = LINEAR_CLASSES[name]
            label_map[band_mask(rng, *shape, rng.uniform(low, high))] = i
    return label_map


def to_digital_numbers(reflectance: np.ndarray, rng: np.random.Generator, haze: float,
                       illumination: float) -> np.ndarray:
    """(7, H, W) reflectance -> uint16 Landsat C2 L2 DN with haze (strongest in the blue bands),
    illumination and sensor noise."""
    haze_per_band = haze * np.array([1.0, 0.8, 0.55, 0.4, 0.2, 0.05, 0.02])[:, None, None]
    observed = reflectance * illumination + haze_per_band + rng.normal(0, 0.001, reflectance.shape)
    dn = np.rint((observed + 0.2) / 2.75e-5)
    return np.clip(dn, DN_MIN, DN_MAX).astype(np.uint16)


def compose_chip(rng: np.random.Generator, shape: Shape, labels: Sequence[str],
                 greenness: float) -> np.ndarray:
    """(7, H, W) reflectance of a chip with the given 43-class labels."""
    label_map = layout(rng, shape, labels)
    image = np.zeros((7,) + shape)
    for i, name in enumerate(labels):
        inside = label_map == i
        image[:, inside] = class_surface(name, rng, shape, greenness)[:, inside]
    return image


def utc_time(rng: np.random.Generator, date: datetime, longitude: float) -> datetime:
    """The UTC time of a Sentinel-2 datatake over Europe: about 11:20 - longitude / 15 h."""
    hours = 11.3 - longitude / 15 + rng.uniform(-0.5, 0.5)
    return date + timedelta(seconds=int(hours * 3600))


def name_timestamp(when: datetime, drop_leading_zero: bool) -> str:
    """``YYYYMMDDTHHMMSS``; before 10:00 optionally with the 5-digit time of some real names."""
    stamp = when.strftime("%Y%m%dT%H%M%S")
    if drop_leading_zero and when.hour < 10:
        stamp = stamp[:9] + stamp[10:]
    return stamp


def tile_code(rng: np.random.Generator, epsg: int, latitude: float) -> str:
    """A Sentinel-2-style tile code such as ``34VER``: UTM zone, latitude band, two letters."""
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    band = LATITUDE_BANDS[int((latitude + 80) // 8)]
    return f"{epsg - 32600}{band}{letters[rng.integers(24)]}{letters[rng.integers(24)]}"


def make_ben_scenes() -> List[dict]:
    """The scenes: region, CRS, tile origin, acquisition time; months cycle through the year."""
    scenes = []
    for region, count in zip(REGIONS, REGION_SCENES):
        for _ in range(count):
            index = len(scenes)
            rng = np.random.default_rng([SEED, SCENE_PART, index])
            country, epsg, lat_range, lon_range, biome = region
            lat, lon = rng.uniform(*lat_range), rng.uniform(*lon_range)
            xs, ys = warp_transform(CRS.from_epsg(4326), CRS.from_epsg(epsg), [lon], [lat])
            month_offset = (index * 5) % 12  # every month of June 2017 .. May 2018
            month = FIRST_DATE.month - 1 + month_offset  # months since January 2017
            date = datetime(FIRST_DATE.year + month // 12, month % 12 + 1, int(rng.integers(1, 29)))
            when = utc_time(rng, date, lon)
            scenes.append({
                "index": index, "country": country, "epsg": epsg, "biome": biome,
                "latitude": lat, "origin": (round(xs[0] / 60) * 60, round(ys[0] / 60) * 60),
                "when": when, "stamp": name_timestamp(when, drop_leading_zero=index % 3 == 0),
                "tile": tile_code(rng, epsg, lat), "orbit": int(rng.integers(1, 143)),
                "haze": rng.uniform(0.0, 0.02), "illumination": rng.uniform(0.92, 1.06),
            })
    return scenes


def write_geotiff(path: Path, pixels: np.ndarray, epsg: int, left: float, top: float) -> None:
    """A pixel-interleaved GeoTIFF with 30 m pixels as BEN-L's, but DEFLATE-compressed."""
    bands, height, width = pixels.shape
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=bands,
                       dtype="uint16", crs=CRS.from_epsg(epsg),
                       transform=Affine(PIXEL_SIZE, 0.0, left, 0.0, -PIXEL_SIZE, top),
                       compress="deflate", predictor=2, zlevel=9, interleave="pixel") as dst:
        dst.write(pixels)


def write_ben_chip(out: Path, scene: dict, chip: int, row: int, col: int) -> Tuple[str, str]:
    """One BEN-L chip (image and label file); returns (patch name, synthetic S1 name)."""
    rng = np.random.default_rng([SEED, BEN_PART, scene["index"], chip])
    labels = choose(rng, BIOME_LABELS[scene["biome"]])
    labels = sorted(labels, key=BigEarthNetInfo.CLASSES[43].index)
    height, width = CHIP_SIZES[rng.integers(len(CHIP_SIZES))]
    greenness = greenness_of(scene["when"], scene["latitude"])
    reflectance = compose_chip(rng, (height, width), labels, greenness)
    pixels = to_digital_numbers(reflectance, rng, scene["haze"], scene["illumination"])

    # BigEarthNet patch box on its 1200 m grid; the Landsat chip covers it on the 30 m grid.
    ulx = scene["origin"][0] + col * PATCH_SPACING
    uly = scene["origin"][1] - row * PATCH_SPACING
    left = ulx - 15 - 30 * ((width - 41) // 2)
    top = uly + 15 + 30 * ((height - 41) // 2)
    name = f"SYN_MSIL2A_{scene['stamp']}_{row}_{col}"
    write_geotiff(out / "images" / f"{name}.tif", pixels, scene["epsg"], left, top)

    when = scene["when"]
    s1_when = when + timedelta(hours=6, minutes=int(rng.integers(0, 60)))  # an evening pass
    metadata = {
        "labels": list(labels),
        "coordinates": {"ulx": ulx, "uly": uly,
                        "lrx": ulx + PATCH_SPACING, "lry": uly - PATCH_SPACING},
        "projection": CRS.from_epsg(scene["epsg"]).to_wkt(),
        "tile_source": f"SYN_MSIL1C_{when.strftime('%Y%m%dT%H%M%S')}_N0000_R{scene['orbit']:03d}_"
                       f"T{scene['tile']}_{when.strftime('%Y%m%dT%H%M%S')}.SAFE",
        "acquisition_date": when.strftime("%Y-%m-%d %H:%M:%S"),
    }
    label_file = out / "labels" / f"{name}_labels_metadata.json"
    label_file.write_text(json.dumps(metadata), encoding="utf-8")  # one line, as the real files
    s1_name = f"SYN_IW_GRDH_1SDV_{s1_when.strftime('%Y%m%dT%H%M%S')}_{scene['tile']}_{row}_{col}"
    return name, s1_name


def write_ben_part(out: Path) -> None:
    """images/, labels/, samples.csv and the three split CSVs."""
    (out / "images").mkdir()
    (out / "labels").mkdir()
    pairs = []
    for scene in make_ben_scenes():
        rng = np.random.default_rng([SEED, SCENE_PART, scene["index"], 1])
        cells = rng.choice(90 * 90, size=CHIPS_PER_SCENE, replace=False)
        for chip, cell in enumerate(cells):
            pairs.append(write_ben_chip(out, scene, chip, int(cell // 90), int(cell % 90)))

    samples = "0\n" + "".join(f"{name}\n" for name, _ in pairs)  # "0": the real file's header
    (out / "samples.csv").write_text(samples, encoding="utf-8")
    order = np.random.default_rng([SEED, BEN_PART]).permutation(len(pairs))
    start = 0
    for split, share in BEN_SPLITS.items():
        stop = start + round(share * len(pairs))
        rows = [pairs[i] for i in order[start:stop]]
        text = "".join(f"{s2_name},{s1_name}\n" for s2_name, s1_name in rows)
        (out / f"bigearthnet-{split}.csv").write_text(text, encoding="utf-8")
        start = stop


# ----------------------------------------------------------------------------- EuroSAT-L

EUROSAT_SURFACES = {
    "AnnualCrop": ["Non-irrigated arable land", "Permanently irrigated land"],
    "Forest": ["Broad-leaved forest", "Coniferous forest", "Mixed forest"],
    "HerbaceousVegetation": ["Natural grassland", "Transitional woodland/shrub",
                             "Moors and heathland"],
    "Industrial": ["Industrial or commercial units"],
    "Pasture": ["Pastures"],
    "PermanentCrop": ["Vineyards", "Fruit trees and berry plantations", "Olive groves"],
    "Residential": ["Discontinuous urban fabric", "Continuous urban fabric"],
    "SeaLake": ["Sea and ocean", "Water bodies"],
}
BAND_BACKGROUNDS = ["Pastures", "Non-irrigated arable land", "Complex cultivation patterns",
                    "Broad-leaved forest"]


def eurosat_reflectance(rng: np.random.Generator, class_name: str, size: int,
                        greenness: float) -> np.ndarray:
    """(7, size, size) reflectance of a EuroSAT-L chip of ``class_name``."""
    shape = (size, size)
    if class_name in ("Highway", "River"):
        land = BAND_BACKGROUNDS[rng.integers(len(BAND_BACKGROUNDS))]
        background = class_surface(land, rng, shape, greenness)
        if class_name == "Highway":
            band = band_mask(rng, size, size, rng.uniform(1.5, 2.5))
            surface = spectrum("asphalt", 0)
        else:
            band = band_mask(rng, size, size, rng.uniform(3, 6))
            surface = spectrum("turbid_water", 0)
        background[:, band] = (surface * (1 + 0.04 * rng.standard_normal((7, 1, 1))))[:, 0]
        return background
    surfaces = EUROSAT_SURFACES[class_name]
    return class_surface(surfaces[rng.integers(len(surfaces))], rng, shape, greenness)


def thermal_digital_numbers(reflectance: np.ndarray, greenness: float,
                            rng: np.random.Generator) -> np.ndarray:
    """(H, W) uint16 ST_B10 DN: warmer in summer and over bare or built ground, cool over water
    and dense vegetation; kelvin = DN * 0.00341802 + 149."""
    red, nir = reflectance[3], reflectance[4]
    ndvi = (nir - red) / (nir + red + 1e-6)
    kelvin = 281 + 14 * greenness + 9 * (0.5 - ndvi) - 6 * (nir < 0.05)
    kelvin = kelvin + rng.normal(0, 0.3, kelvin.shape)
    return np.rint((kelvin - 149) / 0.00341802).astype(np.uint16)


def write_eurosat_part(out: Path) -> None:
    """eurosat_l/<Class>/<Class>_<i>.tif and eurosat-{train,val,test}.txt listing .jpg names."""
    root = out / "eurosat_l"
    splits: Dict[str, List[str]] = {split: [] for split in EUROSAT_SPLIT_COUNTS}
    for class_index, class_name in enumerate(EuroSATInfo.CLASSES):
        (root / class_name).mkdir(parents=True)
        for i in range(1, EUROSAT_CHIPS_PER_CLASS + 1):
            rng = np.random.default_rng([SEED, EUROSAT_PART, class_index, i])
            size = EUROSAT_SIZES[rng.integers(len(EUROSAT_SIZES))]
            greenness = float(rng.uniform(0.1, 1.0))
            reflectance = eurosat_reflectance(rng, class_name, size, greenness)
            haze, illumination = rng.uniform(0, 0.02), rng.uniform(0.94, 1.05)
            optical = to_digital_numbers(reflectance, rng, haze, illumination)
            thermal = thermal_digital_numbers(reflectance, greenness, rng)
            pixels = np.concatenate([optical, thermal[None]])
            _, epsg, lat_range, lon_range, _ = REGIONS[rng.integers(len(REGIONS))]
            xs, ys = warp_transform(CRS.from_epsg(4326), CRS.from_epsg(epsg),
                                    [rng.uniform(*lon_range)], [rng.uniform(*lat_range)])
            left, top = math.floor(xs[0] / 30) * 30 + 15, math.floor(ys[0] / 30) * 30 + 15
            write_geotiff(root / class_name / f"{class_name}_{i}.tif", pixels, epsg, left, top)

        split_rng = np.random.default_rng([SEED, EUROSAT_PART, class_index])
        order = split_rng.permutation(EUROSAT_CHIPS_PER_CLASS) + 1
        start = 0
        for split, count in EUROSAT_SPLIT_COUNTS.items():
            splits[split] += [f"{class_name}_{i}.jpg" for i in order[start:start + count]]
            start += count
    for split, names in splits.items():
        text = "".join(f"{name}\n" for name in sorted(names))
        (root / f"eurosat-{split}.txt").write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------- main

OUTPUTS = ["images", "labels", "samples.csv", "bigearthnet-train.csv", "bigearthnet-val.csv",
           "bigearthnet-test.csv", "eurosat_l"]


def generate(out_dir: Path) -> List[str]:
    """Write the sample into ``out_dir`` (replacing the outputs there); returns the relative
    paths of all files written, sorted."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".generate.", suffix=".tmp"))
    try:
        write_ben_part(tmp)
        write_eurosat_part(tmp)
        written = sorted(str(path.relative_to(tmp)) for path in tmp.rglob("*") if path.is_file())
        for name in OUTPUTS:
            destination = out_dir / name
            if destination.is_dir():
                shutil.rmtree(destination)
            os.replace(tmp / name, destination)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the synthetic BEN-L and EuroSAT-L "
                                                 "sample.")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent),
                        help="output folder (default: this script's folder)")
    args = parser.parse_args(argv)
    written = generate(Path(args.out))
    size = sum((Path(args.out) / rel).stat().st_size for rel in written)
    print(f"wrote {len(written)} files ({size / 1e6:.2f} MB) under {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
