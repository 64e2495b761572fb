"""BigEarthNetDatasetLS on the real BEN-L sample and on tiny generated fixtures."""

import json
import math
import warnings
from datetime import datetime

import pytest
import rasterio
import torch

import datasets.bigearthnet as bigearthnet
from datasets.bigearthnet import BigEarthNetDatasetLS, read_split_csv
from transformation.transformer import CenterCrop, Compose, ToFloat, ZScoreNormalize
from utils.data_config import BigEarthNetInfo
from utils.errors import UserInputError

MISSING_LABEL_PATCH = "S2A_MSIL2A_20171208T093351_82_79"
PIPELINE = Compose([ToFloat(), CenterCrop(40), ZScoreNormalize(BigEarthNetInfo.STATISTICS["mean"],
                                                               BigEarthNetInfo.STATISTICS["std"])])
NAMES = ["SYN_MSIL2A_20170613T101031_1_2", "SYN_MSIL2A_20180525T94030_3_4",
         "SYN_MSIL2A_20171208T093351_5_6"]
LABELS = [["Mixed forest", "Sea and ocean"], ["Pastures"], ["Bare rock"]]


# ----------------------------------------------------------------------------- references


def utm_to_latlon(easting: float, northing: float, zone: int):
    """Inverse transverse Mercator on WGS84, northern hemisphere (Snyder 1987, eqs. 8-18..8-25)."""
    a, f, k0 = 6378137.0, 1 / 298.257223563, 0.9996
    e2 = f * (2 - f)
    ep2 = e2 / (1 - e2)
    x, m = easting - 500000.0, northing / k0
    mu = m / (a * (1 - e2 / 4 - 3 * e2 ** 2 / 64 - 5 * e2 ** 3 / 256))
    e1 = (1 - math.sqrt(1 - e2)) / (1 + math.sqrt(1 - e2))
    phi1 = (mu + (3 * e1 / 2 - 27 * e1 ** 3 / 32) * math.sin(2 * mu)
            + (21 * e1 ** 2 / 16 - 55 * e1 ** 4 / 32) * math.sin(4 * mu)
            + (151 * e1 ** 3 / 96) * math.sin(6 * mu) + (1097 * e1 ** 4 / 512) * math.sin(8 * mu))
    c1, t1 = ep2 * math.cos(phi1) ** 2, math.tan(phi1) ** 2
    n1 = a / math.sqrt(1 - e2 * math.sin(phi1) ** 2)
    r1 = a * (1 - e2) / (1 - e2 * math.sin(phi1) ** 2) ** 1.5
    d = x / (n1 * k0)
    lat = phi1 - (n1 * math.tan(phi1) / r1) * (
        d ** 2 / 2 - (5 + 3 * t1 + 10 * c1 - 4 * c1 ** 2 - 9 * ep2) * d ** 4 / 24
        + (61 + 90 * t1 + 298 * c1 + 45 * t1 ** 2 - 252 * ep2 - 3 * c1 ** 2) * d ** 6 / 720)
    lon = (d - (1 + 2 * t1 + c1) * d ** 3 / 6
           + (5 - 2 * c1 + 28 * t1 - 3 * c1 ** 2 + 8 * ep2 + 24 * t1 ** 2) * d ** 5 / 120)
    lon /= math.cos(phi1)
    return math.degrees(lat), (zone - 1) * 6 - 180 + 3 + math.degrees(lon)


def sincos(angle):
    return [math.sin(angle), math.cos(angle)]


def expected_time_encoding(name: str, legacy: bool):
    """Week and hour pairs from the name, parsed here by string slicing."""
    stamp = name.split("_")[2]
    date, time = stamp.split("T")
    day = datetime(int(date[:4]), int(date[4:6]), int(date[6:]))
    hour = int(time[0]) if legacy else int(time.zfill(6)[:2])
    week = (day.timetuple().tm_yday - (day.weekday() + 1) + 10) // 7  # ISO week, away from new year
    return sincos(week * 2 * math.pi / 52), sincos(hour * 2 * math.pi / 24)


def expected_target(label_file, num_classes):
    labels = json.loads(label_file.read_text())["labels"]
    target = torch.zeros(num_classes, dtype=torch.long)
    for name in labels:
        index = BigEarthNetInfo.CLASSES[43].index(name)
        if num_classes == 43:
            target[index] = 1
        elif index in BigEarthNetInfo.MATCH_LABELS:
            target[BigEarthNetInfo.MATCH_LABELS[index]] = 1
    return target


