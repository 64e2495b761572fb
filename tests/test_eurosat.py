"""EuroSATDatasetLS on generated 8-band fixtures."""

import numpy as np
import pytest
import torch

from datasets.eurosat import EuroSATDatasetLS
from transformation.transformer import Compose, Resize, ToFloat, ZScoreNormalize
from utils.data_config import EuroSATInfo
from utils.errors import UserInputError

CLASSES = ["Forest", "Highway", "SeaLake"]


@pytest.fixture
def eurosat_root(tmp_path, make_geotiff):
    """3 classes x 3 chips of 8 bands, 22x22; the thermal band is a constant 41000."""
    root = tmp_path / "eurosat"
    pixels = {}
    for c, class_name in enumerate(CLASSES):
        for i in range(1, 4):
            rng = np.random.default_rng([c, i])
            data = rng.integers(7000, 25000, size=(8, 22, 22), dtype=np.uint16)
            data[7] = 41000
            path = root / class_name / f"{class_name}_{i}.tif"
            make_geotiff(path, 8, 22, 22, seed=0, pixels=data)
            pixels[f"{class_name}_{i}"] = data
    (root / "notes.txt").write_text("not a class folder")
    return root, pixels


def write_split(tmp_path, lines, name="split.txt"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jpg_entries_match_tif_chips_and_thermal_band_is_dropped(tmp_path, eurosat_root):
    root, pixels = eurosat_root
    split = write_split(tmp_path, ["SeaLake_2.jpg", "Forest_1.jpg", "Highway_3.jpg"])
    dataset = EuroSATDatasetLS(root, split)
    assert dataset.classes == CLASSES
    assert dataset.file_names == ["SeaLake_2", "Forest_1", "Highway_3"]
    img, target = dataset[0]
    assert target == 2 and isinstance(target, int)
    assert img.shape == (7, 22, 22) and img.dtype == torch.uint16
    assert torch.equal(img, torch.from_numpy(pixels["SeaLake_2"][:7]))
    assert (img != 41000).any()


def test_class_slash_name_tif_and_case_insensitive_entries(tmp_path, eurosat_root):
    root, _ = eurosat_root
    lines = ["Forest/Forest_2.tif", "highway_1.JPG", "SEALAKE/sealake_3", "  ", "Forest_3"]
    split = write_split(tmp_path, lines)
    dataset = EuroSATDatasetLS(root, split)
    assert dataset.file_names == ["Forest_2", "Highway_1", "SeaLake_3", "Forest_3"]
    assert dataset.targets == [0, 1, 2, 0]


def test_unmatched_entries_strict_and_non_strict(tmp_path, eurosat_root):
    root, _ = eurosat_root
    lines = ["Forest_1.jpg", "Forest_99.jpg", "Pasture_4.jpg", "Highway/Forest_2.jpg"]
    split = write_split(tmp_path, lines)
    with pytest.raises(UserInputError) as error:
        EuroSATDatasetLS(root, split)
    message = str(error.value)
    assert "split.txt" in message and "3 of 4 entries" in message
    for name in ("Forest_99.jpg", "Pasture_4.jpg", "Highway/Forest_2.jpg"):
        assert name in message
    with pytest.warns(UserWarning, match="3 of 4 entries") as caught:
        dataset = EuroSATDatasetLS(root, split, strict=False)
    assert len(caught) == 1
    assert dataset.file_names == ["Forest_1"]
    with pytest.raises(UserInputError, match="match no"):
        EuroSATDatasetLS(root, write_split(tmp_path, ["Nothing_1.jpg"], "none.txt"), strict=False)


def test_one_hot_and_model_transform(tmp_path, eurosat_root):
    root, pixels = eurosat_root
    stats = EuroSATInfo.STATISTICS
    transform = Compose([ToFloat(), Resize(40), ZScoreNormalize(stats["mean"], stats["std"])])
    dataset = EuroSATDatasetLS(root, write_split(tmp_path, ["Highway_2.jpg"]), transform=transform,
                               return_one_hot=True)
    img, target = dataset[0]
    assert img.shape == (7, 40, 40) and img.dtype == torch.float32
    assert target.dtype == torch.float32 and target.tolist() == [0.0, 1.0, 0.0]
    # Bilinear resizing never leaves the range of the input values.
    raw = pixels["Highway_2"][:7].astype(np.float64)
    low = (raw.min(axis=(1, 2)) - stats["mean"]) / stats["std"]
    high = (raw.max(axis=(1, 2)) - stats["mean"]) / stats["std"]
    assert (img.amin(dim=(1, 2)).numpy() >= low - 1e-4).all()
    assert (img.amax(dim=(1, 2)).numpy() <= high + 1e-4).all()


def test_ambiguous_stem_needs_a_class(tmp_path, eurosat_root, make_geotiff):
    root, _ = eurosat_root
    make_geotiff(root / "SeaLake" / "Forest_1.tif", 8, 22, 22, seed=3)
    with pytest.raises(UserInputError, match="'Forest_1.jpg' matches several chips.*Class/name"):
        EuroSATDatasetLS(root, write_split(tmp_path, ["Forest_1.jpg"]))
    dataset = EuroSATDatasetLS(root, write_split(tmp_path, ["SeaLake/Forest_1.jpg"]))
    assert dataset.targets == [2]


def test_bad_files_are_clear_errors(tmp_path, eurosat_root, make_geotiff):
    root, _ = eurosat_root
    make_geotiff(root / "Forest" / "Forest_2.tif", 7, 22, 22, seed=1)
    chip = root / "Forest" / "Forest_3.tif"
    chip.write_bytes(chip.read_bytes()[:2000])
    dataset = EuroSATDatasetLS(root, write_split(tmp_path, ["Forest_2.jpg", "Forest_3.jpg"]))
    with pytest.raises(UserInputError, match="Forest_2.tif: 7 bands, expected 8"):
        dataset[0]
    with pytest.raises(UserInputError, match="Forest_3.tif: cannot read"):
        dataset[1]
    with pytest.raises(UserInputError, match="empty.txt: the split file lists no chips"):
        EuroSATDatasetLS(root, write_split(tmp_path, [""], "empty.txt"))
    with pytest.raises(UserInputError, match="missing.txt"):
        EuroSATDatasetLS(root, tmp_path / "missing.txt")
    with pytest.raises(UserInputError, match="no class folders"):
        (tmp_path / "bare").mkdir()
        EuroSATDatasetLS(tmp_path / "bare", tmp_path / "split.txt")
