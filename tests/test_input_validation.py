"""Bad input tiles and split files are refused where they are read, naming the patch: raw
(pretraining, with and without DataLoader workers) and packed (the packer, with one and two
reading processes); EuroSAT-L chips likewise; packed metadata and split CSVs are checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.crs import CRS
from rasterio.transform import Affine

import pretrain_mae
from datasets import pack
from datasets.bigearthnet import BigEarthNetDatasetLS
from datasets.eurosat import EuroSATDatasetLS
from datasets.pack import PackedBigEarthNetDataset, pack_split
from utils.errors import UserInputError

GOOD = "SYN_MSIL2A_20170613T101031_1_2"
BAD = "SYN_MSIL2A_20180525T94030_3_4"


def write_tile(path, pixels: np.ndarray, dtype: str) -> None:
    bands, height, width = pixels.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=bands,
                       dtype=dtype, crs=CRS.from_epsg(32634),
                       transform=Affine(30.0, 0.0, 500_015.0, 0.0, -30.0, 6_000_015.0)) as dst:
        dst.write(pixels.astype(dtype))


def dn(bands=7, size=43, seed=0):
    return np.random.default_rng(seed).integers(7000, 25000, size=(bands, size, size))


def with_value(value):
    pixels = dn().astype(np.float32)
    pixels[2, 5, 7] = value
    return pixels


# kind -> (pixels, dtype, what the message says)
BAD_TILES = {
    "float32": (dn(), "float32", "is float32, expected uint16"),
    "uint8": (dn() % 256, "uint8", "is uint8, expected uint16"),
    "int16": (dn() % 30000, "int16", "is int16, expected uint16"),
    "nan": (with_value(np.nan), "float32", "is float32, expected uint16"),
    "inf": (with_value(np.inf), "float32", "is float32, expected uint16"),
    "300x300": (dn(size=300), "uint16", "is 300x300 pixels, larger than max_chip_size 64"),
    "30x30": (dn(size=30), "uint16", "is 30x30 pixels, smaller than the 40x40"),
    "6 bands": (dn(bands=6), "uint16", "has 6 bands, expected 7"),
}


@pytest.fixture
def bad_root(tmp_path, make_ben_root):
    """A BEN-L root with a good chip and a bad one; ``bad_root(kind)`` -> (root, split CSV)."""

    def build(kind):
        root = make_ben_root({GOOD: ["Pastures"], BAD: ["Bare rock"]})
        pixels, dtype, _ = BAD_TILES[kind]
        write_tile(root / "images" / f"{BAD}.tif", pixels, dtype)
        split = tmp_path / "split.csv"
        split.write_text(f"{GOOD}\n{BAD}\n")
        return root, split

    return build


def pretrain_config(tmp_path, root, split, **training):
    config = {"model": {"size": "XXS"},
              "training": {"dataset_path": str(root), "dataset_csv": str(split), "epochs": 1,
                           "batch_size": 2, "weight_path": str(tmp_path / "run"),
                           "num_workers": 0, "device": "cpu", **training}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", list(BAD_TILES))
def test_raw_bad_tile_stops_pretraining_naming_it(tmp_path, bad_root, capsys, exit_status,
                                                  kind, workers):
    root, split = bad_root(kind)
    config = pretrain_config(tmp_path, root, split, num_workers=workers)
    assert exit_status(pretrain_mae.main, ["--config_yaml", config]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"patch {BAD}: image {root / 'images' / BAD}.tif" in line and BAD_TILES[kind][2] in line
    assert "DataLoader worker" not in line and "Traceback" not in line


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", list(BAD_TILES))
def test_the_packer_refuses_a_bad_tile_naming_it(tmp_path, bad_root, capsys, exit_status, kind,
                                                 workers):
    root, split = bad_root(kind)
    out = tmp_path / "packed"
    assert exit_status(pack.main, ["--csv", split, "--root", root, "--out", out,
                                   "--workers", workers]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"patch {BAD}:" in line and BAD_TILES[kind][2] in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ben",
                                                                               "split.csv"]


def test_the_packer_skip_invalid_leaves_bad_tiles_out_with_one_warning(tmp_path, bad_root):
    root, split = bad_root("float32")
    with pytest.warns(UserWarning, match=f"left out 1 of 2 patches .*is float32.*: {BAD}"):
        out = pack_split(split, root, tmp_path / "packed", skip_invalid=True, progress=False)
    packed = PackedBigEarthNetDataset(out)
    assert packed.patch_ids == [GOOD] and np.load(out / "images.npy").shape == (1, 7, 40, 40)
    raw = BigEarthNetDatasetLS(split, root)
    assert np.array_equal(packed[0][0].numpy(), raw[0][0][:, 1:41, 1:41].numpy())


def test_max_chip_size_is_configurable(tmp_path, bad_root):
    root, split = bad_root("300x300")
    dataset = BigEarthNetDatasetLS(split, root, max_chip_size=300)
    assert dataset[1][0].shape == (7, 300, 300)
    with pytest.raises(UserInputError, match="max_chip_size 40 is smaller than the chip size 41"):
        BigEarthNetDatasetLS(split, root, chip_size=41, max_chip_size=40)


def test_skip_invalid_skips_missing_files_but_not_a_broken_image(tmp_path, bad_root, capsys,
                                                                 exit_status):
    """Documented: skip_invalid leaves out patches whose files are missing; an image that is
    there but unreadable or invalid is always an error (dropping it mid-epoch would change the
    epoch under a running schedule and break exact resumption)."""
    root, split = bad_root("uint8")
    config = pretrain_config(tmp_path, root, split, skip_invalid=True)
    assert exit_status(pretrain_mae.main, ["--config_yaml", config]) == 2
    assert "is uint8, expected uint16" in capsys.readouterr().err
    (root / "images" / f"{BAD}.tif").unlink()
    with pytest.warns(UserWarning, match=f"skipped 1 of 2 patches without an image file: {BAD}"):
        assert BigEarthNetDatasetLS(split, root, skip_invalid=True).patch_ids == [GOOD]


# ------------------------------------------------------------------------ split files


def test_a_patch_listed_twice_in_a_split_is_an_error(tmp_path, make_ben_root, capsys,
                                                     exit_status):
    root = make_ben_root({GOOD: ["Pastures"], BAD: ["Pastures"]})
    split = tmp_path / "split.csv"
    split.write_text(f"{GOOD}\n{BAD}\n{GOOD},S1_name\n")
    config = pretrain_config(tmp_path, root, split)
    assert exit_status(pretrain_mae.main, ["--config_yaml", config]) == 2
    assert f"patch {GOOD} is listed twice (lines 1 and 3)" in one_line(capsys.readouterr().err)


def test_dataset_csv_beside_a_packed_dataset_is_an_error(tmp_path, sample_dataset, capsys,
                                                         exit_status):
    split = sample_dataset / "bigearthnet-test.csv"
    packed = pack_split(split, sample_dataset, tmp_path / "packed", progress=False)
    config = pretrain_config(tmp_path, packed, split)
    assert exit_status(pretrain_mae.main, ["--config_yaml", config]) == 2
    line = one_line(capsys.readouterr().err)
    assert "training.dataset_csv" in line and "is a packed folder" in line
    assert not (tmp_path / "run").exists()  # before any work


def test_a_bad_date_in_packed_metadata_names_the_patch(tmp_path, sample_dataset):
    packed = pack_split(sample_dataset / "bigearthnet-test.csv", sample_dataset,
                        tmp_path / "packed", progress=False)
    metadata = dict(np.load(packed / "metadata.npz"))
    metadata["datetime"][3, 1] = 13  # month 13
    np.savez(packed / "metadata.npz", **metadata)
    patch = str(metadata["patch_ids"][3])
    with pytest.raises(UserInputError, match=f"patch {patch} has an invalid date"):
        PackedBigEarthNetDataset(packed)


def test_version_1_packed_folders_still_load(tmp_path, sample_dataset):
    packed = pack_split(sample_dataset / "bigearthnet-test.csv", sample_dataset,
                        tmp_path / "packed", progress=False)
    metadata = dict(np.load(packed / "metadata.npz"))
    del metadata["has_labels"]
    np.savez(packed / "metadata.npz", **metadata)
    info = json.loads((packed / "info.json").read_text())
    (packed / "info.json").write_text(json.dumps(dict(info, format_version=1)))
    assert len(PackedBigEarthNetDataset(packed, supervised=True)) == 56


# -------------------------------------------------------------------------- EuroSAT-L


@pytest.mark.parametrize("kind,pixels,dtype,message", [
    ("float32", dn(bands=8, size=22), "float32", "float32 pixels, expected uint16"),
    ("7 bands", dn(bands=7, size=22), "uint16", "7 bands, expected 8"),
    ("too small", dn(bands=8, size=8), "uint16", "8x8 pixels, expected 20 to 64"),
    ("too large", dn(bands=8, size=300), "uint16", "300x300 pixels, expected 20 to 64"),
])
def test_eurosat_bad_chips_name_the_file(tmp_path, kind, pixels, dtype, message):
    write_tile(tmp_path / "Forest" / "Forest_1.tif", dn(bands=8, size=22), "uint16")
    write_tile(tmp_path / "Forest" / "Forest_2.tif", pixels, dtype)
    split = tmp_path / "split.txt"
    split.write_text("Forest_1.jpg\nForest_2.jpg\n")
    dataset = EuroSATDatasetLS(tmp_path, split)
    assert dataset[0][0].shape == (7, 22, 22)
    with pytest.raises(UserInputError, match=f"Forest_2.tif: {message}"):
        dataset[1]


def test_eurosat_entry_listed_twice_is_an_error(tmp_path):
    write_tile(tmp_path / "Forest" / "Forest_1.tif", dn(bands=8, size=22), "uint16")
    split = tmp_path / "split.txt"
    split.write_text("Forest_1.jpg\nforest_1.tif\n")
    with pytest.raises(UserInputError, match="is listed twice"):
        EuroSATDatasetLS(tmp_path, split)
