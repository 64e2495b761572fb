"""Linear layers: ``x @ W.T + b`` and its gradients, through oneDNN on fp32 CPU tensors.

``F.linear`` on a CPU tensor calls MKL's sgemm. On x86 CPUs that MKL does not identify as
Intel's (AMD EPYC, for instance) MKL runs its AVX2 kernels, while oneDNN, the other GEMM
library inside every x86 PyTorch build (its ``mkldnn`` backend), runs AVX-512 kernels there:
about twice the fp32 throughput for this model's shapes (``benchmarks/bench_model.py``
measures both). :func:`linear` computes with oneDNN when the inputs are fp32 CPU tensors
outside autocast and the op exists in this build, and with ``F.linear`` otherwise (CUDA,
autocast dtypes, builds without oneDNN, and under ``torch.compile``). Results agree with ``F.linear`` to fp32 rounding.

Weight gradients contract over tokens, so oneDNN needs the layer input transposed; it copies
it unless the caller passes that transpose (``x_t``). The native LayerNorm
(:mod:`models.ops.norm`) writes it in the same pass as its output, for the linear layers
that read a norm's output.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

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


def _use_onednn(x: torch.Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    # under torch.compile, F.linear: inductor picks its own GEMM (its lowering of the oneDNN op
    # expects weights it pre-packed itself, and fails on ours)
    return not torch.compiler.is_compiling() and onednn_available()


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
           x_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear`` (x (..., in) -> (..., out)), through oneDNN on fp32 CPU tensors.
    ``x_t``: optionally x as a contiguous (in, tokens) transpose."""
    if not _use_onednn(x):
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    return _Linear.apply(x.reshape(-1, x.shape[-1]), weight, bias, x_t).view(
        *lead, weight.shape[0])


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     x_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference backend's linear: ``F.linear`` (``x_t`` is ignored)."""
    return F.linear(x, weight, bias)
