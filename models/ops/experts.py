"""Mixture of SwiGLU experts that share ``V`` and ``W2``, for T tokens routed by a gate.

For a token x routed to experts ``e_1..e_k`` with gates ``g_j`` (summing to 1)::

    y = sum_j g_j W2(silu(W_{e_j} x) * V x) = W2(V x * sum_j g_j silu(W_{e_j} x))

Every backend takes the stacked projection ``weight`` ((E + 1) dh, dim) = ``[W_0; ...;
W_{E-1}; V]`` and ``bias``, ``w2_weight`` (dim, dh), ``w2_bias``, and applies dropout:

* reference: the published loop; per expert a gather of its tokens, the full SwiGLU with
  dropout on its output, and an ``index_add`` of the gated outputs (left-hand side);
* torch and native: the right-hand side, ``V x`` and ``W2`` once per token, and dropout once
  on the combined output (both keep the expectation; in eval the backends agree).

Dispatch of the fast backends: one matmul computes ``[W_0; ...; W_{E-1}; V] x`` for every
token, then the k selected ``W_e x`` blocks are gathered, activated and mixed. This spends
(E - k) extra expert blocks of FLOPs (E is 3 to 5 here) but every matmul has a fixed shape: no
per-expert gather/scatter of tokens, no host synchronisation on routing counts (good on GPUs),
and oneDNN's JIT-compiled kernels are reused from step to step. Forward and backward are
written by hand (:class:`ExpertMixture`) to keep the number of tensor operations small: at
this model's sizes per-op overhead matters as much as FLOPs. With the native kernels
(``torch.ops.moe_mae.expert_mix`` and ``expert_mix_backward``, see :mod:`models.native`)
everything between the two matmuls is one fused pass per direction.

Every expert's ``W`` is part of the matmul whether or not a token was routed to it, so every
parameter receives a gradient (zero for an unused expert) on every step.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from models import native
from models.ops.dropout import native_dropout, reference_dropout, torch_dropout
from models.ops.gate import Routing
from models.ops.linear import matmul_nt, matmul_tn


def _gate_weighted_sum(gates: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """gates (T, k), values (T, k, d) -> sum_j gates[:, j] * values[:, j] (T, d)."""
    out = values[:, 0] * gates[:, :1]
    for j in range(1, gates.shape[1]):
        out.addcmul_(values[:, j], gates[:, j:j + 1])
    return out


def _silu_and_grad(pre: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    sig = torch.sigmoid(pre)
    return pre * sig, sig * (1 + pre * (1 - sig))


class ExpertMixture(torch.autograd.Function):
    """``y = W2(V x * sum_j g_j silu(W_{e_j} x))`` for every token.

    Inputs: x (T, dim); topk_idx (T, k) and gates (T, k); ``stacked_weight`` ((E + 1) dh, dim)
    and ``stacked_bias`` ((E + 1) dh,), the experts' ``W`` followed by the shared ``V``;
    ``w2_weight`` (dim, dh) and ``w2_bias`` (dim,); ``use_kernels``: the native kernels
    between the matmuls (fp32 CPU tensors only). Output (T, dim).
    """

    @staticmethod
    def forward(ctx, x, topk_idx, gates, stacked_weight, stacked_bias, w2_weight, w2_bias,
                x_t=None, use_kernels=False):
        T, k = gates.shape
        dh = w2_weight.shape[1]
        pre = matmul_nt(x, stacked_weight, stacked_bias).view(T, -1, dh)  # (T, E + 1, dh)
        num_experts = pre.shape[1] - 1
        ctx.native = use_kernels
        if ctx.native:
            hidden = torch.ops.moe_mae.expert_mix(pre, topk_idx, gates)
            ctx.save_for_backward(x, topk_idx, gates, pre, hidden, stacked_weight, w2_weight,
                                  x_t)
            return matmul_nt(hidden, w2_weight, w2_bias)
        # rows of pre viewed as (T * (E + 1), dh) that hold W_e x of the routed experts
        index = (topk_idx + torch.arange(0, T * (num_experts + 1), num_experts + 1,
                                         device=x.device).unsqueeze(1)).view(-1)
        selected = pre.view(-1, dh).index_select(0, index).view(T, k, dh)
        mixed = _gate_weighted_sum(gates, F.silu(selected))
        hidden = mixed * pre[:, num_experts]
        ctx.save_for_backward(x, index, gates, pre, selected, hidden, stacked_weight, w2_weight)
        return matmul_nt(hidden, w2_weight, w2_bias)

    @staticmethod
    def backward(ctx, grad_y):
        grad_y = grad_y.contiguous()
        if ctx.native:
            x, topk_idx, gates, pre, hidden, stacked_weight, w2_weight, x_t = ctx.saved_tensors
        else:
            x, index, gates, pre, selected, hidden, stacked_weight, w2_weight = ctx.saved_tensors
        num_experts = pre.shape[1] - 1
        grad_w2 = matmul_tn(grad_y, hidden)
        grad_w2_bias = grad_y.sum(0)
        grad_hidden = matmul_nt(grad_y, w2_weight.t().contiguous())
        if ctx.native:
            grad_pre, grad_gates = torch.ops.moe_mae.expert_mix_backward(grad_hidden, pre,
                                                                         topk_idx, gates)
            grad_pre = grad_pre.view(x.shape[0], -1)
            grad_x = matmul_nt(grad_pre, stacked_weight.t().contiguous())
            grad_stacked = matmul_tn(grad_pre, x, x_t)
            return (grad_x, None, grad_gates, grad_stacked, grad_pre.sum(0), grad_w2,
                    grad_w2_bias, None, None)

        act, act_grad = _silu_and_grad(selected)
        v_out = pre[:, num_experts]
        grad_pre = torch.zeros_like(pre)
        torch.mul(grad_hidden, _gate_weighted_sum(gates, act), out=grad_pre[:, num_experts])
        grad_mixed = grad_hidden * v_out
        grad_gates = (grad_mixed.unsqueeze(1) * act).sum(2)
        # a token's k experts are distinct, so the scatter writes each block at most once
        grad_selected = grad_mixed.unsqueeze(1) * gates.unsqueeze(2) * act_grad
        grad_pre.view(-1, grad_pre.shape[2]).index_copy_(0, index,
                                                         grad_selected.view(len(index), -1))
        grad_pre = grad_pre.view(x.shape[0], -1)

        grad_x = matmul_nt(grad_pre, stacked_weight.t().contiguous())
        grad_stacked = matmul_tn(grad_pre, x)
        return (grad_x, None, grad_gates, grad_stacked, grad_pre.sum(0), grad_w2, grad_w2_bias,
                None, None)


def fused_expert_mixture(x: torch.Tensor, topk_idx: torch.Tensor, topk_gates: torch.Tensor,
                         weight: torch.Tensor, bias: torch.Tensor, w2_weight: torch.Tensor,
                         w2_bias: torch.Tensor, x_t: Optional[torch.Tensor] = None,
                         use_kernels: bool = False) -> torch.Tensor:
    """x (T, dim), routing (T, k) -> mixture of the routed experts (T, dim), no dropout.
    x_t: optionally x transposed (dim, T), for the weight gradient."""
    # Under autocast the mixture computes in the autocast dtype, with autocast off inside the
    # hand-written forward so that forward and backward see the same dtypes; the casts of the
    # fp32 weights are autograd ops, so their gradients arrive in fp32.
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    if autocast:
        x, x_t = x.to(dtype), None
    with torch.autocast(device, enabled=False):
        return ExpertMixture.apply(x, topk_idx, topk_gates.to(dtype), weight.to(dtype),
                                   bias.to(dtype), w2_weight.to(dtype), w2_bias.to(dtype), x_t,
                                   use_kernels)


def torch_expert_mixture(x: torch.Tensor, routing: Routing, weight, bias, w2_weight, w2_bias,
                         p: float, training: bool,
                         x_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (T, dim) -> (T, dim): the fused mixture on PyTorch ops, then dropout."""
    y = fused_expert_mixture(x, routing.topk_idx, routing.topk_gates, weight, bias, w2_weight,
                             w2_bias, x_t)
    return torch_dropout(y, p, training)


