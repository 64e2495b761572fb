"""Transforms, metadata encodings, patch-name timestamps and the figure helper."""

import math
from datetime import datetime

import numpy as np
import pytest
import torch

from transformation.transformer import (CenterCrop, CenterCrop40, Compose, Resize, ToFloat,
                                        ZScoreNormalize)
from utils.data_config import BigEarthNetInfo
from utils.data_utils import (normalize_latlon, normalize_timestamp, parse_patch_timestamp,
                              show_side_by_side, unnormalize)
from utils.errors import UserInputError

MEAN = BigEarthNetInfo.STATISTICS["mean"]
STD = BigEarthNetInfo.STATISTICS["std"]


def iso_week(day: datetime) -> int:
    """ISO 8601 week by the ordinal-date rule (valid away from the year boundary)."""
    ordinal = day.timetuple().tm_yday
    return (ordinal - (day.weekday() + 1) + 10) // 7


def test_to_float_keeps_uint16_values_exactly():
    img = torch.tensor([[[0, 1, 65535], [7000, 25000, 40000]]], dtype=torch.uint16)
    out = ToFloat()(img)
    assert out.dtype == torch.float32
    assert out.tolist() == [[[0.0, 1.0, 65535.0], [7000.0, 25000.0, 40000.0]]]


@pytest.mark.parametrize("height,width", [(41, 41), (43, 52), (45, 44), (40, 40)])
def test_center_crop_takes_the_centre_window(height, width):
    img = torch.arange(7 * height * width).reshape(7, height, width)
    out = CenterCrop(40)(img)
    top, left = (height - 40) // 2, (width - 40) // 2
    assert out.shape == (7, 40, 40)
    assert out[0, 0, 0].item() == top * width + left
    assert torch.equal(out, img[:, top:top + 40, left:left + 40])
    assert torch.equal(CenterCrop40()(img), out)


def test_center_crop_rejects_small_images():
    with pytest.raises(UserInputError, match="39x45 pixels is smaller than the 40x40 crop"):
        CenterCrop(40)(torch.zeros(7, 39, 45))


def test_resize_is_bilinear_with_half_pixel_alignment():
    # A ramp along x: bilinear interpolation with align_corners=False samples it at
    # x_in = (x_out + 0.5) * in / out - 0.5, clamped to the image.
    ramp = torch.arange(22, dtype=torch.float32).expand(7, 22, 22).clone()
    out = Resize(40)(ramp)
    assert out.shape == (7, 40, 40) and out.dtype == torch.float32
    expected = np.clip((np.arange(40) + 0.5) * 22 / 40 - 0.5, 0, 21)
    np.testing.assert_allclose(out[3, 17].numpy(), expected, atol=1e-5)


def test_resize_keeps_constants_and_averages_when_shrinking():
    constant = torch.full((7, 22, 22), 12345, dtype=torch.uint16)
    out = Resize(40)(constant)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.full((7, 40, 40), 12345.0))
    checker = ((torch.arange(80)[:, None] + torch.arange(80)[None, :]) % 2).float()
    checker = checker.expand(7, 80, 80)
    shrunk = Resize(40)(checker)
    # antialiasing averages the fine checkerboard instead of sampling one of its colours
    assert torch.allclose(shrunk[:, 5:-5, 5:-5], torch.full((7, 30, 30), 0.5), atol=1e-5)
    assert Resize(40)(out) is out  # already the right size


def test_zscore_normalize_per_band():
    img = torch.stack([torch.full((4, 4), float(m + 2 * s)) for m, s in zip(MEAN, STD)])
    out = ZScoreNormalize(MEAN, STD)(img)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.full((7, 4, 4), 2.0))
    with pytest.raises(UserInputError, match="8 bands"):
        ZScoreNormalize(MEAN, STD)(torch.zeros(8, 4, 4))
    with pytest.raises(UserInputError, match="std"):
        ZScoreNormalize([0.0], [0.0])


def test_compose_applies_in_order_and_unnormalize_inverts():
    generator = torch.Generator().manual_seed(0)
    raw = torch.randint(7000, 25000, (7, 43, 43), generator=generator).to(torch.uint16)
    pipeline = Compose([ToFloat(), CenterCrop(40), ZScoreNormalize(MEAN, STD)])
    out = pipeline(raw)
    assert out.shape == (7, 40, 40) and out.dtype == torch.float32
    back = unnormalize(out, MEAN, STD)
    assert torch.allclose(back, raw[:, 1:41, 1:41].float(), atol=1e-2)
    batch = unnormalize(out.unsqueeze(0).repeat(2, 1, 1, 1), MEAN, STD)
    assert batch.shape == (2, 7, 40, 40) and torch.allclose(batch[1], back)
    with pytest.raises(UserInputError):
        unnormalize(out[0], MEAN, STD)


