"""MoE-MAE: a metadata-aware mixture-of-experts masked autoencoder for Earth observation.

The architecture of arXiv 2509.10919 (about 2.5M parameters for size S):

* tokens: 4 metadata tokens (ISO week, hour, latitude, longitude, each a (sin, cos) pair
  projected by its own ``Linear(2, dim)``), a CLS token (index 4) and the ``(img/patch)**2``
  patch tokens of a ``Conv2d`` patch embedding, plus one learned positional embedding over
  the whole sequence ``[week, hour, lat, lon, CLS, patches...]``;
* pre-norm encoder layers: grouped-query attention, then a sparse mixture of SwiGLU experts
  routed by a noisy top-2 gate (Shazeer et al. 2017), with an auxiliary load-balancing loss;
* a two-layer MoE decoder that reconstructs the masked patches (MAE, mask ratio 0.75).

Parameters are what the fast path computes with: attention's fused ``qkv_weight``, the gate's
``[Wg; Wnoise]`` ``weight`` and each MoE layer's ``stacked_weight`` ``[W_0; ...; W_{E-1}; V]``
(and biases), so no step concatenates weights. ``state_dict()`` and ``load_state_dict()`` still
use the published key layout (``../shared/reference``'s JSON lists it; the split and the
fusion are hooks, :mod:`models.layout`), so checkpoints go both ways between the published
code and this one; the published sub-layers (``attn.q_proj``, ``gate.Wg``, ``moe.experts[e]``,
``moe.V``) remain readable as views of the fused parameters.

This file is the architecture; how each operation (attention, gate, expert mixture, the
layer norms, linears and dropout around them) is computed is the execution backend's business,
in :mod:`models.ops`: ``reference`` (the plain published computation, the tests' oracle),
``torch`` (the fast algebra on PyTorch ops) and ``native`` (plus native CPU kernels). Modules
are built with ``auto`` (``native`` where the kernels build, else ``torch``); change it with
:func:`models.ops.set_backend` or, for a block, :func:`models.ops.use_backend`
(:func:`use_reference_impl` for the reference).

In ``eval()`` all backends compute the same function (to fp32 rounding) and the gate adds no
noise, so repeated calls give bit-identical outputs.
"""

from __future__ import annotations

from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import ops
from models.layout import (LinearView, Piece, linear_pieces, publish_layout,
                           published_linear, stacked_linear_pieces)
from models.ops.gate import Routing

NUM_META_TOKENS = 4  # week, hour, lat, lon
CLS_INDEX = NUM_META_TOKENS  # the CLS token follows the metadata tokens
POOLINGS = ("cls", "mean", "all", "meta_cls")
CPU_INFERENCE_CHUNK = 128  # images per chunk in CPU inference (see MOEEncoder.forward_features)

# Published sizes. dh = expert hidden width, interpolated from dfirsth (layer 0) to dlasth.
MODEL_SIZES = {
    "S": dict(embed_dim=144, depth=15, dfirsth=144, dlasth=72, num_heads=8, num_groups=4),
    "XS": dict(embed_dim=128, depth=12, dfirsth=96, dlasth=32, num_heads=8, num_groups=4),
    "XXS": dict(embed_dim=108, depth=9, dfirsth=81, dlasth=27, num_heads=6, num_groups=3),
}


# ----------------------------------------------------------------------------- experts


def fused_parameters(*linears: nn.Linear) -> Tuple[nn.Parameter, nn.Parameter]:
    """The weights and the biases of ``linears`` stacked by rows, as two new parameters: a
    fused layer initialised exactly as its published sub-layers (each ``nn.Linear``'s own
    default init on its fan-in)."""
    return (nn.Parameter(torch.cat([layer.weight for layer in linears]).detach()),
            nn.Parameter(torch.cat([layer.bias for layer in linears]).detach()))


