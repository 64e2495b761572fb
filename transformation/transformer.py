"""Image transforms on (C, H, W) tensors, without torchvision.

The pretraining and BEN-L pipeline is
``Compose([ToFloat(), CenterCrop(40), ZScoreNormalize(mean, std)])``; EuroSAT-L chips (~22x22)
use ``Resize(40)`` instead of the crop.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from utils.errors import UserInputError


class ToFloat:
    """Any-dtype (C, H, W) tensor -> float32, same values (uint16 digital numbers are exact)."""

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return img.to(torch.float32)

    def __repr__(self) -> str:
        return "ToFloat()"


class CenterCrop:
    """(C, H, W) -> (C, size, size): the window at top = (H - size) // 2, left = (W - size) // 2.

    The crop is a view of the input (the input itself when it already has that size). An image
    smaller than ``size`` raises UserInputError.
    """

    def __init__(self, size: int):
        if size <= 0:
            raise UserInputError(f"CenterCrop: size must be positive, got {size}")
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        height, width = img.shape[-2:]
        if height == self.size and width == self.size:
            return img
        if height < self.size or width < self.size:
            raise UserInputError(f"CenterCrop: image of {height}x{width} pixels is smaller than "
                                 f"the {self.size}x{self.size} crop")
        top = (height - self.size) // 2
        left = (width - self.size) // 2
        return img[..., top:top + self.size, left:left + self.size]

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class CenterCrop40(CenterCrop):
    """The published name of ``CenterCrop(40)``."""

    def __init__(self):
        super().__init__(40)


class Resize:
    """(C, H, W) -> (C, size, size) float32 by bilinear interpolation (``F.interpolate``).

    ``antialias=True``: when shrinking, the bilinear kernel widens to the output pixel's
    footprint so that fine texture does not alias; when enlarging (EuroSAT-L's 22 -> 40) it is
    plain bilinear. ``align_corners=False`` (pixel areas, not pixel centres, are aligned).
    Integer images are converted to float32 first (interpolation needs floats).
    """

    def __init__(self, size: int):
        if size <= 0:
            raise UserInputError(f"Resize: size must be positive, got {size}")
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if not img.is_floating_point():
            img = img.to(torch.float32)
        if tuple(img.shape[-2:]) == (self.size, self.size):
            return img
        resized = F.interpolate(img.unsqueeze(0), size=(self.size, self.size), mode="bilinear",
                                align_corners=False, antialias=True)
        return resized.squeeze(0)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class ZScoreNormalize:
    """(C, H, W) -> (img - mean[c]) / std[c] per band; integer images are converted to float32."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != len(std):
            raise UserInputError(f"ZScoreNormalize: {len(mean)} means but {len(std)} stds")
        if any(s <= 0 for s in std):
            raise UserInputError(f"ZScoreNormalize: every std must be positive, got {list(std)}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if img.shape[-3] != self.mean.shape[0]:
            raise UserInputError(f"ZScoreNormalize: image has {img.shape[-3]} bands, statistics "
                                 f"have {self.mean.shape[0]}")
        if not img.is_floating_point():
            img = img.to(torch.float32)
        mean, std = self.mean, self.std
        if img.dtype != mean.dtype:
            mean, std = mean.to(img.dtype), std.to(img.dtype)
        # (img - mean) / std, dividing in place: one allocation instead of two
        return torch.sub(img, mean).div_(std)

    def __repr__(self) -> str:
        mean, std = self.mean.flatten().tolist(), self.std.flatten().tolist()
        return f"ZScoreNormalize(mean={mean}, std={std})"


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]]):
        self.transforms = list(transforms)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        for transform in self.transforms:
            img = transform(img)
        return img

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"
