"""Training-time routing statistics: how often each expert of each MoE layer is chosen.

:class:`RoutingCounter` counts by forward hooks on the gates, so it needs nothing from the
training loop but the model; training uses it to watch for router collapse.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as torch_dist
import torch.nn as nn

from models.moe_mae import NoisyTopKGate, Routing


def moe_layer_name(gate_name: str) -> str:
    """'encoder.layers.3.moe.gate' -> 'encoder.layers.3'."""
    return gate_name.rsplit(".moe.gate", 1)[0]


class RoutingCounter:
    """Per MoE layer: tokens seen, and per expert how many tokens chose it first (top-1) and
    among their top k. Counts stay on the model's device until read (no synchronisation per
    step). Use as a context manager, or call :meth:`remove` to drop the hooks.

    ``shares()``: per layer, ``top1`` (E,) fractions of tokens whose first choice is each
    expert (sums to 1) and ``topk`` (E,) fractions of tokens that route to each expert at all
    (sums to k; with k=2 and 3 experts, 2/3 each when perfectly balanced).
    """

    def __init__(self, model: nn.Module):
        self.gates = {moe_layer_name(name): gate for name, gate in model.named_modules()
                      if isinstance(gate, NoisyTopKGate)}
        self.counts: Dict[str, Dict[str, torch.Tensor]] = {}
        self.handles = [gate.register_forward_hook(self._hook(name))
                        for name, gate in self.gates.items()]

    def _hook(self, name: str):
        def count(gate, inputs, output):
            num_experts = gate.num_experts
            idx = Routing.of(output).topk_idx.detach()
            top1 = torch.bincount(idx[:, 0], minlength=num_experts)
            topk = torch.bincount(idx.reshape(-1), minlength=num_experts)
            tokens = torch.tensor([idx.shape[0]], device=idx.device)
            if name in self.counts:
                entry = self.counts[name]
                entry["top1"] += top1
                entry["topk"] += topk
                entry["tokens"] += tokens
            else:
                self.counts[name] = {"top1": top1, "topk": topk, "tokens": tokens}
        return count

    def reset(self) -> None:
        self.counts = {}

    def all_reduce(self) -> None:
        """Sum the counts over DDP ranks (every rank must call it)."""
        if torch_dist.is_available() and torch_dist.is_initialized():
            for entry in self.counts.values():
                for tensor in entry.values():
                    torch_dist.all_reduce(tensor)

    def shares(self) -> Dict[str, Dict[str, torch.Tensor]]:
        return {name: {"top1": entry["top1"].double().cpu() / entry["tokens"].item(),
                       "topk": entry["topk"].double().cpu() / entry["tokens"].item()}
                for name, entry in self.counts.items()}

    def collapsed(self, threshold: float = 0.9, prefix: str = "") -> List[str]:
        """One line per layer (whose name starts with ``prefix``) in which a single expert is
        chosen by more than ``threshold`` of the tokens (among their top k)."""
        lines = []
        for name, share in self.shares().items():
            if not name.startswith(prefix):
                continue
            expert = int(share["topk"].argmax())
            if share["topk"][expert] > threshold:
                lines.append(f"{name}: expert {expert} routes {share['topk'][expert]:.0%} of the "
                             f"tokens (top-1 for {share['top1'][expert]:.0%})")
        return lines

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self) -> "RoutingCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