class SwiGLU:
    """One published expert, ``dropout(W2(silu(W x) * (V x)))``, as a view of its MoE
    layer's parameters (see :attr:`MoELayer.experts`): ``W`` and ``V`` are rows of the
    stacked projection, ``W2`` the layer's shared output projection. The MoE layer computes
    all its experts at once; this per-expert computation is for analysis."""

    def __init__(self, W: LinearView, V: LinearView, W2: nn.Linear, dropout: nn.Dropout):
        self.W, self.V, self.W2, self.dropout = W, V, W2, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim)."""
        return self.dropout(self.W2(F.silu(self.W(x)) * self.V(x)))

    __call__ = forward


class NoisyTopKGate(nn.Module):
    """Noisy top-k gating: ``H = Wg x + eps * softplus(Wnoise x)``, ``eps ~ N(0, 1)``.

    One fused projection ``weight`` (2E, dim) = ``[Wg; Wnoise]`` and ``bias`` (2E,); the
    published ``Wg`` and ``Wnoise`` are views of it (and its state_dict keys, see
    :mod:`models.layout`). The noise is drawn in training mode only; in ``eval()`` the gate
    routes on the clean logits, so inference is deterministic (the published gate was noisy
    in eval too).
    """

    def __init__(self, dim: int, num_experts: int, k: int = 2):
        super().__init__()
        if not 0 < k < num_experts:
            raise ValueError(f"top-k gate needs 0 < k < num_experts, got k={k}, "
                             f"num_experts={num_experts}")
        self.weight, self.bias = fused_parameters(nn.Linear(dim, num_experts),  # Wg
                                                  nn.Linear(dim, num_experts))  # Wnoise
        self.k = k
        self.ops = ops.get()
        publish_layout(self)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0] // 2

    def published_layout(self) -> List[Piece]:
        E = self.num_experts
        return stacked_linear_pieces("weight", "bias", [("Wg", E), ("Wnoise", E)])

    Wg, Wnoise = published_linear(), published_linear()

    def forward(self, x: torch.Tensor) -> Routing:
        """x: (T, dim) -> :class:`Routing` (computed in fp32, see :mod:`models.ops.gate`)."""
        return self.ops.gate(x, self.weight, self.bias, self.k, self.training)


def coefficient_of_variation(x: torch.Tensor) -> torch.Tensor:
    return x.std(unbiased=False) / (x.mean() + 1e-6)


def load_balancing_loss(routing: Routing, w_importance: float = 1e-2,
                        w_load: float = 1e-2) -> torch.Tensor:
    """``w_importance * CV(importance) + w_load * CV(load)`` (Shazeer et al. 2017, sec. 4).

    importance_e = sum over tokens of the gate value of expert e. load_e = sum over tokens
    of P(expert e stays in the top k when only its own noise is redrawn)
    ``= Phi((clean_e - threshold_e) / noise_scale_e)``, where threshold_e is the k-th largest
    noisy logit among the *other* experts: the (k+1)-th largest overall for an expert inside
    the top k, the k-th largest otherwise.

    This is the paper's estimator. The published code instead clamps each expert's own noisy
    logit into [(k+1)-th, k-th largest] and uses that as its threshold: the k-th largest for
    an expert inside the top k (instead of the (k+1)-th) and the (k+1)-th for one outside
    (instead of the k-th). Checkpoints are unaffected; the balancing loss, and so training,
    differ slightly.
    """
    if routing.balance is not None:  # computed by the gate's native kernel
        importance, load = routing.balance
        return w_importance * coefficient_of_variation(importance) + \
            w_load * coefficient_of_variation(load)
    noisy, k = routing.noisy_logits, routing.topk_idx.shape[1]
    top_vals = noisy.topk(k + 1, dim=-1).values
    kth, kth_plus_1 = top_vals[:, k - 1:k], top_vals[:, k:k + 1]
    in_topk = torch.zeros_like(noisy, dtype=torch.bool).scatter(1, routing.topk_idx, True)
    threshold = torch.where(in_topk, kth_plus_1, kth)
    load = torch.special.ndtr((routing.clean_logits - threshold) / routing.noise_scale).sum(0)
    importance = routing.gates.sum(0)
    return w_importance * coefficient_of_variation(importance) + \
        w_load * coefficient_of_variation(load)


class MoELayer(nn.Module):
    """Sparse mixture of SwiGLU experts with a noisy top-k gate.

    Parameters: ``stacked_weight`` ((E + 1) dh, dim) = ``[W_0; ...; W_{E-1}; V]`` and
    ``stacked_bias``, and the shared output projection ``W2`` (an ``nn.Linear`` dh -> dim);
    :attr:`experts` are the published experts as views of them.

    Within one layer every expert has its own ``W`` while ``V`` and ``W2`` are shared, so for a
    token with gates g_e (summing to 1 over its top k experts)::

        y = sum_e g_e W2(silu(W_e x) * V x) = W2(V x * sum_e g_e silu(W_e x))

    The fast backends (:mod:`models.ops.experts`) use the right-hand side: ``V x`` and ``W2``
    once per token (the bias of W2 is exact because the gates sum to 1), with dropout
    (training only) once on the combined output instead of on each expert's output before
    gating as in the reference; both keep the expectation.

    Experts that receive no token: in the fast backends every expert's ``W`` is part of one
    matmul over all tokens, so it gets a gradient (exactly zero when unused), and the gate's
    parameters always get gradients through the load-balancing loss. Every parameter thus
    receives a gradient on every step, whatever the routing, and DDP runs with
    ``find_unused_parameters=False``. (The reference skips unused experts, as published.)
    """

    def __init__(self, dim: int, hidden: int, num_experts: int = 3, k: int = 2,
                 dropout: float = 0.1, w_importance: float = 1e-2, w_load: float = 1e-2):
        super().__init__()
        self.dim, self.hidden, self.num_experts, self.k = dim, hidden, num_experts, k
        # the published sub-layers, created in the published order (same random init)
        V, W2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        Ws = [nn.Linear(dim, hidden) for _ in range(num_experts)]
        self.stacked_weight, self.stacked_bias = fused_parameters(*Ws, V)
        self.W2 = W2
        self.gate = NoisyTopKGate(dim, num_experts, k)
        self.dropout = nn.Dropout(dropout)
        self.w_importance, self.w_load = w_importance, w_load
        self.ops = ops.get()
        publish_layout(self)

    def published_layout(self) -> List[Piece]:
        """Published expert e: ``experts.{e}.W`` (rows e dh..(e + 1) dh of the stack), and
        copies of the shared ``V`` (the last dh rows) and ``W2``."""
        E, dh = self.num_experts, self.hidden
        V_rows = slice(E * dh, (E + 1) * dh)
        pieces = []
        for e in range(E):
            pieces += linear_pieces(f"experts.{e}.W", "stacked_weight", "stacked_bias",
                                    slice(e * dh, (e + 1) * dh))
            pieces += linear_pieces(f"experts.{e}.V", "stacked_weight", "stacked_bias", V_rows)
            pieces += linear_pieces(f"experts.{e}.W2", "W2.weight", "W2.bias", slice(None))
        return pieces

    @property
    def experts(self) -> Tuple[SwiGLU, ...]:
        """The published experts, as views of the stacked parameters."""
        return tuple(SwiGLU(LinearView(self, f"experts.{e}.W"), self.V, self.W2, self.dropout)
                     for e in range(self.num_experts))

    V = published_linear("experts.0.V")  # the shared V, as published expert 0 holds it

    def forward(self, x: torch.Tensor, x_t: Optional[torch.Tensor] = None,
                with_loss: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x: (B, N, dim) -> (y (B, N, dim), auxiliary loss (scalar), or None when
        ``with_loss`` is False: inference that needs no loss skips its computation).
        x_t: optionally x as a contiguous (dim, B * N) transpose, for weight gradients."""
        y, aux_loss, _ = self.forward_with_routing(x, x_t, with_loss)
        return y, aux_loss

    def forward_with_routing(self, x: torch.Tensor, x_t: Optional[torch.Tensor] = None,
                             with_loss: bool = True
                             ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Routing]:
        """:meth:`forward`, and the gate's :class:`Routing` of the B * N tokens."""
        flat = x.reshape(-1, self.dim)
        routing = Routing.of(self.gate(flat))
        aux_loss = load_balancing_loss(routing, self.w_importance, self.w_load) \
            if with_loss else None
        y = self.ops.expert_mixture(flat, routing, *self.stacked_weights(), self.dropout.p,
                                    self.training, x_t)
        return y.view_as(x), aux_loss, routing

    def stacked_weights(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(``[W_0; ...; W_{E-1}; V]`` weight ((E + 1) dh, dim) and bias, W2 weight (dim, dh)
        and bias): the operands of :mod:`models.ops.experts`."""
        return self.stacked_weight, self.stacked_bias, self.W2.weight, self.W2.bias


# ---------------------------------------------------------------------------- attention


class GroupedQueryAttention(nn.Module):
    """Grouped-query attention: ``num_heads`` query heads share ``num_groups`` k/v heads.

    Query head h uses k/v group ``h % num_groups`` (the published code repeats k/v with
    ``unsqueeze(2).repeat``, which interleaves groups); :mod:`models.ops.attention` computes
    it per backend. Parameters: ``qkv_weight`` ((H + 2 G) hd, dim) = ``[q; k; v]`` and
    ``qkv_bias``, and ``out_proj``; ``q_proj``, ``k_proj``, ``v_proj`` are views of the rows.
    """

    def __init__(self, dim: int, num_heads: int = 8, num_groups: int = 4):
        super().__init__()
        if dim % num_heads or num_heads % num_groups:
            raise ValueError(f"need dim % num_heads == 0 and num_heads % num_groups == 0, got "
                             f"dim={dim}, num_heads={num_heads}, num_groups={num_groups}")
        self.dim, self.num_heads, self.num_groups = dim, num_heads, num_groups
        self.head_dim = dim // num_heads
        kv_dim = num_groups * self.head_dim
        self.qkv_weight, self.qkv_bias = fused_parameters(
            nn.Linear(dim, dim), nn.Linear(dim, kv_dim), nn.Linear(dim, kv_dim))  # q, k, v
        self.out_proj = nn.Linear(dim, dim)
        self.ops = ops.get()
        publish_layout(self)

    def published_layout(self) -> List[Piece]:
        kv_dim = self.num_groups * self.head_dim
        return stacked_linear_pieces("qkv_weight", "qkv_bias",
                                     [("q_proj", self.dim), ("k_proj", kv_dim), ("v_proj", kv_dim)])

    q_proj, k_proj, v_proj = published_linear(), published_linear(), published_linear()

    def forward(self, x: torch.Tensor, x_t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, dim) -> (B, N, dim). x_t: optionally x as a contiguous (dim, B * N)
        transpose, for the weight gradient of the q/k/v projection."""
        return self.ops.attention(x, self.qkv_weight, self.qkv_bias, self.out_proj.weight,
                                  self.out_proj.bias, self.num_heads, self.num_groups, x_t)


# ------------------------------------------------------------------------------ encoder


class LayerStep(NamedTuple):
    """One encoder layer ``output = h + moe(norm2(h))`` with ``h = x + attn(norm1(x))``;
    tensors (B, L, dim)."""

    residual: torch.Tensor  # h, the stream the MoE output is added to
    moe_input: torch.Tensor  # norm2(h), what the gate and the experts see
    moe_output: torch.Tensor
    output: torch.Tensor
    aux_loss: Optional[torch.Tensor]  # the MoE's load-balancing loss (None without with_loss)
    routing: Routing  # the gate's decisions for the B * L tokens


class MoETransformerEncoderLayer(nn.Module):
    """Pre-norm block: ``x = x + attn(norm1(x)); x = x + moe(norm2(x))``."""

    def __init__(self, m: int, dh: int, num_experts: int = 3, k: int = 2, num_heads: int = 8,
                 num_groups: int = 4, dropout: float = 0.1):
        super().__init__()
        self.norm1 = nn.LayerNorm(m)
        self.attn = GroupedQueryAttention(m, num_heads, num_groups)
        self.norm2 = nn.LayerNorm(m)
        self.moe = MoELayer(m, dh, num_experts, k, dropout)
        self.ops = ops.get()

    def _norm(self, x: torch.Tensor, norm: nn.LayerNorm
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(norm(x), its transpose or None; see :mod:`models.ops.norm`)."""
        return self.ops.layer_norm(x, norm.weight, norm.bias, norm.eps)

    def forward(self, x: torch.Tensor, with_loss: bool = True
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x: (B, N, m) -> (x (B, N, m), auxiliary loss or None, see :meth:`MoELayer.forward`)."""
        step = self.steps(x, with_loss)
        return step.output, step.aux_loss

    def steps(self, x: torch.Tensor, with_loss: bool = True) -> LayerStep:
        """:meth:`forward` with its intermediate tokens and the routing (:class:`LayerStep`)."""
        # a norm may also hand its output transposed to the next layers' weight gradients
        residual = x + self.attn(*self._norm(x, self.norm1))
        moe_input, moe_input_t = self._norm(residual, self.norm2)
        moe_output, aux_loss, routing = self.moe.forward_with_routing(moe_input, moe_input_t,
                                                                      with_loss)
        return LayerStep(residual, moe_input, moe_output, residual + moe_output, aux_loss,
                         routing)


def expert_hidden_widths(depth: int, dfirsth: int, dlasth: int) -> List[int]:
    """Expert hidden width per layer, linearly from ``dfirsth`` down to ``dlasth``."""
    if depth == 1:
        return [dfirsth]
    return [int(((depth - 1 - i) / (depth - 1)) * (dfirsth - dlasth)) + dlasth
            for i in range(depth)]


def experts_per_layer(depth: int, experts_per_stage: Tuple[int, int] = (3, 5)) -> List[int]:
    """Expert count per layer: three stages of ``depth // 3`` layers (the last stage takes the
    remainder), with ``first, first + (last - first - 1), first + 2 (last - first - 1)``
    experts, i.e. 3, 4, 5 for the published ``(3, 5)``."""
    first, last = experts_per_stage
    stage_size = max(depth // 3, 1)
    return [first + min(i // stage_size, 2) * (last - first - 1) for i in range(depth)]


def sincos_position_embedding(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) 2-D sine-cosine embedding of a row-major patch grid (MAE's init):
    the first dim / 2 channels encode the row, the rest the column, each as sin and cos of
    the position at dim / 4 frequencies from 1 down to 1 / 10000."""
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine embedding needs dim % 4 == 0, got {dim}")
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for position in (rows.flatten(), cols.flatten()):
        angles = position[:, None] * frequencies[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


class MOEEncoder(nn.Module):
    """The MoE-MAE encoder.

    ``forward(x, meta_week, meta_hour, meta_lat, meta_lon)`` with x (B, C, H, W) and each
    meta (B, 2) (sin, cos) pair, or None for missing metadata (treated as zeros), returns
    ``(normed_tokens, moe_loss, tokens_before_final_norm)``, tokens (B, 5 + num_patches, dim)
    in the order ``[week, hour, lat, lon, CLS, patches...]``.
    """

    def __init__(self, *, img_size: int = 40, patch_size: int = 4, in_chans: int = 7,
                 embed_dim: int = 144, depth: int = 15, dfirsth: int = 144, dlasth: int = 72,
                 num_heads: int = 8, num_groups: int = 4,
                 experts_config: Optional[Sequence[int]] = None,
                 experts_per_stage: Tuple[int, int] = (3, 5), k: int = 2,
                 dropout: float = 0.1, num_meta_tokens: int = NUM_META_TOKENS):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if num_meta_tokens != NUM_META_TOKENS:
            raise ValueError(f"the encoder has exactly {NUM_META_TOKENS} metadata tokens")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.depth = embed_dim, depth
        self.patch_grid = img_size // patch_size
        self.num_patches = self.patch_grid ** 2
        self.num_meta_tokens = num_meta_tokens
        self.dh_list = expert_hidden_widths(depth, dfirsth, dlasth)
        self.experts_config = list(experts_config or experts_per_layer(depth, experts_per_stage))

        # Registration order reproduces the published state_dict order.
        self.patch_proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.week_proj = nn.Linear(2, embed_dim)
        self.hour_proj = nn.Linear(2, embed_dim)
        self.lat_proj = nn.Linear(2, embed_dim)
        self.lon_proj = nn.Linear(2, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1 + num_meta_tokens,
                                                  embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.layers = nn.ModuleList(
            MoETransformerEncoderLayer(embed_dim, dh, experts, k, num_heads, num_groups, dropout)
            for dh, experts in zip(self.dh_list, self.experts_config))
        self.norm = nn.LayerNorm(embed_dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        with torch.no_grad():
            self.pos_embed[0, num_meta_tokens + 1:] = sincos_position_embedding(self.patch_grid,
                                                                                embed_dim)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @property
    def num_tokens(self) -> int:
        return self.num_meta_tokens + 1 + self.num_patches

    def prepare_tokens(self, x: torch.Tensor, meta_week=None, meta_hour=None, meta_lat=None,
                       meta_lon=None, ids_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embed an image and its metadata, with positional embeddings.

        x: (B, C, H, W); meta_*: (B, 2) or None; ids_keep: (B, K) indices of the patches to
        keep (MAE masking), or None for all. Returns (B, 5 + K, dim).
        """
        B, M = x.shape[0], self.num_meta_tokens
        patches = self.patch_proj(x).flatten(2).transpose(1, 2) + self.pos_embed[:, M + 1:]
        if ids_keep is not None:
            patches = patches.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, self.embed_dim))
        meta = []
        for proj, value in ((self.week_proj, meta_week), (self.hour_proj, meta_hour),
                            (self.lat_proj, meta_lat), (self.lon_proj, meta_lon)):
            if value is None:
                value = x.new_zeros(B, 2)
            meta.append(proj(value.to(x.dtype)))
        meta_cls = torch.cat([torch.stack(meta, dim=1), self.cls_token.expand(B, -1, -1)], dim=1)
        return torch.cat([meta_cls + self.pos_embed[:, :M + 1], patches], dim=1)

    def forward_layers(self, tokens: torch.Tensor, with_loss: bool = True
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Run the encoder layers. tokens (B, L, dim) -> (tokens before the final norm,
        sum of the layers' auxiliary losses, or None without ``with_loss``)."""
        moe_loss = tokens.new_zeros(()) if with_loss else None
        for layer in self.layers:
            tokens, aux_loss = layer(tokens, with_loss)
            if with_loss:
                moe_loss = moe_loss + aux_loss
        return tokens, moe_loss

    def forward(self, x: torch.Tensor, meta_week=None, meta_hour=None, meta_lat=None,
                meta_lon=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = self.prepare_tokens(x, meta_week, meta_hour, meta_lat, meta_lon)
        tokens, moe_loss = self.forward_layers(tokens)
        return self.norm(tokens), moe_loss, tokens

    def forward_features(self, x: torch.Tensor, meta_week=None, meta_hour=None, meta_lat=None,
                         meta_lon=None, normed: bool = True,
                         chunk_size: Optional[int] = None) -> torch.Tensor:
        """All tokens (B, 5 + num_patches, dim), after the final norm or before it.

        The inference entry point: it skips the load-balancing loss, and without autograd on
        CPU the batch runs in chunks of ``chunk_size`` images (default
        :data:`CPU_INFERENCE_CHUNK`), which keeps activations in cache and avoids re-faulting
        large fresh buffers. Chunking changes results only at the level of fp32 rounding; a
        given call is deterministic.
        """
        return self._in_chunks(x, (meta_week, meta_hour, meta_lat, meta_lon), chunk_size,
                               lambda tokens: tokens, normed)

    def embed(self, x: torch.Tensor, meta_week=None, meta_hour=None, meta_lat=None,
              meta_lon=None, pooling: str = "cls", normed: bool = True,
              chunk_size: Optional[int] = None) -> torch.Tensor:
        """Embeddings for downstream probes.

        pooling: ``cls`` (B, dim) token 4; ``mean`` (B, dim) mean over all tokens; ``all``
        (B, L * dim) every token flattened (L = 105 for 40x40 chips and patch 4);
        ``meta_cls`` (B, 5 * dim) the four metadata tokens and CLS flattened.
        normed: take tokens after the final LayerNorm (True) or before it (False; the
        published notebooks used these). chunk_size: see :meth:`forward_features`.
        """
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        return self._in_chunks(x, (meta_week, meta_hour, meta_lat, meta_lon), chunk_size,
                               lambda tokens: pool_tokens(tokens, pooling), normed)

    def _in_chunks(self, x, metas, chunk_size, finish, normed):
        if chunk_size is None:
            inference_on_cpu = x.device.type == "cpu" and not torch.is_grad_enabled()
            chunk_size = CPU_INFERENCE_CHUNK if inference_on_cpu else x.shape[0]
        outputs = []
        for start in range(0, x.shape[0], max(chunk_size, 1)):
            part = slice(start, start + chunk_size)
            tokens = self.prepare_tokens(x[part], *(None if m is None else m[part] for m in metas))
            tokens, _ = self.forward_layers(tokens, with_loss=False)
            outputs.append(finish(self.norm(tokens) if normed else tokens))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def pool_tokens(tokens: torch.Tensor, pooling: str) -> torch.Tensor:
    """tokens (B, L, dim) -> embeddings, see :meth:`MOEEncoder.embed`."""
    if pooling == "cls":
        return tokens[:, CLS_INDEX]
    if pooling == "mean":
        return tokens.mean(dim=1)
    if pooling == "all":
        return tokens.flatten(1)
    if pooling == "meta_cls":
        return tokens[:, :CLS_INDEX + 1].flatten(1)
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")


# ---------------------------------------------------------------------------------- MAE


class MOEMAE(nn.Module):
    """Masked autoencoder around a :class:`MOEEncoder`, with a small MoE decoder.

    ``forward(imgs, meta_week, meta_hour, meta_lat, meta_lon)`` returns
    ``(pred, mask, ids_restore, moe_loss)``: pred (B, N, p*p*C) in the patch order of
    :meth:`patchify`, mask (B, N) with 1 for removed patches, ids_restore (B, N), and the
    encoder's auxiliary loss (as published, the decoder's auxiliary losses are not included).
    """

    def __init__(self, encoder: MOEEncoder, decoder_layers: int = 2, decoder_embed: int = 108,
                 mask_ratio: float = 0.75):
        super().__init__()
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.patch_embed = encoder.patch_proj  # published alias; shares the parameters
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_embed)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, encoder.num_patches, decoder_embed))
        self.decoder_layers = nn.ModuleList(
            MoETransformerEncoderLayer(decoder_embed, decoder_embed // 2, num_experts=3, k=2,
                                       num_heads=6, num_groups=3, dropout=0.1)
            for _ in range(decoder_layers))
        self.decoder_norm = nn.LayerNorm(decoder_embed)
        self.decoder_pred = nn.Linear(decoder_embed,
                                      encoder.patch_size ** 2 * encoder.in_chans)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        with torch.no_grad():
            self.decoder_pos_embed[0] = sincos_position_embedding(encoder.patch_grid,
                                                                  decoder_embed)
        self.ops = ops.get()

    def random_masking(self, batch_size: int, mask_ratio: Optional[float] = None,
                       noise: Optional[torch.Tensor] = None, device=None
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking by argsort of uniform noise.

        Keeps ``int(N * (1 - mask_ratio))`` patches. ``noise`` (B, N) makes the masking
        reproducible; without it, a ratio that masks nothing keeps the patches in order (so
        full reconstructions do not depend on the random generator).
        Returns ids_keep (B, K), ids_restore (B, N), mask (B, N) (1 = removed).
        """
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        N = self.encoder.num_patches
        len_keep = int(N * (1 - mask_ratio))
        if noise is None and len_keep == N:  # nothing masked: keep the patches in order
            noise = torch.arange(N, device=device, dtype=torch.float32).expand(batch_size, N)
        elif noise is None:
            noise = torch.rand(batch_size, N, device=device)
        elif noise.shape != (batch_size, N):
            raise ValueError(f"masking noise must have shape {(batch_size, N)}, "
                             f"got {tuple(noise.shape)}")
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        mask = torch.ones(batch_size, N, device=noise.device).scatter_(1, ids_keep, 0.0)
        return ids_keep, ids_restore, mask

    def forward_encoder(self, imgs, meta_week=None, meta_hour=None, meta_lat=None,
                        meta_lon=None, mask_ratio: Optional[float] = None,
                        noise: Optional[torch.Tensor] = None):
        """Returns (normed latent (B, 5 + K, dim), moe_loss, mask, ids_restore)."""
        ids_keep, ids_restore, mask = self.random_masking(imgs.shape[0], mask_ratio, noise,
                                                          imgs.device)
        tokens = self.encoder.prepare_tokens(imgs, meta_week, meta_hour, meta_lat, meta_lon,
                                             ids_keep)
        tokens, moe_loss = self.encoder.forward_layers(tokens)
        return self._norm(tokens, self.encoder.norm), moe_loss, mask, ids_restore

    def _norm(self, x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        return self.ops.layer_norm(x, norm.weight, norm.bias, norm.eps)[0]

    def _linear(self, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        return self.ops.linear(x, layer.weight, layer.bias)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 5 + K, dim), ids_restore (B, N) -> pred (B, N, p*p*C)."""
        M = self.encoder.num_meta_tokens
        x = self._linear(latent, self.decoder_embed)
        meta_cls, kept = x[:, :M + 1], x[:, M + 1:]
        B, K, D = kept.shape
        N = ids_restore.shape[1]
        patches = torch.cat([kept, self.mask_token.expand(B, N - K, D)], dim=1)
        patches = patches.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
        x = torch.cat([meta_cls, patches + self.decoder_pos_embed], dim=1)
        for layer in self.decoder_layers:  # their balancing losses are unused, as published
            x, _ = layer(x, with_loss=False)
        return self._linear(self._norm(x, self.decoder_norm)[:, M + 1:], self.decoder_pred)

    def forward(self, imgs, meta_week=None, meta_hour=None, meta_lat=None, meta_lon=None,
                mask_ratio: Optional[float] = None, noise: Optional[torch.Tensor] = None):
        latent, moe_loss, mask, ids_restore = self.forward_encoder(
            imgs, meta_week, meta_hour, meta_lat, meta_lon, mask_ratio, noise)
        return self.forward_decoder(latent, ids_restore), mask, ids_restore, moe_loss

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), the layout of ``F.unfold(imgs, p, stride=p)``."""
        p = self.encoder.patch_size
        return F.unfold(imgs, kernel_size=p, stride=p).transpose(1, 2)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W), the inverse of :meth:`patchify`."""
        p, size = self.encoder.patch_size, self.encoder.img_size
        return F.fold(patches.transpose(1, 2), output_size=(size, size), kernel_size=p, stride=p)

    def reconstruction_losses(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Squared error summed over each patch's p*p*C values, averaged over the masked
        patches of the batch and over the visible ones: (loss_masked, loss_unmasked).
        A term with no patches (e.g. masked loss at mask ratio 0) is 0."""
        per_patch = (pred.float() - self.patchify(imgs).float()).pow(2).sum(-1)
        mask = mask.to(per_patch.dtype)
        loss_masked = (per_patch * mask).sum() / mask.sum().clamp(min=1)
        loss_unmasked = (per_patch * (1 - mask)).sum() / (1 - mask).sum().clamp(min=1)
        return loss_masked, loss_unmasked


class MAEObjective(nn.Module):
    """The pretraining loss as a module:
    ``L_masked + unmasked_weight * L_unmasked + moe_weight * moe_loss`` (0.1 and 0.5 as
    published), see :meth:`MOEMAE.reconstruction_losses`. Training wraps this module (not the
    MAE) in DDP, so gradient synchronisation sees the whole computation.
    """

    def __init__(self, mae: MOEMAE, unmasked_weight: float = 0.1, moe_weight: float = 0.5):
        super().__init__()
        self.mae = mae
        self.unmasked_weight, self.moe_weight = unmasked_weight, moe_weight

    def forward(self, imgs, meta_week=None, meta_hour=None, meta_lat=None, meta_lon=None,
                mask_ratio: Optional[float] = None, noise: Optional[torch.Tensor] = None):
        """Returns a dict of scalar tensors: loss, masked, unmasked, moe."""
        pred, mask, _, moe_loss = self.mae(imgs, meta_week, meta_hour, meta_lat, meta_lon,
                                           mask_ratio=mask_ratio, noise=noise)
        masked, unmasked = self.mae.reconstruction_losses(imgs, pred, mask)
        moe_loss = moe_loss.float()
        loss = masked + self.unmasked_weight * unmasked + self.moe_weight * moe_loss
        return {"loss": loss, "masked": masked, "unmasked": unmasked, "moe": moe_loss}


# ------------------------------------------------------------------------------ helpers


def build_model(size: str = "S", img_size: int = 40, patch_size: int = 4, in_chans: int = 7,
                **overrides) -> MOEEncoder:
    """An encoder of a published size (``S``, ``XS``, ``XXS``); wrap it in :class:`MOEMAE`."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
    return MOEEncoder(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                      **{**MODEL_SIZES[size], **overrides})


def build_mae(size: str = "S", img_size: int = 40, patch_size: int = 4, in_chans: int = 7,
              mask_ratio: float = 0.75) -> MOEMAE:
    return MOEMAE(build_model(size, img_size, patch_size, in_chans), mask_ratio=mask_ratio)


def moe_layers(model: nn.Module) -> Iterator[Tuple[str, MoELayer]]:
    """(name, layer) for every MoE layer of a model, encoder first."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, MoELayer))


def use_reference_impl(model: nn.Module, enabled: bool = True):
    """Within the block (a context manager), ``model`` runs the plain published computation
    (the ``reference`` backend) when ``enabled``, else the default fast backend."""
    return ops.use_backend(model, "reference" if enabled else "auto")


def count_parameters(model: nn.Module) -> int:
    """Number of parameter values (the published count: shared V/W2 and the patch_embed
    alias counted once)."""
    return sum(p.numel() for p in model.parameters())
