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

from datasets.bigearthnet import BigEarthNetDatasetLS
from datasets.eurosat import EuroSATDatasetLS
from datasets.pack import PackedBigEarthNetDataset
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
    "legacy_hour": Field("bool", False, help="BEN-L: the published hour encoding"),
    "skip_invalid": Field("bool", False, help="BEN-L: skip patches without label/image"),
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


def build_bigearthnet(path, csv: Optional[str] = None, fmt: str = "auto", *, img_size: int = 40,
                      supervised: bool = False, num_classes: int = 19, legacy_hour: bool = False,
                      skip_invalid: bool = False):
    """A BEN-L split: raw (``path`` = root, ``csv`` = split) or packed (``path`` = packed dir).
    Both return the same sample tuples."""
    if fmt not in FORMATS:
        raise UserInputError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}")
    packed = is_packed(path) if fmt == "auto" else fmt == "packed"
    transform = bigearthnet_transform(img_size)
    if packed:
        return PackedBigEarthNetDataset(path, transform=transform, supervised=supervised,
                                        num_classes=num_classes, legacy_hour=legacy_hour)
    if csv is None:
        raise UserInputError(f"{path}: a raw BigEarthNet-L dataset needs a split CSV")
    return BigEarthNetDatasetLS(csv, path, transform=transform, supervised=supervised,
                                num_classes=num_classes, legacy_hour=legacy_hour,
                                skip_invalid=skip_invalid)


def build_split(data: dict, split: str, img_size: int = 40, supervised: bool = True):
    """A labelled split from a ``data`` config section (see DATA_FIELDS). ``split``: a BEN-L
    split CSV (under ``data.dataset_path``) or packed directory, or a EuroSAT-L split file."""
    if data["dataset"] == "eurosat":
        if not data["dataset_path"]:
            raise UserInputError("data.dataset_path (the EuroSAT-L class folders) is required")
        return EuroSATDatasetLS(data["dataset_path"], split,
                                transform=eurosat_transform(img_size, data["normalization"]),
                                strict=data["strict"])
    fmt = data["dataset_format"]
    if fmt == "packed" or (fmt == "auto" and is_packed(split)):
        return build_bigearthnet(split, fmt="packed", img_size=img_size, supervised=supervised,
                                 num_classes=data["num_classes"], legacy_hour=data["legacy_hour"])
    if not data["dataset_path"]:
        raise UserInputError(f"data.dataset_path (the BEN-L root) is required for the split "
                             f"{split}")
    return build_bigearthnet(data["dataset_path"], split, "raw", img_size=img_size,
                             supervised=supervised, num_classes=data["num_classes"],
                             legacy_hour=data["legacy_hour"], skip_invalid=data["skip_invalid"])


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
