"""Noisy top-k gate: ``H = Wg x + eps * softplus(Wnoise x)``, ``eps ~ N(0, 1)`` in training,
``H = Wg x`` otherwise; the k largest entries of H route the token, their softmax gates it.

Every backend takes the fused gate projection ``weight`` (2E, dim) = ``[Wg; Wnoise]`` and
``bias`` (2E,) and returns a :class:`Routing`:

* reference: the two projections and the routing in PyTorch ops;
* torch: one fused projection, the routing in PyTorch ops;
* native: one fused projection, then routing and the load-balancing statistics in one kernel
  pass (fp32 CPU, up to ``native.MAX_EXPERTS`` experts; the torch backend otherwise).

The routing runs in fp32 whatever the autocast dtype: bf16 logits tie often in top-k, and
softplus and the balancing loss's normal CDF need the range.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from models import native
from models.ops.linear import linear
from models.ops.precision import at_least_fp32


class Routing(NamedTuple):
    """What the gate decided for T tokens routed among E experts (top k).

    The first five fields are the published gate's return value, in its order, so published
    analysis code (``gates, _, topk_idx, *_ = moe.gate(x)``) runs unchanged.
    """

    gates: torch.Tensor  # (T, E) dense gate values, zero outside each token's top k
    noisy_logits: torch.Tensor  # (T, E) Wg x + eps * noise_scale (== clean in eval)
    topk_idx: torch.Tensor  # (T, k) expert ids, best first
    noise_scale: torch.Tensor  # (T, E) softplus(Wnoise x)
    clean_logits: torch.Tensor  # (T, E) Wg x
    topk_gates: torch.Tensor  # (T, k) softmax over the k selected noisy logits
    # (importance (E,), load (E,)) when the gate computed them (native kernel), else None
    balance: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    @classmethod
    def build(cls, topk_idx, topk_gates, clean_logits, noisy_logits, noise_scale,
              balance=None) -> "Routing":
        """A routing from the top-k choice, with the dense gates filled in."""
        gates = clean_logits.new_zeros(clean_logits.shape).scatter(1, topk_idx, topk_gates)
        return cls(gates, noisy_logits, topk_idx, noise_scale, clean_logits, topk_gates,
                   balance)

    @classmethod
    def of(cls, gate_output: Sequence[torch.Tensor]) -> "Routing":
        """A gate's output as a Routing: the published analysis replaces ``gate.forward`` by
        functions returning the published 5-tuple (gates, noisy, topk_idx, scale, clean)."""
        if isinstance(gate_output, Routing):
            return gate_output
        gates, noisy, topk_idx, noise_scale, clean = gate_output[:5]
        return cls(gates, noisy, topk_idx, noise_scale, clean, gates.gather(1, topk_idx))


def _route(clean: torch.Tensor, noise_logits: torch.Tensor, k: int, training: bool) -> Routing:
    clean, noise_logits = at_least_fp32(clean), at_least_fp32(noise_logits)
    noise_scale = F.softplus(noise_logits)
    noisy = clean + torch.randn_like(clean) * noise_scale if training else clean
    topk_vals, topk_idx = noisy.topk(k, dim=-1)
    return Routing.build(topk_idx, topk_vals.softmax(dim=-1), clean, noisy, noise_scale)


def reference_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int,
                   training: bool) -> Routing:
    """x (T, dim) -> Routing, the published two projections."""
    E = weight.shape[0] // 2
    return _route(F.linear(x, weight[:E], bias[:E]), F.linear(x, weight[E:], bias[E:]), k,
                  training)


def torch_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int,
               training: bool) -> Routing:
    """x (T, dim) -> Routing, one fused projection."""
    clean, noise_logits = linear(x, weight, bias).chunk(2, dim=-1)
    return _route(clean, noise_logits, k, training)


def native_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int,
                training: bool) -> Routing:
    """x (T, dim) -> Routing with the balancing statistics (see the module docstring)."""
    logits = linear(x, weight, bias)
    E = weight.shape[0] // 2
    if E > native.MAX_EXPERTS or not native.accepts(logits):
        clean, noise_logits = logits.chunk(2, dim=-1)
        return _route(clean, noise_logits, k, training)
    eps = torch.randn(x.shape[0], E, dtype=x.dtype) if training else None
    topk_idx, gates, noisy, noise_scale, importance, load = torch.ops.moe_mae.gate(logits, eps, k)
    return Routing.build(topk_idx, gates, logits[:, :E], noisy, noise_scale, (importance, load))
