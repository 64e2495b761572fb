"""Grouped-query attention, from the input tokens to the output projection.

Every backend takes the fused projection ``qkv_weight`` ((H + 2G) hd, dim) and ``qkv_bias``:
the H query heads in the published order (query head h uses k/v group ``h % G``, the order
the published ``unsqueeze(2).repeat`` produces), then the G key heads, then the G value
heads; and the output projection ``out_weight`` (dim, H hd), ``out_bias``.

* reference: the published computation, k and v repeated to H heads, an explicit softmax;
* torch: heads reordered group-major (head j uses group ``j // (H / G)``, as SDPA's
  ``enable_gqa`` expects) by reordering the rows of the query projection and the matching
  columns of the output projection, the scale folded into the query projection; then
  :func:`grouped_attention_cpu` on CPU (faster than SDPA at this model's head dim of 16-18)
  or SDPA elsewhere;
* native: the fused kernel of :mod:`models.native`, which reads the published order straight
  from the projection output (fp32 CPU, head dim up to ``native.MAX_HEAD_DIM``; the torch
  backend otherwise).

The softmax runs in fp32 in every backend, also under autocast.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from models import native
from models.ops.linear import linear
from models.ops.precision import at_least_fp32


def _split_heads(qkv_weight: torch.Tensor, num_heads: int, num_groups: int) -> Tuple[int, int]:
    """(query width H hd, k/v width G hd) of a fused projection."""
    hd = qkv_weight.shape[0] // (num_heads + 2 * num_groups)
    return num_heads * hd, num_groups * hd


def reference_attention(x: torch.Tensor, qkv_weight, qkv_bias, out_weight, out_bias,
                        num_heads: int, num_groups: int,
                        x_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (B, N, dim) -> (B, N, dim), the published computation (x_t is ignored)."""
    B, N, _ = x.shape
    H, G = num_heads, num_groups
    q_width, kv_width = _split_heads(qkv_weight, H, G)
    hd = q_width // H
    q_w, k_w, v_w = qkv_weight.split([q_width, kv_width, kv_width])
    q_b, k_b, v_b = qkv_bias.split([q_width, kv_width, kv_width])
    q = F.linear(x, q_w, q_b).view(B, N, H, hd).transpose(1, 2)
    k = F.linear(x, k_w, k_b).view(B, N, 1, G, hd).repeat(1, 1, H // G, 1, 1).view(B, N, H, hd)
    v = F.linear(x, v_w, v_b).view(B, N, 1, G, hd).repeat(1, 1, H // G, 1, 1).view(B, N, H, hd)
    attn = (q @ k.permute(0, 2, 3, 1)) * hd ** -0.5
    out = at_least_fp32(attn).softmax(dim=-1) @ v.transpose(1, 2)
    return F.linear(out.transpose(1, 2).reshape(B, N, q_width), out_weight, out_bias)


def grouped_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                          num_groups: int, chunk: int = 64) -> torch.Tensor:
    """Softmax attention with two batched matmuls per k/v group.

    q (B, N, H * hd) with heads ordered group-major and already scaled; k, v (B, N, G * hd).
    Returns (B, N, H * hd) in the same head order. The queries of the H / G heads sharing a
    group form one (H / G * N, hd) matrix, so each (sample, group) pair costs two matmuls.
    Without autograd, groups are processed ``chunk`` (sample, group) pairs at a time, so the
    attention matrices stay in cache.
    """
    B, N, _ = q.shape
    G, R = num_groups, num_heads // num_groups
    hd = k.shape[-1] // G
    q = q.view(B, N, G, R, hd).permute(0, 2, 3, 1, 4).reshape(B * G, R * N, hd)
    k_t = k.view(B, N, G, hd).permute(0, 2, 3, 1).reshape(B * G, hd, N)
    v = v.view(B, N, G, hd).transpose(1, 2).reshape(B * G, N, hd)
    if torch.is_grad_enabled() and (q.requires_grad or k_t.requires_grad or v.requires_grad):
        out = torch.bmm(at_least_fp32(torch.bmm(q, k_t)).softmax(-1).to(v.dtype), v)
    else:
        out = v.new_empty(B * G, R * N, hd)
        for i in range(0, B * G, chunk):
            scores = at_least_fp32(torch.bmm(q[i:i + chunk], k_t[i:i + chunk]))
            torch.bmm(scores.softmax(-1).to(v.dtype), v[i:i + chunk], out=out[i:i + chunk])
    return out.view(B, G, R, N, hd).permute(0, 3, 1, 2, 4).reshape(B, N, num_heads * hd)


def torch_attention(x: torch.Tensor, qkv_weight, qkv_bias, out_weight, out_bias,
                    num_heads: int, num_groups: int,
                    x_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (B, N, dim) -> (B, N, dim), heads group-major (see the module docstring)."""
    B, N, dim = x.shape
    H, G = num_heads, num_groups
    R = H // G
    q_width, kv_width = _split_heads(qkv_weight, H, G)
    hd = q_width // H
    scale = hd ** -0.5
    # published head h = r * G + g  ->  group-major head j = g * R + r
    q_weight = qkv_weight[:q_width].view(R, G, hd, dim).transpose(0, 1).reshape(q_width, dim)
    q_bias = qkv_bias[:q_width].view(R, G, hd).transpose(0, 1).reshape(q_width)
    qkv = linear(x, torch.cat([q_weight * scale, qkv_weight[q_width:]]),
                 torch.cat([q_bias * scale, qkv_bias[q_width:]]), x_t)
    q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
    if x.device.type == "cpu":
        out = grouped_attention_cpu(q, k, v, H, G)
    else:
        out = F.scaled_dot_product_attention(
            q.view(B, N, H, hd).transpose(1, 2), k.view(B, N, G, hd).transpose(1, 2),
            v.view(B, N, G, hd).transpose(1, 2), enable_gqa=True, scale=1.0)
        out = out.transpose(1, 2).reshape(B, N, q_width)
    out_w = out_weight.view(-1, R, G, hd).transpose(1, 2).reshape(out_weight.shape)
    return linear(out, out_w, out_bias)


def native_grouped_attention(qkv: torch.Tensor, num_heads: int, num_groups: int, scale: float
                             ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Softmax attention of ``scale * q.k`` with the native kernels, from the fused projection
    output qkv (B, N, (H + 2G) hd) in the published head order. Returns out (B, N, H hd), heads
    in the same order, and, with autograd, out transposed (H hd, B N) for the output
    projection's weight gradient (else None)."""
    for_backward = torch.is_grad_enabled() and qkv.requires_grad
    out, out_t, _ = torch.ops.moe_mae.attention(qkv, num_heads, num_groups, scale, for_backward)
    return out, out_t if for_backward else None


def native_attention(x: torch.Tensor, qkv_weight, qkv_bias, out_weight, out_bias,
                     num_heads: int, num_groups: int,
                     x_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (B, N, dim) -> (B, N, dim) with the native kernel (see the module docstring)."""
    q_width, _ = _split_heads(qkv_weight, num_heads, num_groups)
    hd = q_width // num_heads
    if hd > native.MAX_HEAD_DIM or not native.accepts(x):
        return torch_attention(x, qkv_weight, qkv_bias, out_weight, out_bias, num_heads,
                               num_groups, x_t)
    qkv = linear(x, qkv_weight, qkv_bias, x_t)
    out, out_t = native_grouped_attention(qkv, num_heads, num_groups, hd ** -0.5)
    return linear(out, out_weight, out_bias, out_t)