def native_expert_mixture(x: torch.Tensor, routing: Routing, weight, bias, w2_weight, w2_bias,
                          p: float, training: bool,
                          x_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (T, dim) -> (T, dim): the fused mixture with the native kernels (fp32 CPU, top-k up
    to ``native.MAX_TOP_K``; PyTorch ops otherwise), then dropout."""
    use_kernels = routing.topk_idx.shape[1] <= native.MAX_TOP_K and \
        native.accepts(x, routing.topk_gates)
    y = fused_expert_mixture(x, routing.topk_idx, routing.topk_gates, weight, bias, w2_weight,
                             w2_bias, x_t, use_kernels)
    return native_dropout(y, p, training)


def reference_expert_mixture(x: torch.Tensor, routing: Routing, weight, bias, w2_weight,
                             w2_bias, p: float, training: bool,
                             x_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (T, dim) -> (T, dim): the published per-expert loop (x_t is ignored)."""
    dh = w2_weight.shape[1]
    num_experts = weight.shape[0] // dh - 1
    v_weight, v_bias = weight[num_experts * dh:], bias[num_experts * dh:]
    out = torch.zeros_like(x)
    for e in range(num_experts):
        tokens = (routing.topk_idx == e).any(dim=1).nonzero().squeeze(1)
        if tokens.numel() == 0:
            continue
        rows = slice(e * dh, (e + 1) * dh)
        routed = x[tokens]
        hidden = F.silu(F.linear(routed, weight[rows], bias[rows])) * \
            F.linear(routed, v_weight, v_bias)
        expert_out = reference_dropout(F.linear(hidden, w2_weight, w2_bias), p, training)
        contribution = expert_out * routing.gates[tokens, e:e + 1]
        # accumulate in the input's dtype (fp32 under autocast, whose experts give bf16)
        out.index_add_(0, tokens, contribution.to(out.dtype))
    return out
