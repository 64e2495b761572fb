"""Scene mapping (map_scene.py): chip grid georeferencing, embeddings equal to the encoder's on
directly read windows, chip latitudes/longitudes, fill and cloud skipping, one-line errors, a
probe trained on the sample mapping the synthetic scene's regions, torchrun, bounded memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.warp import transform as warp_transform

import compute_embeddings
import map_scene
import train_logistic_regression
from datasets.builders import bigearthnet_transform
from datasets.landsat_scene import open_scene, read_mtl_time
from embed.scene_mapping import MAPPED, ChipGrid, chip_latlon
from models.moe_mae import build_mae
from sample_dataset.generate_scene import (ACQUIRED, PRODUCT, SCENE_LEFT, SCENE_TOP, generate_scene,
                                           region_class)
from utils.checkpoint import load_weights
from utils.data_utils import normalize_latlon, normalize_timestamp
from utils.errors import one_line
from utils.runtime import run_script_with_peak_rss

REPO = Path(__file__).resolve().parents[1]
EUROSAT = REPO / "sample_dataset" / "eurosat_l"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
QA_SKIP_BITS = 0b11011  # fill, dilated cloud, cloud, cloud shadow: the default qa_flags


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A seeded XXS MAE; it says it was trained with the correct hour (legacy_hour False)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "xxs.pth"
    torch.save({"model_state": build_mae("XXS").state_dict(), "legacy_hour": False}, path)
    return path


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scene")
    generate_scene(folder, 200, 240, seed=1, region_size=80)
    return folder


def run(config: Path, out: Path, *overrides: str, scene: Path = None,
        checkpoint: Path = None) -> list:
    args = ["--config_yaml", str(config), "--set", f"output.dir={out}"]
    if scene is not None:
        args += ["--set", f"scene.path={scene}"]
    if checkpoint is not None:
        args += ["--set", f"model.checkpoint_path={checkpoint}", "--set", "model.size=XXS"]
    for override in overrides:
        args += ["--set", override]
    return args


CONFIG = REPO / "configs" / "map_scene.yaml"


@pytest.fixture(scope="module")
def mapped(tmp_path_factory, scene_dir, checkpoint) -> Path:
    """The scene mapped at stride 40 with metadata, skipping any chip with a bad pixel."""
    out = tmp_path_factory.mktemp("mapped")
    assert map_scene.main(run(CONFIG, out, "scene.max_invalid_share=0.0", "embed.batch_size=7",
                              scene=scene_dir, checkpoint=checkpoint)) == 0
    return out


@pytest.fixture(scope="module")
def probe(tmp_path_factory, checkpoint) -> Path:
    """A logistic-regression probe on CLS embeddings of the EuroSAT-L sample's training split."""
    folder = tmp_path_factory.mktemp("probe")
    assert compute_embeddings.main([
        "--config_yaml", str(REPO / "configs" / "embed_eurosat.yaml"),
        "--set", f"model.checkpoint_path={checkpoint}", "--set", "model.size=XXS",
        "--set", f"data.dataset_path={EUROSAT}", "--set", "data.num_workers=0",
        "--set", f"data.splits={{train: {EUROSAT / 'eurosat-train.txt'}}}",
        "--set", f"embed.output_dir={folder}", "--set", "embed.name=eurosat"]) == 0
    assert train_logistic_regression.main([
        "--train", str(folder / "eurosat_train.npz"), "--out", str(folder), "--name", "es",
        "--n-jobs", "1"]) == 0
    return next(folder.glob("es_*.json"))


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


# ----------------------------------------------------------------------- georeferencing