@pytest.mark.parametrize("day", [datetime(2017, 6, 13, 10, 10, 31),
                                 datetime(2018, 5, 25, 9, 40, 30),
                                 datetime(2017, 12, 8, 9, 33, 51),
                                 datetime(2018, 3, 1, 23, 0, 0)])
def test_normalize_timestamp(day):
    week, hour = normalize_timestamp(day)
    angle_week = iso_week(day) * 2 * math.pi / 52
    angle_hour = day.hour * 2 * math.pi / 24
    assert week == pytest.approx((math.sin(angle_week), math.cos(angle_week)), abs=1e-12)
    assert hour == pytest.approx((math.sin(angle_hour), math.cos(angle_hour)), abs=1e-12)
    assert all(isinstance(v, float) for v in week + hour)


def test_normalize_timestamp_uses_the_iso_week_across_new_year():
    # 1 January 2017 was a Sunday: ISO week 52 of 2016.
    week, _ = normalize_timestamp(datetime(2017, 1, 1))
    assert week == pytest.approx((math.sin(2 * math.pi), math.cos(2 * math.pi)), abs=1e-12)


def test_normalize_latlon():
    (lat_sin, lat_cos), (lon_sin, lon_cos) = normalize_latlon(90.0, -90.0)
    assert (lat_sin, lon_sin) == pytest.approx((1.0, -1.0))
    assert (lat_cos, lon_cos) == pytest.approx((0.0, 0.0), abs=1e-12)
    lat, lon = normalize_latlon(63.31, 21.27)
    assert lat == pytest.approx((math.sin(63.31 * math.pi / 180), math.cos(63.31 * math.pi / 180)))
    assert lon[0] ** 2 + lon[1] ** 2 == pytest.approx(1.0)


def test_parse_patch_timestamp_six_and_five_digit_times():
    expected = {"S2A_MSIL2A_20170613T101031_11_66": datetime(2017, 6, 13, 10, 10, 31),
                "S2B_MSIL2A_20180525T94030_78_30": datetime(2018, 5, 25, 9, 40, 30),
                "SYN_MSIL2A_20171208T093351_82_79": datetime(2017, 12, 8, 9, 33, 51)}
    for name, when in expected.items():
        assert parse_patch_timestamp(name) == when


def test_parse_patch_timestamp_legacy_reads_the_first_hour_digit_only():
    for name in ("S2A_MSIL2A_20170613T101031_11_66", "S2A_MSIL2A_20171208T093351_82_79",
                 "S2B_MSIL2A_20180525T94030_78_30", "S2A_MSIL2A_20170704T112111_85_65"):
        published = datetime.strptime(name.split("_")[2][0:10], "%Y%m%dT%H")
        assert parse_patch_timestamp(name, legacy_hour=True) == published
    assert parse_patch_timestamp("S2A_MSIL2A_20170613T101031_11_66", legacy_hour=True).hour == 1
    assert parse_patch_timestamp("S2A_MSIL2A_20171208T093351_82_79", legacy_hour=True).hour == 0
    assert parse_patch_timestamp("S2B_MSIL2A_20180525T94030_78_30", legacy_hour=True).hour == 9


@pytest.mark.parametrize("name", ["0", "patch_id", "S2A_MSIL2A_2017061T101031_1_1",
                                  "S2A_MSIL2A_20171313T101031_1_1", "S2A_MSIL2A_20170613T1010_1_1"])
def test_parse_patch_timestamp_rejects_bad_names(name):
    with pytest.raises(UserInputError, match=name):
        parse_patch_timestamp(name)


def test_show_side_by_side_writes_a_png_headless(tmp_path):
    import matplotlib.pyplot as plt

    open_before = plt.get_fignums()
    rng = torch.Generator().manual_seed(1)
    img = torch.randint(7000, 25000, (7, 40, 40), generator=rng).float()
    fig = show_side_by_side(img, img * 0.9, tmp_path / "pair.png", "input", "output")
    assert (tmp_path / "pair.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [ax.get_title() for ax in fig.axes] == ["input", "output"]
    assert plt.get_fignums() == open_before  # nothing left open in pyplot
    assert list(tmp_path.iterdir()) == [tmp_path / "pair.png"]  # no temporary file left
