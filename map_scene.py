"""Map a Landsat 8/9 C2 L2 scene: georeferenced embedding, probability and class rasters.

    python map_scene.py --config_yaml configs/map_scene.yaml [--set ...]
    torchrun --nproc_per_node=N map_scene.py --config_yaml ...   # rows split among processes

Input (``scene.path``): a folder of ``*_SR_B1.TIF`` ... ``*_SR_B7.TIF`` (+ ``*_QA_PIXEL.TIF``,
``*_MTL.txt``/``.json``) or one 7-band GeoTIFF; see datasets/landsat_scene.py. Chips, their
metadata and the skipping of fill and clouds: embed/scene_mapping.py.

Outputs in ``output.dir`` (GeoTIFFs tiled, DEFLATE-compressed, with overviews, in the scene's
CRS at chip resolution: output pixel (r, c) sits on the centre of chip (r, c); skipped chips
are nodata):

* ``embeddings.tif``: one band per embedding dimension (pooling ``cls`` or ``mean``);
* with ``probe.path`` (the JSON that train_logistic_regression.py writes beside its model):
  ``probabilities.tif``, one band per class, named; ``classes.tif``, the most probable class
  (multiclass: uint8 with a colour table and the class names; 255 = nodata) or, for a
  multilabel probe, one 0/1 band per class (probability > ``probe.threshold``);
* ``quicklook.png`` (RGB, class map with legend, a 3-component PCA of the embeddings) and
  ``map_scene.json`` (settings, grid, counts, speed).

The probe was trained on embeddings of one checkpoint with one pooling, normalisation and
metadata setting; the scene is embedded the same way. Keys left empty (null) in ``model`` and
``embed`` are taken from the probe's embedding settings, a key given with another value is an
error: a probe applied to embeddings of another kind gives confident nonsense.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import joblib
import numpy as np
import rasterio
import torch
import torch.distributed as torch_dist
import yaml
from rasterio.enums import Resampling
from tqdm import tqdm

from datasets.landsat_scene import DEFAULT_QA_FLAGS, SR_BANDS, open_scene, qa_mask
from embed.compute_embed import DTYPES
from embed.scene_mapping import (MAPPED, NORMALIZATIONS, SKIPPED_FILL, SKIPPED_QA, ChipGrid,
                                 ChipSettings, map_rows, shard_rows)
from models.moe_mae import MODEL_SIZES, build_mae
from utils.checkpoint import apply_weights, load_checkpoint, resolve_legacy_hour
from utils.config import (Field, config_arguments, dump_config, fraction, load_config,
                          model_fields, positive, unit_interval_open)
from utils.data_utils import rgb_bands, save_figure, stretch, stretch_limits
from utils.errors import UserInputError, run_cli
from utils.files import check_output_dir, write_json
from utils.geotiff import BLOCK, GDAL_CACHEMAX_MB, write_geotiff
from utils.runtime import (autocast_dtype, select_device, setup_distributed,
                           teardown_distributed)

SCENE_POOLINGS = ("cls", "mean")  # one vector per chip: one raster band per dimension
PRECISIONS = ("none", "auto", "bf16", "fp16")
NODATA_CLASS = 255
PARTS = ".map_scene.parts"

SCHEMA = {
    "model": model_fields(
        size=Field("str", None, nullable=True, choices=tuple(MODEL_SIZES),
                   help="null: the probe's embeddings', else S"),
        checkpoint_path=Field("path", None, nullable=True, must_exist="file",
                              help="null: the probe's embeddings' checkpoint"),
        device=Field("str", "auto"),
        autocast=Field("str", "none", choices=PRECISIONS,
                       help="mixed precision (bf16 on CPU); none as compute_embeddings.py")),
    "scene": {
        "path": Field("path", must_exist="any", help="folder of band files or a 7-band GeoTIFF"),
        "acquired": Field("str", None, nullable=True,
                          help="UTC time YYYY-MM-DDTHH:MM:SS when the scene has no MTL"),
        "stride": Field("int", 40, check=positive, help="pixels between chips"),
        "max_invalid_share": Field("float", 0.05, check=unit_interval_open,
                                   help="skip chips with a larger share of fill/QA pixels"),
        "qa_flags": Field("str", ",".join(DEFAULT_QA_FLAGS),
                          help="QA_PIXEL flags that make a pixel invalid, comma-separated"),
        "rows_per_band": Field("int", 4, check=positive, help="chip rows read at once"),
    },
    "embed": {
        "pooling": Field("str", None, nullable=True, choices=SCENE_POOLINGS),
        "normed": Field("bool", None, nullable=True),
        "use_metadata": Field("bool", None, nullable=True),
        "normalization": Field("str", None, nullable=True, choices=tuple(NORMALIZATIONS)),
        "legacy_hour": Field("bool", None, nullable=True,
                             help="null: what the checkpoint was trained with"),
        "dtype": Field("str", "float32", choices=tuple(DTYPES)),
        "batch_size": Field("int", 256, check=positive),
    },
    "probe": {
        "path": Field("path", None, nullable=True, must_exist="file",
                      help="probe JSON from train_logistic_regression.py"),
        "threshold": Field("float", 0.5, check=fraction, help="multilabel: label if p > it"),
    },
    "output": {
        "dir": Field("path"),
        "quicklook": Field("bool", True),
    },
}
DEFAULTS = {"size": "S", "pooling": "cls", "normed": False, "use_metadata": True,
            "normalization": "bigearthnet"}


# ------------------------------------------------------------------------------ probe


class Probe:
    """A probe from train_logistic_regression.py: the fitted model, its classes and the
    settings of the embeddings it was trained on."""

    def __init__(self, record_path: Path):
        self.record_path = record_path
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            model_path = Path(record["model_path"])
            self.class_names = list(record["class_names"])
            self.multilabel = bool(record["multilabel"])
            train = record["inputs"]["train"]
            probe_settings = record["settings"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserInputError(f"probe.path {record_path}: not a probe JSON written by "
                                 f"train_logistic_regression.py ({type(exc).__name__}: {exc})") \
                from None
        if not model_path.is_absolute() and not model_path.is_file():
            model_path = record_path.parent / model_path.name
        if not model_path.is_file():
            raise UserInputError(f"probe.path {record_path}: its model {model_path} is missing")
        self.model = joblib.load(model_path)
        self.embedding_file = train.get("path")
        self.settings = train.get("embedding_settings") or {}
        if not self.settings:
            raise UserInputError(f"probe.path {record_path}: the training embeddings "
                                 f"{self.embedding_file} have no settings (pooling, checkpoint, "
                                 f"...); embed them with compute_embeddings.py")
        if probe_settings.get("feature_slice"):
            raise UserInputError(f"probe.path {record_path}: trained on a feature slice "
                                 f"({probe_settings['feature_slice']}); the scene tool maps "
                                 f"whole cls or mean embeddings")
        self.pooled = bool(probe_settings.get("pool"))
        # multiclass score columns are the training classes (classes_), multilabel all labels
        self.columns = (list(range(len(self.class_names))) if self.multilabel
                        else [int(c) for c in self.model.model.classes_])

    def embedding_settings(self) -> dict:
        """What the training embeddings were: model size, checkpoint, pooling, normed,
        metadata, normalisation, hour encoding."""
        s = self.settings
        pooling = "mean" if self.pooled and s.get("pooling") == "all" else s.get("pooling")
        dataset_config = yaml.safe_load(s.get("config") or "{}") or {}
        data = dataset_config.get("data", {}) if isinstance(dataset_config, dict) else {}
        eurosat = s.get("dataset") == "eurosat"
        return {
            "size": s.get("model_size"), "checkpoint_path": s.get("checkpoint"),
            "pooling": pooling, "normed": s.get("normed"),
            # EuroSAT-L has no metadata: its chips were embedded with zeros whatever the setting
            "use_metadata": bool(s.get("use_metadata")) and not eurosat,
            "normalization": data.get("normalization", "bigearthnet") if eurosat
            else "bigearthnet",
            "legacy_hour": None if eurosat else s.get("legacy_hour"),
        }

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(x)


def resolve_settings(config: dict, probe: Optional[Probe]) -> dict:
    """Model and embedding keys: given ones checked against the probe's embeddings, empty ones
    filled from them (or from ``DEFAULTS`` without a probe)."""
    given = {**{k: config["model"][k] for k in ("size", "checkpoint_path")},
             **{k: config["embed"][k] for k in ("pooling", "normed", "use_metadata",
                                                "normalization")}}
    used = probe.embedding_settings() if probe else {}
    resolved = {}
    for key, value in given.items():
        section = "model" if key in ("size", "checkpoint_path") else "embed"
        trained = used.get(key)
        if value is None:
            value = trained if trained is not None else DEFAULTS.get(key)
        elif trained is not None and not _same(key, value, trained):
            raise UserInputError(f"{section}.{key} is {value!r} but the probe {probe.record_path} "
                                 f"was trained on embeddings ({probe.embedding_file}) with "
                                 f"{trained!r}; leave it empty to use theirs")
        resolved[key] = value
    if resolved["checkpoint_path"] is None:
        raise UserInputError("model.checkpoint_path is empty and there is no probe to take it "
                             "from")
    if not Path(resolved["checkpoint_path"]).is_file():
        raise UserInputError(f"checkpoint not found: {resolved['checkpoint_path']} (the probe's "
                             f"embeddings' checkpoint; set model.checkpoint_path)")
    if resolved["pooling"] not in SCENE_POOLINGS:
        raise UserInputError(f"the probe {probe.record_path} was trained on '{resolved['pooling']}'"
                             f" embeddings; the scene tool writes one vector per chip "
                             f"({' or '.join(SCENE_POOLINGS)})")
    return resolved


def _same(key: str, value, trained) -> bool:
    if key == "checkpoint_path":
        return Path(trained).is_file() and os.path.samefile(value, trained)
    return value == trained


def acquisition_time(scene, configured: Optional[str], needed: bool) -> Optional[datetime]:
    """The MTL's time, else ``scene.acquired``; an error when neither and metadata is on."""
    if scene.acquired is not None:
        return scene.acquired
    if configured is not None:
        try:
            return datetime.fromisoformat(configured.rstrip("Z")).replace(tzinfo=timezone.utc)
        except ValueError:
            raise UserInputError(f"scene.acquired: expected YYYY-MM-DDTHH:MM:SS, got "
                                 f"{configured!r}") from None
    if needed:
        raise UserInputError(f"{scene.source}: no acquisition date (no *_MTL.txt or *_MTL.json "
                             f"with DATE_ACQUIRED); set scene.acquired or embed.use_metadata=false")
    return None


