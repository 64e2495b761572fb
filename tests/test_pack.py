"""The packed format returns exactly the items of the raw loader, and is written atomically."""

import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datasets.bigearthnet import BigEarthNetDatasetLS
from datasets.pack import PackedBigEarthNetDataset, main, pack_split
from transformation.transformer import CenterCrop, Compose, ToFloat, ZScoreNormalize
from utils.data_config import BigEarthNetInfo
from utils.errors import UserInputError, run_cli

PIPELINE = Compose([ToFloat(), CenterCrop(40), ZScoreNormalize(BigEarthNetInfo.STATISTICS["mean"],
                                                               BigEarthNetInfo.STATISTICS["std"])])
OPTIONS = [dict(supervised=True, num_classes=19, legacy_hour=False),
           dict(supervised=True, num_classes=43, legacy_hour=True),
           dict(supervised=False, num_classes=19, legacy_hour=False)]


def assert_same_items(raw, packed):
    assert packed.patch_ids == raw.patch_ids
    for index in range(len(raw)):
        for a, b in zip(raw[index], packed[index]):
            same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            assert same, raw.patch_ids[index]


UNLABELLED = "S2A_MSIL2A_20171208T093351_82_79"  # the real sample's patch without a label file


@pytest.fixture
def packed_real(real_sample, tmp_path):
    return pack_split(real_sample / "samples.csv", real_sample, tmp_path / "packed",
                      progress=False)