def assert_chips_centred(out: Path, scene_height: int, scene_width: int, stride: int) -> None:
    """embeddings.tif: scene CRS, one pixel per chip, the centre of pixel (r, c) on the centre
    of the 40x40 window at (r * stride, c * stride) of the scene (30 m pixels, top-left at the
    generator's corner)."""
    with rasterio.open(out / "embeddings.tif") as emb:
        assert emb.crs == CRS.from_epsg(32633)
        assert (emb.height, emb.width) == ((scene_height - 40) // stride + 1,
                                           (scene_width - 40) // stride + 1)
        assert emb.res == (30.0 * stride, 30.0 * stride)
        for r in range(emb.height):
            for c in range(emb.width):
                centre = (SCENE_LEFT + 30 * (c * stride + 20), SCENE_TOP - 30 * (r * stride + 20))
                assert emb.xy(r, c) == pytest.approx(centre, abs=1e-6)
        assert emb.overviews(1) and emb.profile["tiled"] and emb.compression.name == "deflate"


def test_output_pixel_of_chip_r_c_sits_on_the_chip_centre_stride_40(mapped):
    assert_chips_centred(mapped, 200, 240, 40)


def test_output_pixel_of_chip_r_c_sits_on_the_chip_centre_stride_20(tmp_path, checkpoint):
    scene = tmp_path / "scene"
    generate_scene(scene, 100, 120, seed=2, region_size=80)
    assert map_scene.main(run(CONFIG, tmp_path / "out", "scene.stride=20",
                              "output.quicklook=false", scene=scene, checkpoint=checkpoint)) == 0
    assert_chips_centred(tmp_path / "out", 100, 120, 20)


def test_chip_latlon_matches_a_direct_reprojection_of_each_chip_centre(scene_dir):
    scene = open_scene(scene_dir)
    grid = ChipGrid(scene.height, scene.width, 40, 20)
    lats, lons = chip_latlon(scene, grid, range(1, grid.rows))
    for i, r in enumerate(range(1, grid.rows)):
        for c in range(grid.cols):
            x, y = rasterio.transform.xy(scene.transform, r * 20 + 20, c * 20 + 20, offset="ul")
            (lon,), (lat,) = warp_transform(scene.crs, CRS.from_epsg(4326), [x], [y])
            assert (lats[i, c], lons[i, c]) == pytest.approx((lat, lon), abs=1e-9)
    assert 48 < lats.mean() < 49 and 13 < lons.mean() < 14  # UTM 33N near Salzburg


# ----------------------------------------------------------------------- embeddings


def test_embedding_at_r_c_is_the_encoder_on_the_window_read_directly(mapped, scene_dir,
                                                                     checkpoint):
    mae = build_mae("XXS")
    load_weights(mae, checkpoint)
    encoder = mae.encoder.eval()
    embeddings = read(mapped / "embeddings.tif")
    valid = np.argwhere(~np.isnan(embeddings[0]))
    assert len(valid) >= 3
    week, hour = normalize_timestamp(datetime(2021, 7, 14, 9, 53, 41))  # the MTL's, correct hour
    band_files = [next(scene_dir.glob(f"*_SR_B{b}.TIF")) for b in range(1, 8)]
    with rasterio.open(band_files[0]) as first:
        transform, crs = first.transform, first.crs
    images, metas = [], []
    for r, c in valid:
        window = rasterio.windows.Window(c * 40, r * 40, 40, 40)
        pixels = np.stack([rasterio.open(f).read(1, window=window) for f in band_files])
        images.append(bigearthnet_transform(40)(torch.from_numpy(pixels.astype(np.int32))))
        x, y = rasterio.transform.xy(transform, r * 40 + 20, c * 40 + 20, offset="ul")
        (lon,), (lat,) = warp_transform(crs, CRS.from_epsg(4326), [x], [y])
        metas.append((week, hour, *normalize_latlon(lat, lon)))
    meta = torch.tensor(metas, dtype=torch.float32).unbind(1)  # 4 x (n, 2)
    with torch.no_grad():
        expected = encoder.embed(torch.stack(images), *meta, pooling="cls", normed=False)
    np.testing.assert_allclose(embeddings[:, valid[:, 0], valid[:, 1]].T, expected.numpy(),
                               rtol=1e-4, atol=1e-5)
    record = json.loads((mapped / "map_scene.json").read_text())
    assert record["embedding"]["legacy_hour"] is False  # from the checkpoint's key


def test_fill_and_cloudy_chips_are_nodata_exactly_where_they_hold_bad_pixels(mapped, scene_dir):
    bands = np.stack([read(next(scene_dir.glob(f"*_SR_B{b}.TIF")))[0] for b in range(1, 8)])
    qa = read(next(scene_dir.glob("*_QA_PIXEL.TIF")))[0]
    fill = (bands == 0).any(axis=0)
    bad = fill | ((qa & QA_SKIP_BITS) != 0)
    embeddings = read(mapped / "embeddings.tif")
    kinds = set()
    for r in range(embeddings.shape[1]):
        for c in range(embeddings.shape[2]):
            window = (slice(r * 40, r * 40 + 40), slice(c * 40, c * 40 + 40))
            skipped = bool(bad[window].any())  # max_invalid_share 0: any bad pixel
            assert np.isnan(embeddings[:, r, c]).all() == skipped, (r, c)
            assert np.isfinite(embeddings[:, r, c]).all() == (not skipped), (r, c)
            kinds.add("fill" if fill[window].any() else "qa" if skipped else "mapped")
    assert kinds == {"fill", "qa", "mapped"}  # the scene has all three
    counts = json.loads((mapped / "map_scene.json").read_text())["counts"]
    assert counts["skipped_qa"] >= 1 and counts["skipped_fill"] >= 1
    assert counts["mapped"] == int(np.isfinite(embeddings[0]).sum())
    with rasterio.open(mapped / "embeddings.tif") as src:
        assert np.isnan(src.nodata)
        assert src.descriptions[0] == "cls_000"


# ----------------------------------------------------------------------- the probe


def test_a_probe_trained_on_the_sample_maps_the_synthetic_regions(tmp_path, probe):
    scene = tmp_path / "scene"
    truth = generate_scene(scene, 320, 320, seed=3, region_size=80)
    out = tmp_path / "out"
    assert map_scene.main(run(CONFIG, out, f"probe.path={probe}", scene=scene)) == 0
    classes = read(out / "classes.tif")[0]
    rows, cols = np.mgrid[0:classes.shape[0], 0:classes.shape[1]]
    expected = region_class(truth, rows * 40 + 20, cols * 40 + 20)
    region = (rows * 40 + 20) // 80 * 100 + (cols * 40 + 20) // 80
    mapped = classes != 255
    correct = [np.mean(classes[mapped & (region == k)] == expected[mapped & (region == k)])
               for k in np.unique(region[mapped])]
    assert len(correct) >= 6
    assert np.mean(correct) >= 0.6  # chance: 0.1 (10 classes)
    probabilities = read(out / "probabilities.tif")
    assert probabilities.shape[0] == 10
    np.testing.assert_allclose(np.nansum(probabilities, axis=0)[mapped], 1.0, atol=1e-5)
    with rasterio.open(out / "classes.tif") as src:
        assert src.tags()["CLASS_9"] == "SeaLake" and src.colormap(1)[0][3] == 255
    record = json.loads((out / "map_scene.json").read_text())
    # EuroSAT-L embeddings carry no metadata, so the scene's chips get none either
    assert record["embedding"]["use_metadata"] is False
    assert record["embedding"]["pooling"] == "cls"
    assert (out / "quicklook.png").stat().st_size > 10_000


# ----------------------------------------------------------------------- errors


def copy_scene(scene_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "scene"
    shutil.copytree(scene_dir, target)
    return target


def assert_exit_2(exit_status, capsys, args, *fragments) -> None:
    assert exit_status(map_scene.main, args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in one_line(err), err


def test_band_files_on_another_grid_exit_2(tmp_path, scene_dir, checkpoint, exit_status,
                                           capsys):
    scene = copy_scene(scene_dir, tmp_path)
    band = scene / f"{PRODUCT}_SR_B3.TIF"
    with rasterio.open(band) as src:
        profile, pixels = src.profile, src.read()
    profile["transform"] = Affine.translation(30, 0) @ profile["transform"]  # one pixel east
    with rasterio.open(band, "w", **profile) as dst:
        dst.write(pixels)
    assert_exit_2(exit_status, capsys, run(CONFIG, tmp_path / "out", scene=scene,
                                           checkpoint=checkpoint), "SR_B3.TIF", "transform")
    assert not (tmp_path / "out" / "embeddings.tif").exists()


def test_a_missing_band_exits_2(tmp_path, scene_dir, checkpoint, exit_status, capsys):
    scene = copy_scene(scene_dir, tmp_path)
    (scene / f"{PRODUCT}_SR_B5.TIF").unlink()
    assert_exit_2(exit_status, capsys, run(CONFIG, tmp_path / "out", scene=scene,
                                           checkpoint=checkpoint), "SR_B5")


def test_no_acquisition_date_exits_2_unless_given(tmp_path, scene_dir, checkpoint, exit_status,
                                                  capsys):
    scene = copy_scene(scene_dir, tmp_path)
    mtl = scene / f"{PRODUCT}_MTL.txt"
    text = mtl.read_text()
    mtl.unlink()
    assert_exit_2(exit_status, capsys, run(CONFIG, tmp_path / "out", scene=scene,
                                           checkpoint=checkpoint), "no acquisition date")
    mtl.write_text(text.replace("DATE_ACQUIRED", "DATE_PROCESSED"))
    assert_exit_2(exit_status, capsys, run(CONFIG, tmp_path / "out", scene=scene,
                                           checkpoint=checkpoint), "no DATE_ACQUIRED")
    mtl.write_text(text)
    assert read_mtl_time(mtl) == ACQUIRED.replace(tzinfo=read_mtl_time(mtl).tzinfo)


@pytest.mark.parametrize("override,fragment", [
    ("embed.pooling=mean", "embed.pooling is 'mean'"),
    ("embed.use_metadata=true", "embed.use_metadata is True"),
    ("embed.normalization=eurosat", "embed.normalization is 'eurosat'"),
    ("model.size=XS", "model.size is 'XS'"),
])
def test_settings_that_differ_from_the_probes_embeddings_exit_2(tmp_path, scene_dir, probe,
                                                                exit_status, capsys, override,
                                                                fragment):
    assert_exit_2(exit_status, capsys, run(CONFIG, tmp_path / "out", f"probe.path={probe}",
                                           override, scene=scene_dir), fragment, probe.name)


def test_another_checkpoint_than_the_probes_exits_2(tmp_path, scene_dir, probe, checkpoint,
                                                   exit_status, capsys):
    other = tmp_path / "other.pth"
    shutil.copyfile(checkpoint, other)
    assert_exit_2(exit_status, capsys, run(CONFIG, tmp_path / "out", f"probe.path={probe}",
                                           f"model.checkpoint_path={other}", scene=scene_dir),
                  "model.checkpoint_path", str(other))


def test_hour_encoding_from_config_then_checkpoint_then_published_default():
    assert map_scene.resolve_legacy_hour(False, {"legacy_hour": True}, "c") is False
    assert map_scene.resolve_legacy_hour(None, {"legacy_hour": False}, "c") is False
    assert map_scene.resolve_legacy_hour(None, {}, "c") is True


# ----------------------------------------------------------------------- processes


def map_in_subprocess(args: list, torchrun: int = 0) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone",
                     f"--nproc_per_node={torchrun}"]
    return subprocess.run(launcher + [str(REPO / "map_scene.py"), *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_with_two_processes_writes_the_single_process_maps(tmp_path, scene_dir, probe):
    outputs = {}
    for processes in (0, 2):
        out = tmp_path / f"out{processes}"
        result = map_in_subprocess(run(CONFIG, out, f"probe.path={probe}", "scene.stride=40",
                                       "scene.rows_per_band=2", "output.quicklook=false",
                                       scene=scene_dir), torchrun=processes)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs[processes] = out
    for name in ("embeddings.tif", "probabilities.tif", "classes.tif"):
        single, split = read(outputs[0] / name), read(outputs[2] / name)
        np.testing.assert_array_equal(single, split)
    assert np.isfinite(read(outputs[0] / "embeddings.tif")).any()
    assert json.loads((outputs[2] / "map_scene.json").read_text())["processes"] == 2
    assert not list(outputs[2].glob(".*"))  # no parts or temporaries left


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_scene(tmp_path, checkpoint):
    peaks = {}
    for side in (3000, 6000):
        scene = tmp_path / f"scene{side}"
        generate_scene(scene, side, side, seed=4, layout="stack", region_size=600)
        args = run(CONFIG, tmp_path / f"out{side}", "scene.stride=1000", scene=next(scene.glob("*_SR.TIF")), checkpoint=checkpoint)
        result, peaks[side] = run_script_with_peak_rss(REPO / "map_scene.py", args, cwd=REPO,
                                                       env=ENV, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        record = json.loads((tmp_path / f"out{side}" / "map_scene.json").read_text())
        assert record["counts"]["mapped"] > 0
        shutil.rmtree(scene)
    scene_growth = (6000 ** 2 - 3000 ** 2) * 7 * 2  # 378 MB more pixels
    # what remains grows with the scene's width (one row band), not with its area
    assert peaks[6000] - peaks[3000] < 0.1 * scene_growth, peaks
