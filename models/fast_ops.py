"""Kernels of the fast path: matrix products through oneDNN on CPU, LayerNorm and dropout.

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

:func:`use_backend` selects the backend explicitly (``"auto"``, ``"onednn"``, ``"torch"``;
``torch`` also turns off the native kernels of :mod:`models.native`).

Weight gradients contract over tokens, so oneDNN needs the layer input transposed; it copies
it unless the caller passes that transpose (``x_t``). :func:`layer_norm` (the native kernel)
writes it in the same pass as its output, for the linear layers that read a norm's output.

Dropout
-------
On CPU, ``F.dropout`` spends most of its time drawing one Bernoulli sample per element and
storing the mask. :func:`dropout` uses the native kernel (:func:`models.native.dropout`)
when it is available: one seed is drawn from PyTorch's generator per call, the mask is a hash
of (seed, element index), and the backward pass recomputes it; ``p`` is exact to 2**-32.
Without the native kernels it draws 16 random bits per element from 64-bit integers (``p``
rounded to a multiple of 1/65536: 0.1 becomes 0.100006). Both rescale by 1 / (1 - p).
Elsewhere (GPUs, ``use_backend("torch")``) it is ``F.dropout``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from models import native

_backend = "auto"
# Weight gradients with at most this many rows (the gates' 2E) go through torch.mm, which
# reads the transposed operands in place: oneDNN would first copy the activations transposed.
SMALL_GRADIENT_ROWS = 16


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """True when PyTorch's oneDNN linear op exists here and agrees with ``F.linear``."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        # a private generator: drawing from the global one would shift every later random
        # draw of a training run, depending on when this cached probe first runs
        generator = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*shape, generator=generator) for shape in ((5, 3), (4, 3), (4,)))
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


def native_usable(*tensors: torch.Tensor) -> bool:
    """True when the native kernels (:mod:`models.native`) can run on these tensors: fp32 on
    CPU, outside autocast, with the backend not forced to ``torch``."""
    if _backend == "torch" or not native.is_enabled() or torch.is_autocast_enabled("cpu"):
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    return native.library() is not None


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


def matmul_tn(a: torch.Tensor, b: torch.Tensor, b_t: Optional[torch.Tensor] = None):
    """``a.T @ b`` for a (T, N) and b (T, K): a weight gradient, (N, K). ``b_t``, when given,
    is ``b`` already transposed to a contiguous (K, T), which spares oneDNN a copy."""
    if _use_onednn(a) and a.shape[1] > SMALL_GRADIENT_ROWS:
        if b_t is not None:
            return _onednn_nt(b_t, a.t()).t().contiguous()
        # oneDNN is fastest here when it computes the transposed product (K, N).
        return _onednn_nt(b.t(), a.t()).t().contiguous()
    return a.t() @ b


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, x_t):
        ctx.save_for_backward(x, weight, x_t)
        ctx.has_bias = bias is not None
        return _onednn_nt(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, x_t = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_nt(grad_y, weight.t().contiguous())
        if ctx.needs_input_grad[1]:
            grad_w = matmul_tn(grad_y, x, x_t)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum(0)
        return grad_x, grad_w, grad_b, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           x_t: Optional[torch.Tensor] = None):
    """``F.linear`` (x (..., in) -> (..., out)), through oneDNN on fp32 CPU tensors.
    ``x_t``: optionally x as a contiguous (in, tokens) transpose (see :func:`layer_norm`)."""
    if not _use_onednn(x):
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    return _Linear.apply(x.reshape(-1, x.shape[-1]), weight, bias, x_t).view(
        *lead, weight.shape[0])


class _NativeLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, transposed):
        y, y_t, mean, rstd = native.layer_norm_forward(x, weight, bias, eps, transposed)
        ctx.save_for_backward(x, mean, rstd, weight)
        if y_t is None:
            return y
        ctx.mark_non_differentiable(y_t)
        return y, y_t

    @staticmethod
    def backward(ctx, grad_y, *unused):
        x, mean, rstd, weight = ctx.saved_tensors
        return (*native.layer_norm_backward(x, mean, rstd, weight, grad_y), None, None)


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``norm(x)`` for x (..., C) -> (y (..., C), y transposed (C, tokens) or None).

    With the native kernels (and autograd on), the transposed copy comes out of the same pass
    for the weight gradients of the linear layers that read y; otherwise it is None."""
    C = x.shape[-1]
    if not (native_usable(x) and norm.elementwise_affine and norm.bias is not None
            and norm.normalized_shape == (C,)):
        return norm(x), None
    if torch.is_grad_enabled():
        y, y_t = _NativeLayerNorm.apply(x.reshape(-1, C), norm.weight, norm.bias, norm.eps, True)
        return y.view_as(x), y_t
    return _NativeLayerNorm.apply(x.reshape(-1, C), norm.weight, norm.bias, norm.eps,
                                  False).view_as(x), None


class _NativeDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        # one draw from PyTorch's generator: masks follow torch.manual_seed and resumed RNG state
        ctx.seed, ctx.p = int(torch.randint(0, 2 ** 62, ())), p
        return native.dropout(x, ctx.seed, p)

    @staticmethod
    def backward(ctx, grad_y):
        return native.dropout(grad_y, ctx.seed, ctx.p), None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout with drop probability ``p`` (see the module docstring)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or _backend == "torch":
        return F.dropout(x, p, training=True)
    if native_usable(x):
        return _NativeDropout.apply(x, p)
    threshold = round(p * 65536)  # drop when a uniform 16-bit integer falls below it
    n = x.numel()
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    bits = words.view(torch.int16)[:n].view(x.shape)
    return x * (bits >= threshold - 32768) * (65536 / (65536 - threshold))