# ------------------------------------------------------------------------------ parts


class Parts:
    """Per-process raw row files in ``folder``: each process appends its rows of every array
    (``name.rank``); process 0 reads any rows back by plain file reads."""

    def __init__(self, folder: Path, shards: list, cols: int):
        self.folder, self.shards, self.cols = folder, shards, cols
        self.files = {}

    def append(self, name: str, rank: int, rows: np.ndarray) -> None:
        if name not in self.files:
            self.files[name] = open(self.folder / f"{name}.{rank}", "wb")
        self.files[name].write(np.ascontiguousarray(rows).tobytes())

    def close(self) -> None:
        for file in self.files.values():
            file.close()
        self.files = {}

    def read(self, name: str, rows: range, depth: int, dtype) -> np.ndarray:
        """(len(rows), cols, depth) array of chip rows ``rows``."""
        out = np.empty((len(rows), self.cols, depth), dtype)
        row_bytes = self.cols * depth * np.dtype(dtype).itemsize
        for rank, shard in enumerate(self.shards):
            first, last = max(rows.start, shard.start), min(rows.stop, shard.stop)
            if first >= last:
                continue
            with open(self.folder / f"{name}.{rank}", "rb") as f:
                f.seek((first - shard.start) * row_bytes)
                data = np.frombuffer(f.read((last - first) * row_bytes), dtype)
            out[first - rows.start:last - rows.start] = data.reshape(last - first, self.cols,
                                                                     depth)
        return out

    def blocks(self, name: str, total_rows: int, depth: int, dtype, convert=None):
        """(first_row, (bands, rows, cols)) blocks for write_geotiff; ``convert`` maps a
        (rows, cols, depth) block to (bands, rows, cols) (default: a transpose)."""
        for first in range(0, total_rows, BLOCK):
            block = self.read(name, range(first, min(first + BLOCK, total_rows)), depth, dtype)
            yield first, convert(block) if convert else block.transpose(2, 0, 1)


