"""The model's operations, one implementation per execution backend, side by side.

Each op module holds its backends' implementations next to each other:

* :mod:`models.ops.attention`: grouped-query attention, from tokens to the output projection;
* :mod:`models.ops.gate`: the noisy top-k gate (and :class:`~models.ops.gate.Routing`);
* :mod:`models.ops.experts`: the mixture of SwiGLU experts, dropout included;
* :mod:`models.ops.norm`, :mod:`models.ops.linear`, :mod:`models.ops.dropout`: the LayerNorm,
  linear layers and dropout between them.

Backends (:data:`BACKENDS`):

* ``reference``: the plain published computation in PyTorch layers; the tests' oracle;
* ``torch``: the fast algebra (fused projections, ``V x`` and ``W2`` once per token) on
  PyTorch ops: oneDNN matmuls on fp32 CPU tensors, SDPA on GPUs;
* ``native``: ``torch`` plus the native CPU kernels of :mod:`models.native` for attention,
  gate, expert mixing, LayerNorm and dropout, on fp32 CPU tensors outside autocast (on other
  tensors these ops run their ``torch`` implementation).

A model's modules hold the :class:`Ops` of one backend, chosen when they are built
(``auto``: ``native`` where the kernels build, else ``torch``) and changed for a whole model
by :func:`set_backend` or, for a block, :func:`use_backend`. The model code calls
``self.ops.<op>(...)`` and makes no backend decisions of its own.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, NamedTuple

import torch.nn as nn

from models import native
from models.ops import attention, dropout, experts, gate, linear, norm

BACKENDS = ("reference", "torch", "native")


class Ops(NamedTuple):
    """One backend's implementation of every op (signatures in the op modules)."""

    name: str
    linear: Callable  # (x, weight, bias, x_t=None) -> y
    layer_norm: Callable  # (x, weight, bias, eps) -> (y, y transposed or None)
    dropout: Callable  # (x, p, training) -> y
    attention: Callable  # (x, qkv_weight, qkv_bias, out_weight, out_bias, H, G, x_t) -> y
    gate: Callable  # (x, weight, bias, k, training) -> Routing
    expert_mixture: Callable  # (x, routing, weight, bias, w2_weight, w2_bias, p, training, x_t)


_OPS: Dict[str, Ops] = {
    "reference": Ops("reference", linear.reference_linear, norm.torch_layer_norm,
                     dropout.reference_dropout, attention.reference_attention,
                     gate.reference_gate, experts.reference_expert_mixture),
    "torch": Ops("torch", linear.linear, norm.torch_layer_norm, dropout.torch_dropout,
                 attention.torch_attention, gate.torch_gate, experts.torch_expert_mixture),
    "native": Ops("native", linear.linear, norm.native_layer_norm, dropout.native_dropout,
                  attention.native_attention, gate.native_gate,
                  experts.native_expert_mixture),
}


def resolve(name: str) -> str:
    """A backend name, with ``auto`` resolved: ``native`` where the kernels build, else
    ``torch``. Raises ValueError for unknown names and RuntimeError for ``native`` where the
    kernels are unavailable."""
    if name == "auto":
        return "native" if native.library() is not None else "torch"
    if name not in _OPS:
        raise ValueError(f"unknown backend {name!r}; choose auto or one of {', '.join(BACKENDS)}")
    if name == "native" and native.library() is None:
        raise RuntimeError(f"the native backend is unavailable: {native.status()}")
    return name


def get(name: str = "auto") -> Ops:
    """The :class:`Ops` of a backend (see :func:`resolve`)."""
    return _OPS[resolve(name)]


def _holders(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if isinstance(getattr(m, "ops", None), Ops))


def backend_of(model: nn.Module) -> str:
    """The backend of a model's modules (ValueError if they differ)."""
    names = {m.ops.name for m in _holders(model)}
    if len(names) != 1:
        raise ValueError(f"the model's modules use {len(names)} backends: {sorted(names)}")
    return names.pop()


def set_backend(model: nn.Module, name: str) -> nn.Module:
    """Every module of ``model`` runs the ops of backend ``name``; returns the model."""
    ops = get(name)
    for module in _holders(model):
        module.ops = ops
    return model


@contextlib.contextmanager
def use_backend(model: nn.Module, name: str):
    """Within the block, ``model`` runs backend ``name``; its modules' backends are restored
    afterwards."""
    ops = get(name)
    holders = list(_holders(model))
    previous = [m.ops for m in holders]
    for m in holders:
        m.ops = ops
    try:
        yield model
    finally:
        for m, old in zip(holders, previous):
            m.ops = old