@pytest.mark.parametrize("options", OPTIONS)
def test_packed_equals_raw_on_the_real_tiles(real_sample, packed_real, options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = BigEarthNetDatasetLS(real_sample / "samples.csv", real_sample, transform=PIPELINE,
                                   skip_invalid=True, **options)
        packed = PackedBigEarthNetDataset(packed_real, transform=PIPELINE, skip_invalid=True,
                                          **options)
    assert len(packed) == (199 if options["supervised"] else 200)
    assert_same_items(raw, packed)


def test_unlabelled_patch_is_packed_for_unsupervised_use_only(packed_real):
    metadata = np.load(packed_real / "metadata.npz")
    row = list(metadata["patch_ids"]).index(UNLABELLED)
    assert not metadata["has_labels"][row] and metadata["has_labels"].sum() == 199
    assert metadata["labels43"][row].sum() == 0
    assert UNLABELLED in PackedBigEarthNetDataset(packed_real).patch_ids
    with pytest.raises(UserInputError, match=f"patch {UNLABELLED} has no labels"):
        PackedBigEarthNetDataset(packed_real, supervised=True)
    with pytest.warns(UserWarning, match=f"skipped 1 of 200 patches without labels: {UNLABELLED}"):
        supervised = PackedBigEarthNetDataset(packed_real, supervised=True, skip_invalid=True)
    assert UNLABELLED not in supervised.patch_ids and len(supervised) == 199


def test_packed_files(packed_real, real_sample):
    info = json.loads((packed_real / "info.json").read_text())
    assert info["format_version"] == 2 and info["count"] == 200 and info["unlabelled"] == 1
    assert info["band_names"] == BigEarthNetInfo.BAND_NAMES
    images = np.load(packed_real / "images.npy", mmap_mode="r")
    assert images.dtype == np.uint16 and images.shape == (200, 7, 40, 40)
    metadata = np.load(packed_real / "metadata.npz")
    row = list(metadata["patch_ids"]).index("S2B_MSIL2A_20180525T94030_78_30")
    assert metadata["datetime"][row].tolist() == [2018, 5, 25, 9, 40, 30]
    assert metadata["legacy_hour"][row] == 9
    assert metadata["labels43"].dtype == np.uint8
    assert sorted(p.name for p in packed_real.parent.iterdir()) == ["packed"]  # no temporary left


def test_packed_equals_raw_on_the_sample_dataset(sample_dataset, tmp_path):
    csv_file = sample_dataset / "bigearthnet-val.csv"
    out = pack_split(csv_file, sample_dataset, tmp_path / "val", workers=2, progress=False)
    for options in OPTIONS[:2]:
        raw = BigEarthNetDatasetLS(csv_file, sample_dataset, transform=PIPELINE, **options)
        assert_same_items(raw, PackedBigEarthNetDataset(out, transform=PIPELINE, **options))


def test_packed_dataset_works_with_dataloader_workers(sample_dataset, tmp_path):
    out = pack_split(sample_dataset / "bigearthnet-test.csv", sample_dataset, tmp_path / "test",
                     progress=False)
    dataset = PackedBigEarthNetDataset(out, transform=PIPELINE, supervised=True)
    dataset[0]  # maps the file in this process
    assert len(pickle.dumps(dataset)) < 100_000  # the map is not pickled to the workers
    loader = DataLoader(dataset, batch_size=16, num_workers=2)
    imgs, targets, week, hour, lat, lon = (torch.cat(parts) for parts in zip(*loader))
    assert imgs.shape == (len(dataset), 7, 40, 40) and week.shape == (len(dataset), 2)
    for index in (0, 17, len(dataset) - 1):
        expected = dataset[index]
        assert torch.equal(imgs[index], expected[0]) and torch.equal(targets[index], expected[1])
        assert torch.equal(lat[index], expected[4])


def test_transform_receives_the_cropped_chip(sample_dataset, tmp_path):
    csv_file = sample_dataset / "bigearthnet-test.csv"
    out = pack_split(csv_file, sample_dataset, tmp_path / "p", progress=False)
    img, target, *_ = PackedBigEarthNetDataset(out)[3]
    assert img.dtype == torch.uint16 and img.shape == (7, 40, 40)
    assert target.numel() == 0


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # the cut-off file
def test_unreadable_image_keeps_the_previous_pack(tmp_path, make_ben_root):
    names = ["SYN_MSIL2A_20170613T101031_1_2", "SYN_MSIL2A_20180525T94030_3_4"]
    root = make_ben_root({name: ["Pastures"] for name in names})
    csv_file = tmp_path / "split.csv"
    csv_file.write_text("\n".join(names))
    out = pack_split(csv_file, root, tmp_path / "out", progress=False)
    before = (out / "images.npy").read_bytes()

    image = root / "images" / f"{names[1]}.tif"
    image.write_bytes(image.read_bytes()[:300])
    with pytest.raises(UserInputError, match=f"patch {names[1]}: cannot read image"):
        pack_split(csv_file, root, out, progress=False)
    assert (out / "images.npy").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ben", "out", "split.csv"]


def test_small_chip_and_foreign_destination_are_refused(tmp_path, make_ben_root):
    name = "SYN_MSIL2A_20170613T101031_1_2"
    root = make_ben_root({name: ["Pastures"]}, size=(39, 45))
    csv_file = tmp_path / "split.csv"
    csv_file.write_text(name)
    with pytest.raises(UserInputError, match="39x45 pixels, smaller than the 40x40"):
        pack_split(csv_file, root, tmp_path / "out", progress=False)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserInputError, match="refusing to replace"):
        pack_split(csv_file, root, foreign, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_incomplete_or_foreign_packed_dirs_are_clear_errors(sample_dataset, tmp_path):
    csv_file = sample_dataset / "bigearthnet-test.csv"
    out = pack_split(csv_file, sample_dataset, tmp_path / "p", progress=False)
    with pytest.raises(UserInputError, match="does not exist"):
        PackedBigEarthNetDataset(tmp_path / "absent")
    info = json.loads((out / "info.json").read_text())
    (out / "info.json").write_text(json.dumps(dict(info, format_version=99)))
    with pytest.raises(UserInputError, match=f"{out}: format version 99"):
        PackedBigEarthNetDataset(out)
    (out / "info.json").write_text(json.dumps(info))
    (out / "images.npy").unlink()
    with pytest.raises(UserInputError, match=f"{out}: .*images.npy is missing"):
        PackedBigEarthNetDataset(out)


def test_command_line(sample_dataset, tmp_path, capsys):
    out = tmp_path / "cli"
    csv_file = sample_dataset / "bigearthnet-test.csv"
    assert main(["--csv", str(csv_file), "--root", str(sample_dataset), "--out", str(out),
                 "--workers", "1"]) == 0
    assert "packed 56 patches" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--csv", str(tmp_path / "none.csv"), "--root", str(sample_dataset),
                       "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "none.csv" in error and error.count("\n") == 1
