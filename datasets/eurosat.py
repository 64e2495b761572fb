"""EuroSAT-Landsat (EuroSAT-L) read from its GeoTIFF chips: the transfer benchmark.

Layout: ``root_dir/<ClassName>/<name>.tif``, 8 bands (SR_B1..SR_B7, ST_B10), ~22x22 pixels;
the classes are the sorted folder names. A split file lists one chip per line, as the
published EuroSAT splits do (``Forest_1718.jpg``), or as ``Forest_1718.tif``, ``Forest_1718``
or ``Forest/Forest_1718``. Entries match chips case-insensitively by file stem (and by class
folder when given), so ``.jpg`` entries find the ``.tif`` chips.

Items are ``(img, target)``: ``img`` the 7 surface-reflectance bands (the thermal ST_B10 is
dropped), (7, H, W) uint16 passed through ``transform`` (for the model:
``Compose([ToFloat(), Resize(40), ZScoreNormalize(EuroSATInfo mean, std)])``); ``target`` the
class index (int), or a one-hot float32 (num_classes,) tensor with ``return_one_hot``.
EuroSAT-L has no metadata, so the model sees none.

Chips are checked where they are read, as BEN-L chips are: uint16 (the Landsat Collection 2
digital numbers that EuroSAT-L's files hold, copied from the source scenes' profile), 8 bands,
and between ``MIN_CHIP_SIZE`` (20, the size EuroSAT-L was built with) and ``max_chip_size``
(64) pixels a side; anything else is an error naming the file. An entry listed twice in a
split file is an error too (it would count twice in every metric).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path, PurePosixPath
from typing import Callable, Dict, List, Optional, Tuple, Union

import rasterio
import torch
from rasterio.errors import RasterioError
from torch.utils.data import Dataset

from utils.data_config import EuroSATInfo
from utils.data_utils import GDAL_READ_OPTIONS, error_text
from utils.errors import UserInputError

PathLike = Union[str, os.PathLike]
Transform = Callable[[torch.Tensor], torch.Tensor]
Chip = Tuple[Path, int]  # file, class index

NUM_FILE_BANDS = len(EuroSATInfo.BAND_NAMES)  # 8, the last one thermal
NUM_BANDS = NUM_FILE_BANDS - 1
CHIP_DTYPE = "uint16"
MIN_CHIP_SIZE = 20  # EuroSAT-L kept scenes whose chip is at least 20x20 pixels
MAX_CHIP_SIZE = 64
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}
EXAMPLES_SHOWN = 5


def _entry_key(entry: str) -> Tuple[Optional[str], str]:
    """(class folder or None, stem), lower-cased, of a split entry like ``Forest/Forest_1.jpg``."""
    path = PurePosixPath(entry.replace("\\", "/"))
    stem = path.stem if path.suffix.lower() in IMAGE_SUFFIXES else path.name
    folder = path.parent.name.lower() if path.parent.name else None
    return folder, stem.lower()


class EuroSATDatasetLS(Dataset):
    """EuroSAT-L split; see the module docstring.

    Args:
        root_dir: folder of class folders.
        split_file: text file, one chip per line.
        transform: applied to the (7, H, W) uint16 tensor.
        return_one_hot: target as a one-hot float32 tensor instead of an int.
        strict: an entry that matches no chip raises UserInputError (listing a few); with
            ``strict=False`` such entries are dropped with one warning.
        max_chip_size: larger chips are errors (module docstring).
    """

    def __init__(self, root_dir: PathLike, split_file: PathLike,
                 transform: Optional[Transform] = None, return_one_hot: bool = False,
                 strict: bool = True, max_chip_size: int = MAX_CHIP_SIZE):
        self.max_chip_size = max_chip_size
        self.root_dir = Path(root_dir)
        self.split_file = Path(split_file)
        self.transform = transform
        self.return_one_hot = return_one_hot
        self._classes = self._find_classes()
        by_stem, by_class_and_stem = self._index_chips()
        # [(path, class index)] in split order
        self.samples = self._match_split(by_stem, by_class_and_stem, strict)

    def _find_classes(self) -> List[str]:
        try:
            classes = sorted(entry.name for entry in os.scandir(self.root_dir) if entry.is_dir()
                             and not entry.name.startswith("."))
        except OSError as exc:
            raise UserInputError(f"{self.root_dir}: cannot list the EuroSAT-L root "
                                 f"({exc.strerror})") from None
        if not classes:
            raise UserInputError(f"{self.root_dir}: no class folders in the EuroSAT-L root")
        return classes

    def _index_chips(self) -> Tuple[Dict[str, List[Chip]], Dict[Tuple[str, str], Chip]]:
        """Chips by lower-case stem (a list: a stem may repeat across classes) and by
        (lower-case class, stem)."""
        by_stem: Dict[str, List[Chip]] = {}
        by_class_and_stem: Dict[Tuple[str, str], Chip] = {}
        for class_index, class_name in enumerate(self._classes):
            folder = self.root_dir / class_name
            for name in sorted(os.listdir(folder)):
                path = folder / name
                if path.suffix.lower() not in (".tif", ".tiff"):
                    continue
                stem = path.stem.lower()
                by_stem.setdefault(stem, []).append((path, class_index))
                by_class_and_stem[(class_name.lower(), stem)] = (path, class_index)
        return by_stem, by_class_and_stem

    def _match_split(self, by_stem: Dict[str, List[Chip]],
                     by_class_and_stem: Dict[Tuple[str, str], Chip], strict: bool) -> List[Chip]:
        try:
            lines = self.split_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UserInputError(f"{self.split_file}: cannot read split file "
                                 f"({exc.strerror})") from None
        entries = [line.strip() for line in lines if line.strip()]
        if not entries:
            raise UserInputError(f"{self.split_file}: the split file lists no chips")

        first_line: Dict[str, int] = {}
        for number, entry in enumerate(entries, start=1):
            key = "/".join(filter(None, _entry_key(entry)))
            seen = first_line.setdefault(key, number)
            if seen != number:
                raise UserInputError(f"{self.split_file}: {entry!r} is listed twice (entries "
                                     f"{seen} and {number}); a split lists each chip once")
        samples, unmatched = [], []
        for entry in entries:
            folder, stem = _entry_key(entry)
            if folder is not None:
                match = by_class_and_stem.get((folder, stem))
            else:
                candidates = by_stem.get(stem, [])
                if len(candidates) > 1:
                    where = ", ".join(str(path) for path, _ in candidates)
                    raise UserInputError(f"{self.split_file}: entry {entry!r} matches several "
                                         f"chips ({where}); write it as Class/name")
                match = candidates[0] if candidates else None
            if match is None:
                unmatched.append(entry)
            else:
                samples.append(match)

        if unmatched:
            examples = ", ".join(unmatched[:EXAMPLES_SHOWN])
            examples += ", ..." if len(unmatched) > EXAMPLES_SHOWN else ""
            message = (f"{self.split_file}: {len(unmatched)} of {len(entries)} entries match no "
                       f".tif chip under {self.root_dir}: {examples}")
            if strict or not samples:
                raise UserInputError(message)
            warnings.warn(message + " (skipped)", stacklevel=3)
        return samples

    def _check_chip(self, path: Path, src) -> None:
        if src.count != NUM_FILE_BANDS:
            raise UserInputError(f"{path}: {src.count} bands, expected {NUM_FILE_BANDS} "
                                 f"({', '.join(EuroSATInfo.BAND_NAMES)})")
        bad_types = sorted(set(src.dtypes) - {CHIP_DTYPE})
        if bad_types:
            raise UserInputError(f"{path}: {', '.join(bad_types)} pixels, expected {CHIP_DTYPE} "
                                 f"(the digital numbers EuroSAT-L publishes)")
        if min(src.height, src.width) < MIN_CHIP_SIZE or \
                max(src.height, src.width) > self.max_chip_size:
            raise UserInputError(f"{path}: {src.height}x{src.width} pixels, expected "
                                 f"{MIN_CHIP_SIZE} to {self.max_chip_size} a side (EuroSAT-L "
                                 f"chips are about 22x22)")

    @property
    def classes(self) -> List[str]:
        return list(self._classes)

    @property
    def file_names(self) -> List[str]:
        """Stems of the chips in split order, e.g. ``Forest_12`` (ids for embeddings)."""
        return [path.stem for path, _ in self.samples]

    @property
    def targets(self) -> List[int]:
        return [class_index for _, class_index in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Union[int, torch.Tensor]]:
        path, class_index = self.samples[index]
        try:
            with rasterio.Env(**GDAL_READ_OPTIONS), rasterio.open(path) as src:
                self._check_chip(path, src)
                pixels = src.read(indexes=list(range(1, NUM_BANDS + 1)))
        except RasterioError as exc:
            raise UserInputError(f"{path}: cannot read the EuroSAT-L chip: "
                                 f"{error_text(exc)}") from None

        img = torch.from_numpy(pixels)
        if self.transform is not None:
            img = self.transform(img)
        if not self.return_one_hot:
            return img, class_index
        target = torch.zeros(len(self._classes), dtype=torch.float32)
        target[class_index] = 1.0
        return img, target
