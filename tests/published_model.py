"""A stand-in for the published model's parameters, for tests of what the published code does
with our checkpoints (and we with its).

:func:`published_parameters` holds a model's weights in the published state_dict layout: one
``nn.Parameter`` per published tensor, in plain modules named like the published ones. A tensor
the published modules share (each layer's ``V`` and ``W2``, registered by expert 0 first; the
``patch_embed`` alias of ``encoder.patch_proj``) is one parameter registered under all its
names, so ``parameters()`` has the published order and an optimizer over it holds the
published optimizer layout. :func:`published_objective` trains it through our model.
"""

import torch
import torch.nn as nn

from models.layout import published_to_fused
from models.moe_mae import MAEObjective, MOEMAE


def published_parameters(mae: MOEMAE) -> nn.Module:
    """Plain modules holding a copy of ``mae``'s weights in the published layout."""
    root, shared = nn.Module(), {}
    for key, value in mae.state_dict().items():
        *path, name = key.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        # our state_dict gives the copies of a shared tensor as the same view
        identity = (value.data_ptr(), tuple(value.shape), value.stride())
        if identity not in shared:
            shared[identity] = nn.Parameter(value.detach().clone())
        module.register_parameter(name, shared[identity])
    return root


def published_objective(mae: MOEMAE, published: nn.Module):
    """A function of the objective's inputs: :class:`MAEObjective` of ``mae`` computed with the
    weights of ``published`` (so its gradients go to those parameters)."""
    objective = MAEObjective(mae)
    # patch_embed is an alias of encoder.patch_proj (the same module): left out, and no tying
    names = [name for name, _ in mae.named_parameters()]

    def loss(*args, **kwargs):
        weights = published_to_fused(mae, published.state_dict(keep_vars=True))
        return torch.func.functional_call(objective, {f"mae.{k}": weights[k] for k in names},
                                          args, kwargs, tie_weights=False)
    return loss
