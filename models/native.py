"""Native CPU kernels of the fast path: attention, expert mixing, gate, LayerNorm, dropout.

At this model's sizes (head dim 16-18, 30 to 105 tokens, expert widths of 27-144) a training
step on CPU spends much of its time outside the matrix products: in PyTorch's batched matmul
for tiny matrices, in softmax, and in dozens of small element-wise passes per layer. The
kernels in ``csrc/cpu_kernels.cpp`` do each of these in one pass over data that stays in
cache, each with a hand-written backward pass:

* :func:`attention_forward` / :func:`attention_backward`: softmax attention for every
  (sample, k/v group) pair, reading q, k and v straight from the fused projection output and
  writing the gradient of that output, so no permuted copies are made;
* :func:`expert_mix_forward` / :func:`expert_mix_backward`: ``V x * sum_j g_j silu(W_j x)``
  and its gradients (see :mod:`models.ops.experts`);
* :func:`gate_forward` / :func:`gate_backward`: the noisy top-k gate and its load-balancing
  statistics (importance and Shazeer's smooth load) for one layer in one pass;
* :func:`layer_norm_forward` / :func:`layer_norm_backward`: LayerNorm in one pass, optionally
  also writing its output transposed (the weight gradients of the next linear layers need
  that layout; oneDNN would otherwise copy it);
* :func:`dropout`: inverted dropout whose mask is a hash of (seed, element index), so the
  backward pass recomputes it and no random numbers or masks are stored.

The source is compiled on first use with the system C++ compiler (``g++ -O3 -march=native
-fopenmp``, about a second) into ``$MOE_MAE_CACHE`` (default ``~/.cache/moe_mae``, else the
temporary folder), under a name that hashes the source, the compiler and the CPU, and is
loaded with ctypes. OpenMP comes from the runtime PyTorch already loaded, so both share one
thread pool; kernels use ``torch.get_num_threads()`` threads. Results are deterministic for
any thread count.

The kernels are registered as PyTorch operators (``torch.ops.moe_mae.*``, end of this file)
with their gradients, fake implementations for ``torch.compile`` and fp32 autocast, so
autograd, autocast and compile handle them like built-in ops; the ``native`` backend of
:mod:`models.ops` calls them. When they cannot be built
(no compiler, a failed build, ``MOE_MAE_NATIVE=0``) models are built with the ``torch``
backend instead, which gives the same results to fp32 rounding; :func:`status` says which.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
COMPILE_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]

_i64, _int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "attention_forward": [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, ctypes.c_float,
                          _int],
    "attention_backward": [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, ctypes.c_float,
                           _int],
    "expert_mix_forward": [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _int],
    "expert_mix_backward": [_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _int],
    "dropout": [_ptr, _ptr, _i64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, _int],
    "layer_norm_forward": [_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, ctypes.c_float,
                           _int],
    "layer_norm_backward": [_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _int],
    "gate_forward": [_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int],
    "gate_backward": [_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int],
    "max_experts": [],
    "attention_probs_shape": [_i64, _i64, _i64, ctypes.POINTER(_i64), ctypes.POINTER(_i64)],
    "max_head_dim": [],
}
MAX_TOP_K = 8  # expert_mix_backward keeps one accumulator per routed expert
MAX_HEAD_DIM = 128  # attention keeps a query row in registers
MAX_EXPERTS = 8  # the gate keeps a token's logits in registers
_unavailable_reason: Optional[str] = None


def _cache_dirs():
    """Where built kernels go: ``$MOE_MAE_CACHE``, else ``~/.cache/moe_mae``; the system's
    temporary folder when that is not writable."""
    yield Path(os.environ.get("MOE_MAE_CACHE", Path.home() / ".cache" / "moe_mae"))
    yield Path(tempfile.gettempdir()) / f"moe_mae-{os.getuid() if hasattr(os, 'getuid') else 0}"


def _cpu_signature() -> str:
    """The CPU's model and flags: ``-march=native`` code is only valid on the same CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines
                                 if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, *COMPILE_FLAGS,
                                    _cpu_signature()]).encode()).hexdigest()[:16]
    error = None
    for folder in _cache_dirs():
        target = folder / f"cpu_kernels-{key}.so"
        if target.exists():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        except OSError as err:  # not writable: try the next folder
            error = err
            continue
        os.close(fd)
        try:
            result = subprocess.run([compiler, *COMPILE_FLAGS, str(SOURCE), "-o", tmp],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                last_line = (result.stderr.strip().splitlines() or ["no message"])[-1]
                raise RuntimeError(f"{compiler} failed on {SOURCE}: {last_line}")
            os.replace(tmp, target)  # atomic: concurrent builds (DDP ranks) are harmless
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target
    raise RuntimeError(f"no writable folder for the built kernels: {error}")


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, building them if needed; None (with one warning) if impossible."""
    global _unavailable_reason
    if os.environ.get("MOE_MAE_NATIVE", "1") == "0":
        _unavailable_reason = "disabled by MOE_MAE_NATIVE=0"
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        _unavailable_reason = "no C++ compiler found (set CXX)"
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        _unavailable_reason = f"build failed: {error}"
        warnings.warn(f"native CPU kernels unavailable, using PyTorch ops: {error}")
        return None
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
    lib.max_head_dim.restype = lib.max_experts.restype = ctypes.c_int
    if (lib.max_head_dim(), lib.max_experts()) != (MAX_HEAD_DIM, MAX_EXPERTS):
        _unavailable_reason = f"{SOURCE.name} and {__name__} disagree on the limits"
        return None
    rows, keys = _i64(), _i64()
    lib.attention_probs_shape(7, 6, 3, rows, keys)
    if (3, rows.value, keys.value) != _probs_shape(1, 7, 6, 3):
        _unavailable_reason = f"{SOURCE.name} and {__name__} disagree on the probs layout"
        return None
    return lib


@torch.compiler.assume_constant_result
def _loaded() -> bool:
    """Whether :func:`library` loaded (a constant to ``torch.compile``, which need not trace
    the build)."""
    return library() is not None


def accepts(*tensors: torch.Tensor) -> bool:
    """True when the kernels are loaded and can run on these tensors: fp32 on CPU, outside
    autocast (whose lower-precision inputs they do not take)."""
    if torch.is_autocast_enabled("cpu") or not _loaded():
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def status() -> str:
    """One line: whether the native kernels are in use, and why not."""
    lib = library()
    if lib is None:
        return f"native CPU kernels: off ({_unavailable_reason})"
    return "native CPU kernels: in use"


def _p(tensor: torch.Tensor) -> int:
    return tensor.data_ptr()


def _p_or_none(tensor: Optional[torch.Tensor]):
    return None if tensor is None else tensor.data_ptr()


def attention_forward(qkv: torch.Tensor, num_heads: int, num_groups: int, scale: float,
                      save_probs: bool, transposed: bool = False):
    """qkv (B, N, (H + 2G) hd): H query heads (head h uses k/v group h % G, the published
    order), G key heads, G value heads -> (out (B, N, H hd), out transposed (H hd, B N) or
    None, the softmax probabilities of ``scale * q.k`` for :func:`attention_backward`
    (padded, one (rows, keys) block per sample and group) or None)."""
    qkv = qkv.contiguous()
    B, N, C = qkv.shape
    hd = C // (num_heads + 2 * num_groups)
    out = qkv.new_empty(B, N, num_heads * hd)
    out_t = qkv.new_empty(num_heads * hd, B * N) if transposed else None
    probs = None
    if save_probs:
        rows, keys = _i64(), _i64()
        library().attention_probs_shape(N, num_heads, num_groups, rows, keys)
        probs = qkv.new_empty(B * num_groups, rows.value, keys.value)
    library().attention_forward(_p(qkv), _p(out), _p_or_none(out_t), _p_or_none(probs), B, N,
                                num_heads, num_groups, hd, scale, torch.get_num_threads())
    return out, out_t, probs


def attention_backward(qkv: torch.Tensor, probs: torch.Tensor, grad_out: torch.Tensor,
                       num_heads: int, num_groups: int, scale: float) -> torch.Tensor:
    """Gradient with respect to ``qkv`` (B, N, (H + 2G) hd) of :func:`attention_forward`."""
    grad_out = grad_out.contiguous()
    B, N, C = qkv.shape
    grad_qkv = qkv.new_empty(B, N, C)
    library().attention_backward(_p(qkv), _p(probs), _p(grad_out), _p(grad_qkv), B, N,
                                 num_heads, num_groups, C // (num_heads + 2 * num_groups), scale,
                                 torch.get_num_threads())
    return grad_qkv


def expert_mix_forward(pre: torch.Tensor, topk_idx: torch.Tensor,
                       gates: torch.Tensor) -> torch.Tensor:
    """pre (T, E + 1, dh), topk_idx and gates (T, k) -> hidden (T, dh)."""
    T, E1, dh = pre.shape
    idx, gates = topk_idx.contiguous(), gates.contiguous()
    hidden = pre.new_empty(T, dh)
    library().expert_mix_forward(_p(pre), _p(idx), _p(gates), _p(hidden), T, E1 - 1,
                                 idx.shape[1], dh, torch.get_num_threads())
    return hidden


def expert_mix_backward(grad_hidden: torch.Tensor, pre: torch.Tensor, topk_idx: torch.Tensor,
                        gates: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`expert_mix_forward`: (grad_pre (T, E + 1, dh), grad_gates (T, k))."""
    T, E1, dh = pre.shape
    grad_hidden, idx, gates = grad_hidden.contiguous(), topk_idx.contiguous(), gates.contiguous()
    grad_pre, grad_gates = torch.empty_like(pre), torch.empty_like(gates)
    library().expert_mix_backward(_p(grad_hidden), _p(pre), _p(idx), _p(gates), _p(grad_pre),
                                  _p(grad_gates), T, E1 - 1, idx.shape[1], dh,
                                  torch.get_num_threads())
    return grad_pre, grad_gates


def dropout_threshold(p: float) -> Tuple[int, float]:
    """(32-bit drop threshold, scale of kept elements) for drop probability ``p``: elements
    are dropped with probability ``threshold / 2**32`` (``p`` to within 2**-32)."""
    threshold = min(round(p * 2 ** 32), 2 ** 32 - 1)
    return threshold, 2 ** 32 / (2 ** 32 - threshold)


def dropout(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """``x`` with the elements of the (seed, p) mask zeroed and the others scaled by
    1 / (1 - p); the same seed gives the same mask (the backward pass relies on it)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    threshold, scale = dropout_threshold(p)
    library().dropout(_p(x), _p(out), x.numel(), seed, threshold, scale, torch.get_num_threads())
    return out


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       transposed: bool):
    """x (T, C) -> (y (T, C), y transposed (C, T) or None, mean (T,), rstd (T,))."""
    x = x.contiguous()
    T, C = x.shape
    y = torch.empty_like(x)
    y_t = x.new_empty(C, T) if transposed else None
    mean, rstd = x.new_empty(T), x.new_empty(T)
    library().layer_norm_forward(_p(x), _p(weight), _p(bias), _p(y),
                                 _p(y_t) if transposed else None, _p(mean), _p(rstd), T, C,
                                 eps, torch.get_num_threads())
    return y, y_t, mean, rstd


def layer_norm_backward(x, mean, rstd, weight, grad_y):
    """Gradients of :func:`layer_norm_forward`: (grad_x (T, C), grad_weight, grad_bias (C,))."""
    grad_y = grad_y.contiguous()
    T, C = x.shape
    grad_x = torch.empty_like(x)
    grad_weight, grad_bias = weight.new_empty(C), weight.new_empty(C)
    library().layer_norm_backward(_p(x), _p(mean), _p(rstd), _p(weight), _p(grad_y),
                                  _p(grad_x), _p(grad_weight), _p(grad_bias), T, C,
                                  torch.get_num_threads())
    return grad_x, grad_weight, grad_bias


def gate_forward(logits: torch.Tensor, eps: Optional[torch.Tensor], k: int):
    """logits (T, 2E) = [Wg x, Wnoise x], eps (T, E) or None (no noise) -> (topk_idx (T, k),
    topk_gates (T, k), noisy (T, E), noise_scale (T, E), importance (E,), load (E,)); see
    :func:`models.moe_mae.load_balancing_loss` for the definitions."""
    logits = logits.contiguous()
    eps = None if eps is None else eps.contiguous()
    T, E = logits.shape[0], logits.shape[1] // 2
    topk_idx = torch.empty(T, k, dtype=torch.int64)
    topk_gates = logits.new_empty(T, k)
    noisy, scale = logits.new_empty(T, E), logits.new_empty(T, E)
    importance, load = logits.new_empty(E), logits.new_empty(E)
    library().gate_forward(_p(logits), _p_or_none(eps), _p(topk_idx), _p(topk_gates), _p(noisy),
                           _p(scale), _p(importance), _p(load), T, E, k, torch.get_num_threads())
    return topk_idx, topk_gates, noisy, scale, importance, load


def gate_backward(logits, eps, topk_gates, grad_gates, grad_importance, grad_load):
    """Gradient with respect to logits (T, 2E) of :func:`gate_forward`'s differentiable outputs
    (topk_gates, importance, load); missing gradients are None."""
    T, k = topk_gates.shape
    grad_logits = torch.empty_like(logits)
    grads = [None if g is None else g.contiguous()
             for g in (grad_gates, grad_importance, grad_load)]
    library().gate_backward(_p(logits), _p_or_none(eps), _p(topk_gates), *map(_p_or_none, grads),
                            _p(grad_logits), T, logits.shape[1] // 2, k, torch.get_num_threads())
    return grad_logits


# ------------------------------------------------------------------ registered operators
#
# The kernels as PyTorch operators (``torch.ops.moe_mae.*``): each forward op has its
# gradient registered (register_autograd), a fake implementation that gives output shapes
# without running (register_fake, for torch.compile's tracing), and casts its inputs to fp32
# under CPU autocast (register_autocast: the kernels compute in fp32). Non-differentiable
# outputs (routing indices, transposed copies, saved statistics) are marked so.

Tensor = torch.Tensor
PROBS_ROW_BLOCK, PROBS_KEY_BLOCK = 4, 16  # attention_probs_shape's rounding, checked below


def _round_up(x, m):
    return (x + m - 1) // m * m


def _probs_shape(B, N, num_heads, num_groups):
    return (B * num_groups, _round_up(num_heads // num_groups * N, PROBS_ROW_BLOCK),
            _round_up(N, PROBS_KEY_BLOCK))


@torch.library.custom_op("moe_mae::attention", mutates_args=(), device_types="cpu")
def attention_op(qkv: Tensor, num_heads: int, num_groups: int, scale: float,
                 for_backward: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`attention_forward` -> (out, out transposed, probs); the last two are empty
    unless ``for_backward``."""
    out, out_t, probs = attention_forward(qkv, num_heads, num_groups, scale,
                                          save_probs=for_backward, transposed=for_backward)
    if not for_backward:
        return out, qkv.new_empty(0), qkv.new_empty(0)
    return out, out_t, probs


@attention_op.register_fake
def _(qkv, num_heads, num_groups, scale, for_backward):
    B, N, C = qkv.shape
    width = num_heads * (C // (num_heads + 2 * num_groups))
    out = qkv.new_empty(B, N, width)
    if not for_backward:
        return out, qkv.new_empty(0), qkv.new_empty(0)
    return out, qkv.new_empty(width, B * N), qkv.new_empty(_probs_shape(B, N, num_heads,
                                                                        num_groups))


@torch.library.custom_op("moe_mae::attention_backward", mutates_args=(), device_types="cpu")
def attention_backward_op(qkv: Tensor, probs: Tensor, grad_out: Tensor, num_heads: int,
                          num_groups: int, scale: float) -> Tensor:
    return attention_backward(qkv.contiguous(), probs, grad_out, num_heads, num_groups, scale)


@attention_backward_op.register_fake
def _(qkv, probs, grad_out, num_heads, num_groups, scale):
    return torch.empty_like(qkv)


def _attention_setup(ctx, inputs, output):
    qkv, num_heads, num_groups, scale, _ = inputs
    _, out_t, probs = output
    ctx.save_for_backward(qkv, probs)
    ctx.args = num_heads, num_groups, scale
    ctx.mark_non_differentiable(out_t, probs)
    # out_t and probs get no zero-filled gradients; out always has one (the only
    # differentiable output)
    ctx.set_materialize_grads(False)


def _attention_grad(ctx, grad_out, _out_t, _probs):
    qkv, probs = ctx.saved_tensors
    if probs.numel() == 0:
        raise RuntimeError("moe_mae::attention ran with for_backward=False; it has no gradient")
    return torch.ops.moe_mae.attention_backward(qkv, probs, grad_out, *ctx.args), None, None, \
        None, None


attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)


@torch.library.custom_op("moe_mae::expert_mix", mutates_args=(), device_types="cpu")
def expert_mix_op(pre: Tensor, topk_idx: Tensor, gates: Tensor) -> Tensor:
    """:func:`expert_mix_forward`: pre (T, E + 1, dh) -> hidden (T, dh)."""
    return expert_mix_forward(pre.contiguous(), topk_idx, gates)


@expert_mix_op.register_fake
def _(pre, topk_idx, gates):
    return pre.new_empty(pre.shape[0], pre.shape[2])


@torch.library.custom_op("moe_mae::expert_mix_backward", mutates_args=(), device_types="cpu")
def expert_mix_backward_op(grad_hidden: Tensor, pre: Tensor, topk_idx: Tensor,
                           gates: Tensor) -> Tuple[Tensor, Tensor]:
    return expert_mix_backward(grad_hidden, pre.contiguous(), topk_idx, gates)


@expert_mix_backward_op.register_fake
def _(grad_hidden, pre, topk_idx, gates):
    return torch.empty_like(pre), torch.empty_like(gates)


def _expert_mix_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _expert_mix_grad(ctx, grad_hidden):
    pre, topk_idx, gates = ctx.saved_tensors
    grad_pre, grad_gates = torch.ops.moe_mae.expert_mix_backward(grad_hidden, pre, topk_idx,
                                                                 gates)
    return grad_pre, None, grad_gates


expert_mix_op.register_autograd(_expert_mix_grad, setup_context=_expert_mix_setup)


@torch.library.custom_op("moe_mae::layer_norm", mutates_args=(), device_types="cpu")
def layer_norm_op(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                  transposed: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`layer_norm_forward` on x (T, C) -> (y, y transposed (C, T) or empty, mean,
    rstd)."""
    y, y_t, mean, rstd = layer_norm_forward(x, weight.contiguous(), bias.contiguous(), eps,
                                            transposed)
    return y, x.new_empty(0) if y_t is None else y_t, mean, rstd


@layer_norm_op.register_fake
def _(x, weight, bias, eps, transposed):
    T, C = x.shape
    return (torch.empty_like(x), x.new_empty(C, T) if transposed else x.new_empty(0),
            x.new_empty(T), x.new_empty(T))


@torch.library.custom_op("moe_mae::layer_norm_backward", mutates_args=(), device_types="cpu")
def layer_norm_backward_op(x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor,
                           grad_y: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return layer_norm_backward(x.contiguous(), mean, rstd, weight.contiguous(), grad_y)


@layer_norm_backward_op.register_fake
def _(x, mean, rstd, weight, grad_y):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, _, _, _ = inputs
    _, y_t, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight)
    ctx.mark_non_differentiable(y_t, mean, rstd)
    # y_t, mean and rstd get no zero-filled gradients; y always has one
    ctx.set_materialize_grads(False)


def _layer_norm_grad(ctx, grad_y, _y_t, _mean, _rstd):
    x, mean, rstd, weight = ctx.saved_tensors
    grad_x, grad_w, grad_b = torch.ops.moe_mae.layer_norm_backward(x, mean, rstd, weight, grad_y)
    return grad_x, grad_w, grad_b, None, None


layer_norm_op.register_autograd(_layer_norm_grad, setup_context=_layer_norm_setup)


@torch.library.custom_op("moe_mae::gate", mutates_args=(), device_types="cpu")
def gate_op(logits: Tensor, eps: Optional[Tensor], k: int
            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`gate_forward`: logits (T, 2E), eps (T, E) or None -> (topk_idx, topk_gates,
    noisy, noise_scale, importance, load)."""
    return gate_forward(logits, eps, k)


@gate_op.register_fake
def _(logits, eps, k):
    T, E = logits.shape[0], logits.shape[1] // 2
    return (logits.new_empty(T, k, dtype=torch.int64), logits.new_empty(T, k),
            logits.new_empty(T, E), logits.new_empty(T, E), logits.new_empty(E),
            logits.new_empty(E))


@torch.library.custom_op("moe_mae::gate_backward", mutates_args=(), device_types="cpu")
def gate_backward_op(logits: Tensor, eps: Optional[Tensor], topk_gates: Tensor,
                     grad_gates: Tensor, grad_importance: Tensor, grad_load: Tensor) -> Tensor:
    return gate_backward(logits.contiguous(), eps, topk_gates, grad_gates, grad_importance,
                         grad_load)


@gate_backward_op.register_fake
def _(logits, eps, topk_gates, grad_gates, grad_importance, grad_load):
    return torch.empty_like(logits)


def _gate_setup(ctx, inputs, output):
    logits, eps, _ = inputs
    topk_idx, gates, noisy, scale, _, _ = output
    ctx.save_for_backward(logits, eps, gates)
    ctx.mark_non_differentiable(topk_idx, noisy, scale)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for noisy and noise_scale


def _gate_grad(ctx, _idx, grad_gates, _noisy, _scale, grad_importance, grad_load):
    logits, eps, gates = ctx.saved_tensors
    # unused outputs have no gradient (None): zeros give the same result
    zeros = gates.new_zeros
    grads = [zeros(shape) if g is None else g for g, shape in
             ((grad_gates, gates.shape), (grad_importance, logits.shape[1] // 2),
              (grad_load, logits.shape[1] // 2))]
    return torch.ops.moe_mae.gate_backward(logits, eps, gates, *grads), None, None


gate_op.register_autograd(_gate_grad, setup_context=_gate_setup)


@torch.library.custom_op("moe_mae::dropout", mutates_args=(), device_types="cpu")
def dropout_op(x: Tensor, seed: Tensor, p: float) -> Tensor:
    """:func:`dropout` with the seed a 0-d int64 tensor (drawn by the caller from PyTorch's
    generator, so that traced graphs hold no constant seed)."""
    return dropout(x, int(seed), p)


@dropout_op.register_fake
def _(x, seed, p):
    return torch.empty_like(x)


def _dropout_setup(ctx, inputs, output):
    _, seed, p = inputs
    ctx.save_for_backward(seed)
    ctx.p = p


def _dropout_grad(ctx, grad_y):
    (seed,) = ctx.saved_tensors
    return torch.ops.moe_mae.dropout(grad_y, seed, ctx.p), None, None


dropout_op.register_autograd(_dropout_grad, setup_context=_dropout_setup)

for _op in (attention_op, expert_mix_op, layer_norm_op, gate_op, dropout_op):
    torch.library.register_autocast(_op, "cpu", torch.float32)
