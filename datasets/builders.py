"""The datasets and transforms that the scripts build from their configs.

BigEarthNet-L: centre crop to the model's size and z-score with BEN-L statistics; raw GeoTIFFs
(a root with images/ and labels/ plus a split CSV) or a packed directory written by
``python -m datasets.pack`` (chosen by ``format``, or detected by its info.json).

EuroSAT-L: bilinear resize of the ~22x22 chips to the model's size, z-scored with BEN-L
statistics as published (or EuroSAT-L's own with ``normalization: eurosat``); no metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from datasets.bigearthnet import MAX_CHIP_SIZE, BigEarthNetDatasetLS
from datasets.eurosat import EuroSATDatasetLS
from datasets.pack import CROP_SIZE, PackedBigEarthNetDataset
from transformation.transformer import CenterCrop, Compose, Resize, ToFloat, ZScoreNormalize
from utils.config import Field, positive, non_negative
from utils.data_config import BigEarthNetInfo, EuroSATInfo
from utils.errors import UserInputError

FORMATS = ("auto", "raw", "packed")
DATASETS = ("bigearthnet", "eurosat")

# The ``data`` config section shared by the evaluation and embedding scripts.
DATA_FIELDS = {
    "dataset": Field("str", "bigearthnet", choices=DATASETS),
    "dataset_path": Field("path", None, nullable=True, must_exist="dir",
                          help="BEN-L root, or the EuroSAT-L folder of class folders"),
    "dataset_format": Field("str", "auto", choices=FORMATS, help="BEN-L only"),
    "num_classes": Field("int", 19, choices=(19, 43), help="BEN-L targets"),
    "legacy_hour": Field("bool", None, nullable=True,
                         help="BEN-L: the published first-digit hour encoding; null: the "
                              "checkpoint's (resolved by the scripts before any split is built)"),
    "skip_invalid": Field("bool", False, help="BEN-L: skip patches without image (or, when "
                                              "labels are read, label) file"),
    "supervised": Field("bool", True, help="BEN-L: read the labels; false: images only, no "
                                           "label files needed (embeddings get an empty y)"),
    "max_chip_size": Field("int", MAX_CHIP_SIZE, check=positive,
                           help="larger chips are errors (not silently cropped or resized)"),
    "normalization": Field("str", "bigearthnet", choices=DATASETS,
                           help="EuroSAT-L: statistics for the z-score (published: bigearthnet)"),
    "strict": Field("bool", True, help="EuroSAT-L: unmatched split entries are errors"),
    "batch_size": Field("int", 256, check=positive),
    "num_workers": Field("int", 4, check=non_negative),
}


def bigearthnet_transform(img_size: int = 40) -> Compose:
    """uint16 chip (7, H, W) -> float32 (7, img_size, img_size), z-scored with BEN-L statistics."""
    stats = BigEarthNetInfo.STATISTICS
    return Compose([ToFloat(), CenterCrop(img_size), ZScoreNormalize(stats["mean"], stats["std"])])


def eurosat_transform(img_size: int = 40, normalization: str = "bigearthnet") -> Compose:
    """uint16 chip (7, ~22, ~22) -> float32 (7, img_size, img_size), bilinear, z-scored."""
    stats = (BigEarthNetInfo if normalization == "bigearthnet" else EuroSATInfo).STATISTICS
    return Compose([ToFloat(), Resize(img_size), ZScoreNormalize(stats["mean"], stats["std"])])


def is_packed(path) -> bool:
    return (Path(path) / "info.json").is_file()


def check_split_source(path, csv: Optional[str], fmt: str = "auto", path_key: str = "path",
                       csv_key: str = "csv") -> bool:
    """A BEN-L source is a raw root with a split CSV, or a packed folder without one (its split
    was fixed when packing: a CSV given beside it would be silently ignored). Returns whether
    it is packed; ``path_key``/``csv_key`` name the config keys in the messages."""
    if fmt not in FORMATS:
        raise UserInputError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}")
    packed = is_packed(path) if fmt == "auto" else fmt == "packed"
    if packed and csv:
        raise UserInputError(f"{csv_key} {csv} is given, but {path_key} {path} is a packed "
                             f"folder, whose split was fixed when it was packed; remove "
                             f"{csv_key} (or pack that split)")
    if not packed and not csv:
        raise UserInputError(f"{csv_key} is required for the raw BigEarthNet-L dataset at "
                             f"{path} ({path_key})")
    return packed


def build_bigearthnet(path, csv: Optional[str] = None, fmt: str = "auto", *, img_size: int = 40,
                      supervised: bool = False, num_classes: int = 19, legacy_hour: bool = False,
                      skip_invalid: bool = False, max_chip_size: int = MAX_CHIP_SIZE,
                      allow_unlabelled: bool = False):
    """A BEN-L split: raw (``path`` = root, ``csv`` = split) or packed (``path`` = packed dir).
    Both return the same sample tuples."""
    packed = check_split_source(path, csv, fmt, "dataset path", "split CSV")
    transform = bigearthnet_transform(img_size)
    if packed:
        if img_size > CROP_SIZE:
            raise UserInputError(f"{path}: packed chips are {CROP_SIZE}x{CROP_SIZE} pixels, "
                                 f"smaller than the model input {img_size}")
        return PackedBigEarthNetDataset(path, transform=transform, supervised=supervised,
                                        num_classes=num_classes, legacy_hour=legacy_hour,
                                        skip_invalid=skip_invalid,
                                        allow_unlabelled=allow_unlabelled)
    return BigEarthNetDatasetLS(csv, path, transform=transform, supervised=supervised,
                                num_classes=num_classes, legacy_hour=legacy_hour,
                                skip_invalid=skip_invalid, chip_size=img_size,
                                max_chip_size=max_chip_size, allow_unlabelled=allow_unlabelled)


def build_split(data: dict, split: str, img_size: int = 40, supervised: Optional[bool] = None,
                allow_unlabelled: bool = False):
    """A split from a ``data`` config section (see DATA_FIELDS). ``split``: a BEN-L split CSV
    (under ``data.dataset_path``) or packed directory, or a EuroSAT-L split file.
    ``supervised`` defaults to ``data["supervised"]`` (BEN-L; EuroSAT-L's labels are its
    folders); ``allow_unlabelled``: see :class:`BigEarthNetDatasetLS`."""
    max_chip_size = data.get("max_chip_size", MAX_CHIP_SIZE)
    if data["dataset"] == "eurosat":
        if not data["dataset_path"]:
            raise UserInputError("data.dataset_path (the EuroSAT-L class folders) is required")
        return EuroSATDatasetLS(data["dataset_path"], split,
                                transform=eurosat_transform(img_size, data["normalization"]),
                                strict=data["strict"], max_chip_size=max_chip_size)
    if supervised is None:
        supervised = data.get("supervised", True)
    options = dict(img_size=img_size, supervised=supervised, num_classes=data["num_classes"],
                   legacy_hour=data["legacy_hour"], skip_invalid=data["skip_invalid"],
                   max_chip_size=max_chip_size, allow_unlabelled=allow_unlabelled)
    fmt = data["dataset_format"]
    if fmt == "packed" or (fmt == "auto" and is_packed(split)):
        return build_bigearthnet(split, fmt="packed", **options)
    if not data["dataset_path"]:
        raise UserInputError(f"data.dataset_path (the BEN-L root) is required for the split "
                             f"{split}")
    return build_bigearthnet(data["dataset_path"], split, "raw", **options)


def split_batch(batch):
    """(imgs, targets or None, [week, hour, lat, lon] or four Nones) from a batch of images, of
    ``(imgs, targets)`` (EuroSAT-L: no metadata) or ``(imgs, targets, week, hour, lat, lon)``
    (BigEarthNet-L)."""
    if isinstance(batch, torch.Tensor):
        return batch, None, [None] * 4
    imgs, *rest = batch
    targets = rest[0] if rest else None
    meta = list(rest[1:5]) if len(rest) >= 5 else [None] * 4
    return imgs, targets, meta


def class_names(data: dict) -> list:
    if data["dataset"] == "eurosat":
        return list(EuroSATInfo.CLASSES)
    return list(BigEarthNetInfo.CLASSES[data["num_classes"]])
