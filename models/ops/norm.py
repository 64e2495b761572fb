"""LayerNorm over the last dimension, returning ``(y, y transposed or None)``.

The native kernel also writes its output transposed (C, tokens) in the same pass, with
autograd on, for the weight gradients of the linear layers that read y
(:func:`models.ops.linear.linear`'s ``x_t``); the other backends return None there.
Statistics are computed in fp32 in every backend (``F.layer_norm`` does so under autocast).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from models import native

NormOutput = Tuple[torch.Tensor, Optional[torch.Tensor]]


def torch_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     eps: float) -> NormOutput:
    """x (..., C) -> (``F.layer_norm(x)`` (..., C), None)."""
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps), None


def native_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      eps: float) -> NormOutput:
    """x (..., C) -> (y (..., C), y transposed (C, tokens) with autograd, else None); on
    tensors the kernel does not take (see :func:`models.native.accepts`), the torch one."""
    if not native.accepts(x):
        return torch_layer_norm(x, weight, bias, eps)
    transposed = torch.is_grad_enabled()
    y, y_t, _, _ = torch.ops.moe_mae.layer_norm(x.reshape(-1, x.shape[-1]), weight, bias, eps,
                                                transposed)
    return y.view_as(x), y_t if transposed else None
