"""Inverted dropout ``dropout(x, p, training)``: zero each element with probability p, scale
the others by 1 / (1 - p).

On CPU, ``F.dropout`` spends most of its time drawing one Bernoulli sample per element and
storing the mask. The native kernel (:func:`models.native.dropout`) draws one seed from
PyTorch's generator per call, makes the mask a hash of (seed, element index) and recomputes
it in the backward pass; ``p`` is exact to 2**-32. The torch backend on CPU draws 16 random
bits per element from 64-bit integers (``p`` rounded to a multiple of 1/65536: 0.1 becomes
0.100006). Elsewhere (GPUs) and in the reference backend it is ``F.dropout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models import native


def reference_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, training=training)


def torch_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    threshold = round(p * 65536)  # drop when a uniform 16-bit integer falls below it
    n = x.numel()
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    bits = words.view(torch.int16)[:n].view(x.shape)
    return x * (bits >= threshold - 32768) * (65536 / (65536 - threshold))


def native_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if not native.accepts(x):
        return torch_dropout(x, p, training)
    # one draw from PyTorch's generator: masks follow torch.manual_seed and resumed RNG state
    seed = torch.randint(0, 2 ** 62, ())
    return torch.ops.moe_mae.dropout(x, seed, p)
