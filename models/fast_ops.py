"""Kernels of the fast path: matrix products through oneDNN on CPU, and a cheaper dropout.

Matrix products
---------------

``F.linear`` on a CPU tensor calls MKL's sgemm. On x86 CPUs that MKL does not identify as
Intel's (AMD EPYC, for instance) MKL runs its AVX2 kernels, while oneDNN, the other GEMM
library inside every x86 PyTorch build (its ``mkldnn`` backend), runs AVX-512 kernels there:
about twice the fp32 throughput for this model's shapes (``benchmarks/bench_model.py``
measures both). This module computes ``x @ W.T + b`` and its two gradients with oneDNN when
the inputs are fp32 CPU tensors and the op is usable, and with ``F.linear`` otherwise
(CUDA, MPS, autocast dtypes, builds without oneDNN). Results agree with ``F.linear`` to fp32
rounding.

:func:`use_backend` selects the backend explicitly (``"auto"``, ``"onednn"``, ``"torch"``).

Dropout
-------
On CPU, ``F.dropout`` spends most of its time drawing one Bernoulli sample per element.
:func:`dropout` draws 16 random bits per element from 64-bit integers instead (about 2x
faster forward and backward at this model's sizes); its drop probability is ``p`` rounded
to a multiple of 1/65536 (0.1 becomes 0.100006), with the usual 1 / (1 - p) rescaling.
Elsewhere it is ``F.dropout``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import torch.nn.functional as F

_backend = "auto"


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """True when PyTorch's oneDNN linear op exists here and agrees with ``F.linear``."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w, b = torch.randn(5, 3), torch.randn(4, 3), torch.randn(4)
        out = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return torch.allclose(out, F.linear(x, w, b), atol=1e-5)


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block, matmuls use ``name``: ``auto`` (default), ``onednn`` or ``torch``."""
    global _backend
    if name not in ("auto", "onednn", "torch"):
        raise ValueError(f"unknown linear backend {name!r}; choose auto, onednn or torch")
    if name == "onednn" and not onednn_available():
        raise RuntimeError("the oneDNN linear op is not available in this PyTorch build")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def _use_onednn(x: torch.Tensor) -> bool:
    if _backend == "torch" or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return _backend == "onednn" or onednn_available()


def _onednn_nt(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """``a @ b.T (+ bias)`` with oneDNN; a (M, K), b (N, K), either may be a strided view."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


def matmul_nt(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """``a @ b.T (+ bias)`` for 2-D a (M, K) and b (N, K), without autograd."""
    if _use_onednn(a):
        return _onednn_nt(a, b, bias)
    return F.linear(a, b, bias)


def matmul_tn(a: torch.Tensor, b: torch.Tensor):
    """``a.T @ b`` for a (T, N) and b (T, K): a weight gradient, (N, K)."""
    if _use_onednn(a):
        # oneDNN is fastest here when it computes the transposed product (K, N).
        return _onednn_nt(b.t(), a.t()).t().contiguous()
    return a.t() @ b


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_nt(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_nt(grad_y, weight.t().contiguous())
        if ctx.needs_input_grad[1]:
            grad_w = matmul_tn(grad_y, x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """``F.linear`` (x (..., in) -> (..., out)), through oneDNN on fp32 CPU tensors."""
    if not _use_onednn(x):
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    return _Linear.apply(x.reshape(-1, x.shape[-1]), weight, bias).view(*lead, weight.shape[0])


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout with drop probability ``p`` (see the module docstring)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or _backend == "torch":
        return F.dropout(x, p, training=True)
    threshold = round(p * 65536)  # drop when a uniform 16-bit integer falls below it
    n = x.numel()
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    bits = words.view(torch.int16)[:n].view(x.shape)
    return x * (bits >= threshold - 32768) * (65536 / (65536 - threshold))
