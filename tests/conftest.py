"""Shared fixtures: the real BEN-L sample (skipped when absent), the committed synthetic sample,
tiny seeded GeoTIFFs in tmp_path, and running a script's main as from the shell."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine

from utils.errors import run_cli

REAL_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "bigearthnet_l_sample"
SAMPLE_DATASET = Path(__file__).resolve().parents[1] / "sample_dataset"


@pytest.fixture
def real_sample() -> Path:
    """The 200 real BEN-L patches in ../shared/data/bigearthnet_l_sample."""
    if not (REAL_SAMPLE / "samples.csv").is_file():
        pytest.skip(f"real BEN-L sample not found at {REAL_SAMPLE} (shared data not mounted)")
    return REAL_SAMPLE


@pytest.fixture
def sample_dataset() -> Path:
    """The committed synthetic sample (sample_dataset/)."""
    return SAMPLE_DATASET


def write_geotiff(path: Path, bands: int, height: int, width: int, seed: int, epsg: int = 32634,
                  left: float = 500_015.0, top: float = 6_000_015.0,
                  pixels: Optional[np.ndarray] = None) -> np.ndarray:
    """A GeoTIFF of seeded uint16 noise (DN 7000..25000) with 30 m pixels; returns its pixels."""
    if pixels is None:
        pixels = np.random.default_rng(seed).integers(7000, 25000, size=(bands, height, width),
                                                      dtype=np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=bands,
                       dtype="uint16", crs=CRS.from_epsg(epsg),
                       transform=Affine(30.0, 0.0, left, 0.0, -30.0, top)) as dst:
        dst.write(pixels)
    return pixels


@pytest.fixture
def make_geotiff() -> Callable[..., np.ndarray]:
    return write_geotiff


@pytest.fixture
def make_ben_root(tmp_path) -> Callable[..., Path]:
    """Build a BEN-L root with images/ and labels/ for the given patches:
    ``make_ben_root({name: [43-class labels], ...}, size=(43, 43))``."""

    def build(patches: dict, size: Sequence[int] = (43, 43), root: Optional[Path] = None) -> Path:
        root = root or tmp_path / "ben"
        for seed, (name, labels) in enumerate(patches.items()):
            write_geotiff(root / "images" / f"{name}.tif", 7, size[0], size[1], seed)
            label_file = root / "labels" / f"{name}_labels_metadata.json"
            label_file.parent.mkdir(parents=True, exist_ok=True)
            label_file.write_text(json.dumps({"labels": labels}), encoding="utf-8")
        return root

    return build


@pytest.fixture
def exit_status() -> Callable:
    """``exit_status(main, args)``: the status a script's ``main(argv)`` exits with when run as
    from the shell (through ``run_cli``: 2 for bad input); ``args`` may hold paths."""

    def run(main: Callable, args: Sequence) -> int:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main, [str(arg) for arg in args])
        return exit_info.value.code

    return run
