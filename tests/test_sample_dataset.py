"""The committed sample_dataset/ is what its generator writes, and looks like BEN-L / EuroSAT-L."""

import hashlib
import json
import re
from datetime import datetime
from pathlib import Path

import numpy as np
import rasterio

from datasets.bigearthnet import BigEarthNetDatasetLS
from datasets.eurosat import EuroSATDatasetLS
from sample_dataset.generate_sample_dataset import generate
from utils.data_config import BigEarthNetInfo, EuroSATInfo

DATA_ENTRIES = ["images", "labels", "samples.csv", "bigearthnet-train.csv", "bigearthnet-val.csv",
                "bigearthnet-test.csv", "eurosat_l"]
NAME = re.compile(r"^SYN_MSIL2A_(\d{8})T(\d{5,6})_(\d+)_(\d+)$")


def committed_files(root: Path):
    files = []
    for entry in DATA_ENTRIES:
        path = root / entry
        files += [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sorted(str(p.relative_to(root)) for p in files)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ben_names(sample_dataset):
    return (sample_dataset / "samples.csv").read_text().split()[1:]


def test_generator_reproduces_the_committed_files(sample_dataset, tmp_path):
    written = generate(tmp_path / "regenerated")
    assert written == committed_files(sample_dataset)
    differing = [rel for rel in written
                 if sha256(tmp_path / "regenerated" / rel) != sha256(sample_dataset / rel)]
    assert differing == []


def test_size_budget(sample_dataset):
    total = sum((sample_dataset / rel).stat().st_size for rel in committed_files(sample_dataset))
    assert total <= 8_000_000


def test_ben_names_times_and_splits(sample_dataset):
    lines = (sample_dataset / "samples.csv").read_text().splitlines()
    assert lines[0] == "0"
    names = lines[1:]
    assert len(names) == len(set(names)) and 250 <= len(names) <= 320
    matches = [NAME.match(name) for name in names]
    assert all(matches) and not any(name.startswith(("S2A", "S2B")) for name in names)
    months = {int(m.group(1)[4:6]) for m in matches}
    assert months == set(range(1, 13))
    hours = {int(m.group(2).zfill(6)[:2]) for m in matches}
    assert len(hours) >= 3
    assert sum(len(m.group(2)) == 5 for m in matches) >= 10

    split_names = []
    for split in ("train", "val", "test"):
        lines = (sample_dataset / f"bigearthnet-{split}.csv").read_text().splitlines()
        rows = [line.split(",") for line in lines]
        assert all(len(row) == 2 and NAME.match(row[0]) for row in rows)  # no header, two columns
        split_names += [row[0] for row in rows]
    assert sorted(split_names) == sorted(names)


def test_ben_chips_and_label_files(sample_dataset):
    zones, labels_seen = set(), set()
    for name in ben_names(sample_dataset):
        with rasterio.open(sample_dataset / "images" / f"{name}.tif") as src:
            pixels = src.read()
            assert src.count == 7 and src.dtypes[0] == "uint16"
            assert 41 <= src.height <= 45 and 41 <= src.width <= 45
            assert src.profile["compress"] == "deflate"
            assert src.res == (30.0, 30.0)
            zones.add(src.crs.to_epsg())
            bounds = src.bounds
            centre = ((bounds.left + bounds.right) / 2, (bounds.bottom + bounds.top) / 2)
        assert pixels.min() >= 7000 and pixels.max() <= 25000
        label_file = sample_dataset / "labels" / f"{name}_labels_metadata.json"
        metadata = json.loads(label_file.read_text())
        assert set(metadata) >= {"labels", "coordinates", "projection", "acquisition_date"}
        assert metadata["labels"] and set(metadata["labels"]) <= set(BigEarthNetInfo.CLASSES[43])
        labels_seen.update(metadata["labels"])
        box = metadata["coordinates"]
        # the 1200 m BigEarthNet box is centred in the chip, to half a 30 m pixel
        assert abs((box["ulx"] + box["lrx"]) / 2 - centre[0]) <= 15
        assert abs((box["uly"] + box["lry"]) / 2 - centre[1]) <= 15
        stamp = NAME.match(name).group(1) + NAME.match(name).group(2).zfill(6)
        assert datetime.strptime(metadata["acquisition_date"], "%Y-%m-%d %H:%M:%S") == \
            datetime.strptime(stamp, "%Y%m%d%H%M%S")
    assert zones <= set(range(32629, 32637)) and len(zones) >= 6
    indices_43 = {BigEarthNetInfo.CLASSES[43].index(name) for name in labels_seen}
    mapped = {BigEarthNetInfo.MATCH_LABELS.get(index) for index in indices_43}
    assert mapped - {None} == set(range(19))  # every 19-class label occurs


def test_ben_loader_reads_every_split(sample_dataset):
    for split in ("train", "val", "test"):
        dataset = BigEarthNetDatasetLS(sample_dataset / f"bigearthnet-{split}.csv", sample_dataset,
                                       supervised=True)
        img, target, week, hour, lat, lon = dataset[len(dataset) - 1]
        assert img.shape[0] == 7 and target.sum() >= 0
        latitude = np.degrees(np.arctan2(lat[0].item(), lat[1].item()))
        assert 36 < latitude < 67  # Europe, from Portugal to northern Finland


def band_means(dataset, class_name, band):
    values = [dataset[i][0][band].float().mean().item() for i in range(len(dataset))
              if dataset.classes[dataset.targets[i]] == class_name]
    return np.mean(values)


def test_eurosat_part(sample_dataset):
    root = sample_dataset / "eurosat_l"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == EuroSATInfo.CLASSES
    sizes = set()
    for split in ("train", "val", "test"):
        entries = (root / f"eurosat-{split}.txt").read_text().split()
        assert all(entry.endswith(".jpg") for entry in entries)
        dataset = EuroSATDatasetLS(root, root / f"eurosat-{split}.txt")
        assert len(dataset) == len(entries)
    for chip in root.glob("*/*.tif"):
        assert re.match(rf"^{chip.parent.name}_\d+\.tif$", chip.name)
        with rasterio.open(chip) as src:
            assert src.count == 8
            sizes.add(src.width)
    assert sizes <= {21, 22, 23}


def test_classes_have_distinct_spectral_signatures(sample_dataset):
    root = sample_dataset / "eurosat_l"
    dataset = EuroSATDatasetLS(root, root / "eurosat-train.txt")
    nir, swir = 4, 5
    assert band_means(dataset, "SeaLake", nir) < 9000 < band_means(dataset, "Forest", nir)
    assert band_means(dataset, "SeaLake", swir) < band_means(dataset, "Industrial", swir)
    urban = [dataset[i][0].float().std(dim=(1, 2)).mean().item() for i in range(len(dataset))
             if dataset.classes[dataset.targets[i]] == "Residential"]
    water = [dataset[i][0].float().std(dim=(1, 2)).mean().item() for i in range(len(dataset))
             if dataset.classes[dataset.targets[i]] == "SeaLake"]
    assert min(urban) > 3 * max(water)  # urban is textured, water smooth