def real_dataset(root, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BigEarthNetDatasetLS(root / "samples.csv", root, skip_invalid=True, **kwargs)


# ----------------------------------------------------------------------------- real sample


def test_real_missing_label_file_is_a_clear_error_where_labels_are_read(real_sample):
    with pytest.raises(UserInputError) as error:
        BigEarthNetDatasetLS(real_sample / "samples.csv", real_sample, supervised=True)
    message = str(error.value)
    assert MISSING_LABEL_PATCH in message
    assert f"{MISSING_LABEL_PATCH}_labels_metadata.json" in message and "\n" not in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # without labels the patch is complete: no warning
        unsupervised = BigEarthNetDatasetLS(real_sample / "samples.csv", real_sample)
    assert MISSING_LABEL_PATCH in unsupervised.patch_ids and len(unsupervised) == 200
    img = unsupervised[unsupervised.patch_ids.index(MISSING_LABEL_PATCH)][0]
    assert img.shape[0] == 7 and img.dtype == torch.uint16


def test_real_skip_invalid_skips_exactly_the_unlabelled_patch(real_sample):
    names = (real_sample / "samples.csv").read_text().split()
    assert names[0] == "0" and len(names) == 201
    with pytest.warns(UserWarning) as caught:
        dataset = BigEarthNetDatasetLS(real_sample / "samples.csv", real_sample, skip_invalid=True,
                                       supervised=True)
    assert len(caught) == 1 and MISSING_LABEL_PATCH in str(caught[0].message)
    assert dataset.patch_ids == [name for name in names[1:] if name != MISSING_LABEL_PATCH]


def test_real_all_patches_load_as_float32_40x40(real_sample):
    dataset = real_dataset(real_sample, transform=PIPELINE)
    assert len(dataset) == 200  # the patch without a label file too: no labels are read
    for index in range(len(dataset)):
        img, target, *metas = dataset[index]
        assert img.shape == (7, 40, 40) and img.dtype == torch.float32
        assert torch.isfinite(img).all()
        assert target.numel() == 0
        assert all(m.shape == (2,) and m.dtype == torch.float32 for m in metas)


def test_real_untransformed_image_is_the_file(real_sample):
    dataset = real_dataset(real_sample)
    img = dataset[0][0]
    with rasterio.open(real_sample / "images" / f"{dataset.patch_ids[0]}.tif") as src:
        assert torch.equal(img, torch.from_numpy(src.read()))
    assert img.dtype == torch.uint16


@pytest.mark.parametrize("patch", [
    "S2A_MSIL2A_20170613T101031_11_66",   # UTM zone 34
    "S2B_MSIL2A_20180525T94030_78_30",    # 5-digit time
    "S2A_MSIL2A_20170613T101031_72_89",   # UTM zone 33
    "S2A_MSIL2A_20170704T112111_85_65",   # western Europe
])
@pytest.mark.parametrize("legacy", [False, True])
def test_real_metadata_matches_independent_computation(real_sample, patch, legacy):
    dataset = real_dataset(real_sample, legacy_hour=legacy)
    _, _, week, hour, lat, lon = dataset[dataset.patch_ids.index(patch)]
    with rasterio.open(real_sample / "images" / f"{patch}.tif") as src:
        easting, northing = src.transform @ (src.width / 2, src.height / 2)
        zone = src.crs.to_epsg() - 32600
    latitude, longitude = utm_to_latlon(easting, northing, zone)
    assert 35 < latitude < 71 and -11 < longitude < 33  # Europe
    expected_week, expected_hour = expected_time_encoding(patch, legacy)
    expected = [expected_week, expected_hour, sincos(math.radians(latitude)),
                sincos(math.radians(longitude))]
    for got, pair in zip((week, hour, lat, lon), expected):
        torch.testing.assert_close(got, torch.tensor(pair), atol=1e-6, rtol=0)


def test_real_sample_zones_include_more_than_34(real_sample):
    with rasterio.open(real_sample / "images" / "S2A_MSIL2A_20170613T101031_72_89.tif") as src:
        assert src.crs.to_epsg() == 32633


def test_real_legacy_hour_reproduces_the_published_encoding(real_sample):
    default, legacy = real_dataset(real_sample), real_dataset(real_sample, legacy_hour=True)
    differ = 0
    for index, patch in enumerate(legacy.patch_ids):
        published = datetime.strptime(patch.split("_")[2][0:10], "%Y%m%dT%H")
        published_hour = sincos(published.hour * 2 * math.pi / 24)
        published_week = sincos(published.isocalendar()[1] * 2 * math.pi / 52)
        _, _, week, hour, _, _ = legacy[index]
        assert hour.tolist() == torch.tensor(published_hour, dtype=torch.float32).tolist()
        assert week.tolist() == torch.tensor(published_week, dtype=torch.float32).tolist()
        differ += not torch.equal(hour, default[index][3])
    assert differ > 100  # most real acquisitions are at 09:xx-11:xx, read as hour 0 or 1


@pytest.mark.parametrize("num_classes", [19, 43])
def test_real_targets_follow_the_label_files(real_sample, num_classes):
    dataset = real_dataset(real_sample, supervised=True, num_classes=num_classes)
    for index, patch in enumerate(dataset.patch_ids):
        target = dataset[index][1]
        assert target.dtype == torch.long and target.shape == (num_classes,)
        label_file = real_sample / "labels" / f"{patch}_labels_metadata.json"
        assert torch.equal(target, expected_target(label_file, num_classes))


def test_real_dataset_opens_each_file_once_and_reprojects_once_per_patch(real_sample, monkeypatch):
    dataset = real_dataset(real_sample)
    opens, reprojections = [], []
    real_open, real_transform = rasterio.open, bigearthnet.warp_transform
    monkeypatch.setattr(rasterio, "open", lambda *a, **k: opens.append(a[0]) or real_open(*a, **k))
    monkeypatch.setattr(bigearthnet, "warp_transform",
                        lambda *a, **k: reprojections.append(1) or real_transform(*a, **k))
    first = [dataset[i] for i in range(20)]
    second = [dataset[i] for i in range(20)]
    assert len(opens) == 40 and len(reprojections) == 20
    for a, b in zip(first, second):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_real_plot(real_sample, tmp_path):
    dataset = real_dataset(real_sample)
    fig = dataset.plot(0, tmp_path / "chip.png")
    assert (tmp_path / "chip.png").read_bytes()[:4] == b"\x89PNG"
    assert dataset.patch_ids[0] in fig.axes[0].get_title()
    label_file = real_sample / "labels" / f"{dataset.patch_ids[0]}_labels_metadata.json"
    labels = json.loads(label_file.read_text())["labels"]
    assert all(label in fig.axes[0].texts[0].get_text() for label in labels)


# ----------------------------------------------------------------------------- split CSVs


def write_csv(tmp_path, text, name="split.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_without_header_keeps_the_first_patch(tmp_path, make_ben_root):
    root = make_ben_root(dict(zip(NAMES, LABELS)))
    two_columns = "".join(f"{name},S1A_IW_GRDH_1SDV_20170613T165043_33UUP_{i}_1\n"
                          for i, name in enumerate(NAMES))
    assert BigEarthNetDatasetLS(write_csv(tmp_path, two_columns), root).patch_ids == NAMES
    one_column = "\n".join(NAMES) + "\n\n"
    assert BigEarthNetDatasetLS(write_csv(tmp_path, one_column), root).patch_ids == NAMES


def test_csv_header_row_is_dropped(tmp_path, make_ben_root):
    root = make_ben_root(dict(zip(NAMES, LABELS)))
    for header in ("0", "patch_id", "name,s1_name"):
        csv_file = write_csv(tmp_path, header + "\n" + "\n".join(NAMES) + "\n")
        assert BigEarthNetDatasetLS(csv_file, root).patch_ids == NAMES


def test_csv_first_row_that_names_an_existing_image_is_data(tmp_path, make_ben_root):
    odd_names = ["tile-a", "tile-b"]
    make_ben_root({name: ["Pastures"] for name in odd_names})
    images = {f"{name}.tif" for name in odd_names}
    assert read_split_csv(write_csv(tmp_path, "tile-a\ntile-b\n"), images) == odd_names


@pytest.mark.parametrize("text", ["", "\n\n", "0\n", "patch_id,s1\n"])
def test_empty_csv_is_a_clear_error(tmp_path, make_ben_root, text):
    root = make_ben_root(dict(zip(NAMES, LABELS)))
    csv_file = write_csv(tmp_path, text, "empty.csv")
    with pytest.raises(UserInputError, match=r"empty\.csv.*(empty|no patch)"):
        BigEarthNetDatasetLS(csv_file, root)


def test_csv_problems_name_the_file(tmp_path, make_ben_root):
    root = make_ben_root(dict(zip(NAMES, LABELS)))
    with pytest.raises(UserInputError, match=r"three\.csv line 2: expected 1 or 2 columns"):
        three_columns = write_csv(tmp_path, f"{NAMES[0]}\n{NAMES[1]},a,b\n", "three.csv")
        BigEarthNetDatasetLS(three_columns, root)
    with pytest.raises(UserInputError, match="nope.csv"):
        BigEarthNetDatasetLS(tmp_path / "nope.csv", root)
    with pytest.raises(UserInputError, match="images"):
        BigEarthNetDatasetLS(write_csv(tmp_path, NAMES[0]), tmp_path / "no_root")


# ----------------------------------------------------------------------------- broken files


def test_missing_image_file_error_and_skip(tmp_path, make_ben_root):
    root = make_ben_root(dict(zip(NAMES, LABELS)))
    (root / "images" / f"{NAMES[1]}.tif").unlink()
    csv_file = write_csv(tmp_path, "\n".join(NAMES))
    missing = f"patch {NAMES[1]}: image file .*{NAMES[1]}.tif does not exist"
    with pytest.raises(UserInputError, match=missing):
        BigEarthNetDatasetLS(csv_file, root)
    with pytest.warns(UserWarning, match=f"skipped 1 of 3 patches.*{NAMES[1]}"):
        dataset = BigEarthNetDatasetLS(csv_file, root, skip_invalid=True)
    assert dataset.patch_ids == [NAMES[0], NAMES[2]]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_unreadable_geotiff_names_patch_and_file(tmp_path, make_ben_root, damage):
    root = make_ben_root(dict(zip(NAMES, LABELS)))
    image = root / "images" / f"{NAMES[2]}.tif"
    data = image.read_bytes()
    damaged = {"truncate": data[: len(data) // 2], "garbage": b"not a tiff" * 50, "empty": b""}
    image.write_bytes(damaged[damage])
    dataset = BigEarthNetDatasetLS(write_csv(tmp_path, "\n".join(NAMES)), root, transform=PIPELINE)
    assert dataset[0][0].shape == (7, 40, 40)
    with pytest.raises(UserInputError) as error:
        dataset[2]
    message = str(error.value)
    assert f"patch {NAMES[2]}" in message and str(image) in message and "\n" not in message


def test_wrong_band_count_names_patch_and_file(tmp_path, make_ben_root, make_geotiff):
    root = make_ben_root(dict(zip(NAMES, LABELS)))
    make_geotiff(root / "images" / f"{NAMES[0]}.tif", 6, 43, 43, seed=9)
    dataset = BigEarthNetDatasetLS(write_csv(tmp_path, "\n".join(NAMES)), root)
    with pytest.raises(UserInputError,
                       match=f"patch {NAMES[0]}: image .*{NAMES[0]}.tif has 6 bands, expected 7"):
        dataset[0]


def test_bad_label_files_name_the_file(tmp_path, make_ben_root):
    root = make_ben_root(dict(zip(NAMES, [["Not a CORINE class"], ["Pastures"], ["Bare rock"]])))
    (root / "labels" / f"{NAMES[1]}_labels_metadata.json").write_text("{broken")
    dataset = BigEarthNetDatasetLS(write_csv(tmp_path, "\n".join(NAMES)), root, supervised=True)
    unknown = f"{NAMES[0]}_labels_metadata.json: unknown class 'Not a CORINE class'"
    with pytest.raises(UserInputError, match=unknown):
        dataset[0]
    with pytest.raises(UserInputError, match=f"{NAMES[1]}_labels_metadata.json is not valid JSON"):
        dataset[1]
    assert dataset[2][1].sum() == 0  # Bare rock has no 19-class counterpart


def test_fixture_items_and_options(tmp_path, make_ben_root):
    root = make_ben_root(dict(zip(NAMES, LABELS)), size=(41, 45))
    csv_file = write_csv(tmp_path, "\n".join(NAMES))
    dataset = BigEarthNetDatasetLS(csv_file, root, transform=PIPELINE, supervised=True,
                                   num_classes=43)
    img, target, *_ = dataset[0]
    assert img.shape == (7, 40, 40)
    assert target.nonzero().flatten().tolist() == [24, 42]  # Mixed forest, Sea and ocean
    with pytest.raises(UserInputError, match="num_classes must be 19 or 43"):
        BigEarthNetDatasetLS(csv_file, root, num_classes=10)
    bad = write_csv(tmp_path, "SYN_MSIL2A_20171308T093351_5_6\n" + NAMES[0], "bad.csv")
    make_ben_root({"SYN_MSIL2A_20171308T093351_5_6": []}, root=root)
    with pytest.raises(UserInputError, match="SYN_MSIL2A_20171308T093351_5_6"):
        BigEarthNetDatasetLS(bad, root)[0]