# ------------------------------------------------------------------------------ outputs


def colour_table(count: int) -> dict:
    """RGBA colours of classes 0..count-1 (matplotlib's tab10/tab20), nodata transparent."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    table = {i: tuple(int(255 * v) for v in cmap(i % cmap.N)) for i in range(count)}
    table[NODATA_CLASS] = (0, 0, 0, 0)
    return table


def write_outputs(out: Path, parts: Parts, grid: ChipGrid, scene, embed_dim: int,
                  embed_dtype: str, probe: Optional[Probe], threshold: float,
                  tags: dict) -> tuple:
    """The rasters from the parts; returns (file names written, per-class chip counts)."""
    georef = dict(height=grid.rows, width=grid.cols, crs=scene.crs,
                  transform=grid.output_transform(scene.transform))
    pooling = tags["pooling"]
    write_geotiff(out / "embeddings.tif", parts.blocks("embeddings", grid.rows, embed_dim,
                                                       np.float32),
                  count=embed_dim, dtype=embed_dtype, nodata=float("nan"),
                  band_names=[f"{pooling}_{i:03d}" for i in range(embed_dim)], tags=tags,
                  **georef)
    if probe is None:
        return ["embeddings.tif"], {}
    names = [probe.class_names[c] for c in probe.columns]
    k = len(probe.columns)
    write_geotiff(out / "probabilities.tif", parts.blocks("scores", grid.rows, k, np.float32),
                  count=k, dtype="float32", nodata=float("nan"), band_names=names,
                  tags={**tags, "probe": probe.record_path}, **georef)
    if probe.multilabel:
        def labels(block):
            bands = (block > threshold).astype(np.uint8).transpose(2, 0, 1)
            bands[:, np.isnan(block[..., 0])] = NODATA_CLASS
            return bands
        write_geotiff(out / "classes.tif", parts.blocks("scores", grid.rows, k, np.float32,
                                                        labels),
                      count=k, dtype="uint8", nodata=NODATA_CLASS, band_names=names,
                      tags={**tags, "threshold": threshold}, resampling=Resampling.nearest,
                      **georef)
    else:
        columns = np.asarray(probe.columns)

        def labels(block):
            classes = columns[np.nan_to_num(block, nan=-1).argmax(axis=2)].astype(np.uint8)
            classes[np.isnan(block[..., 0])] = NODATA_CLASS
            return classes[None]
        write_geotiff(out / "classes.tif", parts.blocks("scores", grid.rows, k, np.float32,
                                                        labels),
                      count=1, dtype="uint8", nodata=NODATA_CLASS, band_names=["class"],
                      tags={**tags, "class_names": json.dumps(probe.class_names),
                            **{f"CLASS_{i}": name for i, name in enumerate(probe.class_names)}},
                      colour_table=colour_table(len(probe.class_names)),
                      resampling=Resampling.nearest, **georef)
    counts = np.zeros(len(probe.class_names), np.int64)
    for _, block in parts.blocks("scores", grid.rows, k, np.float32, lambda b: b):
        valid = ~np.isnan(block[..., 0])
        if probe.multilabel:
            counts += (block[valid] > threshold).sum(axis=0)
        else:
            np.add.at(counts, np.asarray(probe.columns)[block[valid].argmax(axis=1)], 1)
    return (["embeddings.tif", "probabilities.tif", "classes.tif"],
            {name: int(n) for name, n in zip(probe.class_names, counts)})


def quicklook(path: Path, parts: Parts, grid: ChipGrid, scene, embed_dim: int,
              probe: Optional[Probe], title: str) -> None:
    """RGB of the scene, the class map (most probable class) and a PCA of the embeddings."""
    from matplotlib.figure import Figure
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from sklearn.decomposition import PCA

    scale = min(1.0, 600 / max(scene.height, scene.width))
    rgb = rgb_bands(scene.read_decimated(max(1, round(scene.height * scale)),
                                         max(1, round(scene.width * scale))), SR_BANDS)
    valid_rgb = rgb[(rgb > 0).all(axis=2)]
    rgb = stretch(rgb, stretch_limits(valid_rgb if len(valid_rgb) else rgb))
    panels = 2 + (probe is not None)
    fig = Figure(figsize=(5 * panels, 5.4))
    axes = fig.subplots(1, panels)
    extent = (0, scene.width, scene.height, 0)
    axes[0].imshow(rgb, extent=extent)
    axes[0].set_title("scene (SR_B4, SR_B3, SR_B2)")
    # chips' footprints span their centres +- stride / 2 on the maps
    half = (grid.chip - grid.stride) / 2
    map_extent = (half, half + grid.cols * grid.stride, half + grid.rows * grid.stride, half)

    embeddings = parts.read("embeddings", range(grid.rows), embed_dim, np.float32)
    valid = ~np.isnan(embeddings[..., 0])
    pca_image = np.ones((grid.rows, grid.cols, 3))
    if valid.sum() >= 3:
        vectors = embeddings[valid]
        rng = np.random.default_rng(0)
        sample = vectors[rng.choice(len(vectors), min(len(vectors), 20000), replace=False)]
        components = PCA(3, random_state=0).fit(sample).transform(vectors)
        low, high = np.percentile(components, [2, 98], axis=0)
        pca_image[valid] = np.clip((components - low) / np.maximum(high - low, 1e-12), 0, 1)
    axes[-1].imshow(pca_image, extent=map_extent, interpolation="nearest")
    axes[-1].set_title("embeddings: 3-component PCA")

    if probe is not None:
        k = len(probe.columns)
        scores = parts.read("scores", range(grid.rows), k, np.float32)
        top = np.asarray(probe.columns)[np.nan_to_num(scores, nan=-1).argmax(axis=2)]
        table = colour_table(len(probe.class_names))
        cmap = ListedColormap([np.asarray(table[i]) / 255 for i in range(len(probe.class_names))])
        shown = np.ma.masked_array(top, ~valid)
        axes[1].imshow(shown, cmap=cmap, vmin=-0.5, vmax=len(probe.class_names) - 0.5,
                       extent=map_extent, interpolation="nearest")
        axes[1].set_title("most probable " + ("label" if probe.multilabel else "class"))
        present = sorted(set(top[valid].tolist()))
        axes[1].legend(handles=[Patch(color=cmap(i), label=probe.class_names[i]) for i in present],
                       loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2, fontsize=7,
                       frameon=False)
    for ax in axes:
        ax.set_xlim(0, scene.width)
        ax.set_ylim(scene.height, 0)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


# ------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    args = config_arguments("Map a Landsat scene with a frozen encoder and a probe.").parse_args(
        argv)
    config = load_config(args.config_yaml, SCHEMA, args.set)
    # GDAL's block cache would otherwise grow to 5% of the RAM with the scene's strips
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHEMAX_MB):
        return map_scene(config)


def map_scene(config: dict) -> int:
    """Map the scene of a validated config (see the module docstring)."""
    model_cfg, scene_cfg, embed_cfg = config["model"], config["scene"], config["embed"]
    out = Path(config["output"]["dir"])
    check_output_dir(out, "output.dir")
    mask = qa_mask([flag.strip() for flag in scene_cfg["qa_flags"].split(",") if flag.strip()])
    probe = Probe(Path(config["probe"]["path"])) if config["probe"]["path"] else None
    resolved = resolve_settings(config, probe)
    scene = open_scene(scene_cfg["path"])
    acquired = acquisition_time(scene, scene_cfg["acquired"], resolved["use_metadata"])
    grid = ChipGrid(scene.height, scene.width, model_cfg["img_size"], scene_cfg["stride"])
    if grid.rows == 0 or grid.cols == 0:
        raise UserInputError(f"{scene.source}: {scene.height}x{scene.width} pixels is smaller "
                             f"than one {grid.chip}x{grid.chip} chip")

    checkpoint_path = resolved["checkpoint_path"]
    checkpoint = load_checkpoint(checkpoint_path)
    legacy_hour = resolve_legacy_hour(embed_cfg["legacy_hour"], checkpoint, checkpoint_path)
    trained_hour = probe.embedding_settings()["legacy_hour"] if probe else None
    if resolved["use_metadata"] and trained_hour is not None and trained_hour != legacy_hour:
        raise UserInputError(f"embed.legacy_hour is {legacy_hour} for {checkpoint_path} but the "
                             f"probe's embeddings ({probe.embedding_file}) used {trained_hour}")
    mae = build_mae(resolved["size"], model_cfg["img_size"], model_cfg["patch_size"],
                    model_cfg["in_channels"])
    apply_weights(mae, checkpoint, checkpoint_path)
    del checkpoint
    settings = ChipSettings(
        pooling=resolved["pooling"], normed=resolved["normed"],
        use_metadata=resolved["use_metadata"], normalization=resolved["normalization"],
        legacy_hour=legacy_hour, acquired=acquired,
        max_invalid_share=scene_cfg["max_invalid_share"], qa_mask=mask,
        batch_size=embed_cfg["batch_size"], rows_per_band=scene_cfg["rows_per_band"])

    dist = setup_distributed()
    parts_dir = out / PARTS
    try:
        device = select_device(model_cfg["device"], dist.local_rank, key="model.device")
        precision = model_cfg["autocast"]
        amp = None if precision == "none" else (
            autocast_dtype(device, precision) if device.type == "cuda"
            else torch.float16 if precision == "fp16" else torch.bfloat16)
        encoder = mae.encoder.to(device).eval()
        if dist.is_main:
            shutil.rmtree(parts_dir, ignore_errors=True)
            parts_dir.mkdir(parents=True)
        if dist.world_size > 1:
            torch_dist.barrier()
        shards = [shard_rows(grid, settings.rows_per_band, rank, dist.world_size)
                  for rank in range(dist.world_size)]
        parts = Parts(parts_dir, shards, grid.cols)
        k = len(probe.columns) if probe else 0
        started = time.perf_counter()
        bands = map_rows(encoder, scene, grid, shards[dist.rank], settings, encoder.embed_dim,
                         device, probe, k, amp)
        total = -(-len(shards[dist.rank]) // settings.rows_per_band)
        for band in tqdm(bands, total=total, desc="mapping", disable=not dist.is_main,
                         mininterval=1.0):
            parts.append("status", dist.rank, band.status[..., None])
            parts.append("embeddings", dist.rank, band.embeddings)
            if probe is not None:
                parts.append("scores", dist.rank, band.scores)
        parts.close()
        seconds = time.perf_counter() - started
        if dist.world_size > 1:
            torch_dist.barrier()
        if dist.is_main:
            status = parts.read("status", range(grid.rows), 1, np.uint8)[..., 0]
            tags = {"pooling": settings.pooling, "normed": settings.normed,
                    "use_metadata": settings.use_metadata, "checkpoint": checkpoint_path,
                    "chip_size": grid.chip, "stride": grid.stride, "source": scene.source}
            written, class_counts = write_outputs(out, parts, grid, scene, encoder.embed_dim,
                                         embed_cfg["dtype"], probe, config["probe"]["threshold"],
                                         tags)
            if config["output"]["quicklook"]:
                quicklook(out / "quicklook.png", parts, grid, scene, encoder.embed_dim, probe,
                          f"{Path(scene.source).name}: {grid.rows}x{grid.cols} chips, stride "
                          f"{grid.stride}")
                written.append("quicklook.png")
            mapped = int((status == MAPPED).sum())
            record = {
                "scene": {"source": str(scene.source), "files": [str(p) for p in scene.band_files],
                          "qa_file": str(scene.qa_file) if scene.qa_file else None,
                          "mtl_file": str(scene.mtl_file) if scene.mtl_file else None,
                          "height": scene.height, "width": scene.width,
                          "crs": scene.crs.to_string(),
                          "acquired": acquired.isoformat() if acquired else None},
                "grid": {"rows": grid.rows, "cols": grid.cols, "chip": grid.chip,
                         "stride": grid.stride,
                         "transform": list(grid.output_transform(scene.transform))[:6]},
                "embedding": {**resolved, "legacy_hour": legacy_hour, "dtype": embed_cfg["dtype"],
                              "embed_dim": encoder.embed_dim},
                "probe": None if probe is None else {
                    "path": str(probe.record_path), "embeddings": probe.embedding_file,
                    "multilabel": probe.multilabel, "class_names": probe.class_names,
                    "threshold": config["probe"]["threshold"] if probe.multilabel else None},
                "counts": {"chips": int(status.size), "mapped": mapped,
                           "skipped_fill": int((status == SKIPPED_FILL).sum()),
                           "skipped_qa": int((status == SKIPPED_QA).sum()),
                           "classes": class_counts},
                "seconds": round(seconds, 2),
                "chips_per_second": round(mapped / seconds, 1) if seconds > 0 else None,
                "device": str(device), "processes": dist.world_size,
                "outputs": written + ["map_scene.json"],
                "config": dump_config(config),
            }
            write_json(out / "map_scene.json", record)
            print(f"[mapped] {mapped} of {status.size} chips ({record['counts']['skipped_fill']} "
                  f"fill, {record['counts']['skipped_qa']} QA-flagged skipped) in {seconds:.1f} s "
                  f"-> {out}", flush=True)
        if dist.world_size > 1:
            torch_dist.barrier()
    finally:
        scene.close()
        if dist.is_main:
            shutil.rmtree(parts_dir, ignore_errors=True)
        teardown_distributed(dist)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_cli(main)
