"""The published key layout on top of fused parameters.

The modules compute with fused parameters: attention's ``qkv_weight`` = ``[q; k; v]``, the
gate's ``weight`` = ``[Wg; Wnoise]``, the MoE layer's ``stacked_weight`` = ``[W_0; ...;
W_{E-1}; V]`` (and their biases). Checkpoints keep the published layout, one tensor per
published ``nn.Linear`` (``attn.q_proj.weight``, ``moe.experts.1.W.bias``, ...).

One table connects the two: a module with fused parameters lists, in ``published_layout()``,
a :class:`Piece` per published key it owns: which of its parameters holds that tensor, and in
which rows. Everything else reads that table:

* ``state_dict()`` splits fused parameters into the published keys and ``load_state_dict()``
  fuses them back (hooks installed by :func:`publish_layout`);
* :class:`LinearView` is a published sub-layer (``attn.q_proj``, ``gate.Wg``, ...) as rows
  of the fused parameters, for code that reads them;
* :func:`published_optimizer_state` and :func:`optimizer_state_for` convert optimizer states
  (checkpoints hold the published layout; a published ``--resume`` reads them).

Published experts share ``V`` and ``W2``, so each published expert carries a copy of their
keys: several pieces name the same rows. The first is the tensor; the others are copies
(equal in any real checkpoint), which loading ignores and which are no parameters of the
published model (its ``parameters()`` yields shared modules once).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class Piece(NamedTuple):
    """One published tensor inside a module's fused parameter (names relative to the module)."""

    key: str  # published key, e.g. "q_proj.weight"
    param: str  # the parameter holding it, e.g. "qkv_weight" (or "W2.weight": a whole one)
    rows: slice  # its rows in that parameter (slice(None): all of them)


def linear_pieces(name: str, weight: str, bias: str, rows: slice) -> List[Piece]:
    """The two pieces of a published ``nn.Linear`` ``name`` held in ``rows`` of the fused
    parameters ``weight`` and ``bias``."""
    return [Piece(f"{name}.weight", weight, rows), Piece(f"{name}.bias", bias, rows)]


def stacked_linear_pieces(weight: str, bias: str, linears: Sequence[Tuple[str, int]]
                          ) -> List[Piece]:
    """The pieces of published ``nn.Linear`` layers stacked by rows, in order, into the fused
    parameters ``weight`` and ``bias``: ``linears`` gives each one's (name, out_features)."""
    pieces, start = [], 0
    for name, rows in linears:
        pieces += linear_pieces(name, weight, bias, slice(start, start + rows))
        start += rows
    return pieces


def _rows_key(piece: Piece) -> Tuple[str, int, Optional[int]]:
    return piece.param, piece.rows.start or 0, piece.rows.stop


def _tensors(pieces: Iterable[Piece]) -> Dict[str, List[Piece]]:
    """Pieces that are tensors (not copies), per parameter, in row order."""
    seen, by_param = set(), {}
    for piece in pieces:
        if _rows_key(piece) not in seen:
            seen.add(_rows_key(piece))
            by_param.setdefault(piece.param, []).append(piece)
    return {param: sorted(group, key=lambda p: p.rows.start or 0)
            for param, group in by_param.items()}


# ---------------------------------------------------------------------- state_dict hooks


def publish_layout(module: nn.Module) -> None:
    """Make ``module.state_dict()`` and ``load_state_dict()`` use the published keys of its
    ``published_layout()`` (call at the end of ``__init__``)."""
    module.register_state_dict_post_hook(_split_into_published)
    module.register_load_state_dict_pre_hook(_fuse_from_published)


def _split_into_published(module, state, prefix, local_metadata) -> None:
    """state_dict post-hook: the module's keys, fused parameters replaced by their published
    pieces (views), in published order; keys the table does not name follow unchanged."""
    own = {key[len(prefix):]: state.pop(key) for key in [k for k in state if k.startswith(prefix)]}
    layout = module.published_layout()
    for piece in layout:
        state[prefix + piece.key] = own[piece.param][piece.rows]
    fused = {piece.param for piece in layout}
    for key, value in own.items():
        if key not in fused:
            state[prefix + key] = value


def _fuse_from_published(module, state, prefix, *_) -> None:
    """load_state_dict pre-hook: replace the published keys of each fused parameter by their
    concatenation. A parameter whose pieces are not all there is left alone, for strict
    loading to report."""
    fuse_published(module, state, prefix)


def fuse_published(module: nn.Module, state: Dict[str, torch.Tensor], prefix: str = "") -> None:
    """In place on ``state``: ``module``'s published keys (under ``prefix``) become its fused
    parameters (``torch.cat`` of the pieces, so autograd flows back to them)."""
    layout = module.published_layout()
    for param, pieces in _tensors(layout).items():
        keys = [prefix + p.key for p in layout if p.param == param]
        if prefix + param in state or not all(k in state for k in keys):
            continue
        parts = [state[prefix + p.key] for p in pieces]
        state[prefix + param] = parts[0] if len(parts) == 1 else torch.cat(parts)
        for key in keys:
            del state[key]


def published_to_fused(model: nn.Module,
                       state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A published-layout state_dict of ``model`` with the fused parameters' keys instead
    (what ``model``'s parameters are named), e.g. for ``torch.func.functional_call``."""
    state = dict(state)
    for prefix, module in model.named_modules():
        if hasattr(module, "published_layout"):
            fuse_published(module, state, prefix + "." if prefix else "")
    return state


# ------------------------------------------------------------------------ published views


class LinearView:
    """A published ``nn.Linear`` that lives in rows of fused parameters: ``weight`` (out, in)
    and ``bias`` (out,) are views of them (in-place writes change the module), and calling it
    applies the layer."""

    def __init__(self, module: nn.Module, name: str):
        pieces = {p.key: p for p in module.published_layout()}
        weight, bias = pieces[f"{name}.weight"], pieces[f"{name}.bias"]
        self.weight = module.get_parameter(weight.param)[weight.rows]
        self.bias = module.get_parameter(bias.param)[bias.rows]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class published_linear:
    """A class attribute naming a published sub-layer of a module with a
    ``published_layout()``: reading it gives the :class:`LinearView` of that layer (``key``:
    its published name, by default the attribute's)."""

    def __init__(self, key: Optional[str] = None):
        self.key = key

    def __set_name__(self, owner, name: str) -> None:
        self.key = self.key or name

    def __get__(self, module, owner=None):
        return self if module is None else LinearView(module, self.key)


# ------------------------------------------------------------------- the whole model


def published_pieces(model: nn.Module) -> Dict[str, List[Tuple[str, slice]]]:
    """Per parameter of ``model`` (``named_parameters()`` order): the published keys that hold
    its rows, with the rows, copies left out; an unfused parameter is its own single piece."""
    pieces = {name: [(name, slice(None))] for name, _ in model.named_parameters()}
    for prefix, module in model.named_modules():
        if hasattr(module, "published_layout"):
            prefix = prefix + "." if prefix else ""
            for param, group in _tensors(module.published_layout()).items():
                pieces[prefix + param] = [(prefix + p.key, p.rows) for p in group]
    return pieces


def published_parameter_order(model: nn.Module) -> Dict[str, int]:
    """Position of each published parameter in the published model's ``parameters()``:
    state_dict order without the copies (shared ``V``/``W2``, the ``patch_embed`` alias)."""
    tensors = {key for group in published_pieces(model).values() for key, _ in group}
    keys = [key for key in model.state_dict() if key in tensors]
    return {key: i for i, key in enumerate(keys)}


def _published_groups(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Per param group of ``optimizer`` (over ``model``'s parameters): the (published key,
    rows, our parameter) of its parameters, in published order."""
    names = {id(p): name for name, p in model.named_parameters()}
    pieces, order = published_pieces(model), published_parameter_order(model)
    groups = []
    for group in optimizer.param_groups:
        entries = [(key, rows, p) for p in group["params"] for key, rows in pieces[names[id(p)]]]
        groups.append(sorted(entries, key=lambda entry: order[entry[0]]))
    return groups


def published_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` as the published model's optimizer would hold it: one entry
    per published parameter, numbered in published ``parameters()`` order, per-element
    states (``exp_avg``, ...) split into the published rows, scalars (``step``) copied."""
    saved = optimizer.state_dict()
    index_of = {id(p): i for group, saved_group in zip(optimizer.param_groups,
                                                         saved["param_groups"])
                for p, i in zip(group["params"], saved_group["params"])}
    state, param_groups, index = {}, [], 0
    for entries, saved_group in zip(_published_groups(model, optimizer), saved["param_groups"]):
        ids = []
        for _, rows, p in entries:
            if index_of[id(p)] in saved["state"]:
                state[index] = {name: _split(value, rows)
                                for name, value in saved["state"][index_of[id(p)]].items()}
            ids.append(index)
            index += 1
        param_groups.append({**saved_group, "params": ids})
    return {"state": state, "param_groups": param_groups}


def optimizer_state_for(model: nn.Module, optimizer: torch.optim.Optimizer,
                        saved: Mapping) -> dict:
    """A saved optimizer state, in the published layout (:func:`published_optimizer_state`,
    a published checkpoint) or in ``optimizer``'s own, as ``optimizer.load_state_dict`` takes
    it. Published per-element states are concatenated into the fused rows; a piece without
    state (a published expert that never got a gradient) gets zeros, and a fused parameter
    takes the largest ``step`` of its pieces. Raises ValueError for a state of neither layout."""
    groups = _published_groups(model, optimizer)
    count = sum(len(group["params"]) for group in saved["param_groups"])
    ours = sum(len(group["params"]) for group in optimizer.param_groups)
    published = sum(len(entries) for entries in groups)
    if count == ours and count != published:
        return dict(saved)
    if count != published or len(saved["param_groups"]) != len(groups):
        raise ValueError(f"the optimizer state has {count} parameters; this model has "
                         f"{published} in the published layout ({ours} fused)")
    state, param_groups, index = {}, [], 0
    for group, entries, saved_group in zip(optimizer.param_groups, groups,
                                           saved["param_groups"]):
        pieces: Dict[int, List[Tuple[slice, Optional[dict]]]] = {}
        for (_, rows, p), i in zip(entries, saved_group["params"]):
            pieces.setdefault(id(p), []).append((rows, saved["state"].get(i)))
        ids = []
        for p in group["params"]:
            fused = _fuse_states(p, pieces[id(p)])
            if fused is not None:
                state[index] = fused
            ids.append(index)
            index += 1
        param_groups.append({**saved_group, "params": ids})
    return {"state": state, "param_groups": param_groups}


def _split(value, rows: slice):
    """A per-element optimizer state's rows (a copy), or a copy of a scalar state."""
    if isinstance(value, torch.Tensor):
        return (value[rows] if value.dim() > 0 else value).clone()
    return value


def _fuse_states(param: torch.Tensor, pieces: List[Tuple[slice, Optional[dict]]]
                 ) -> Optional[dict]:
    """One fused parameter's optimizer state from its pieces' (rows, state or None)."""
    present = [state for _, state in pieces if state is not None]
    if not present:
        return None
    fused = {}
    for name, value in present[0].items():
        if not isinstance(value, torch.Tensor):
            fused[name] = value
        elif value.dim() == 0:  # e.g. step
            fused[name] = max((state[name] for state in present), key=float).clone()
        else:
            parts = [value.new_zeros(param[rows].shape) if state is None else state[name]
                     for rows, state in sorted(pieces, key=lambda piece: piece[0].start or 0)]
            fused[name] = parts[0].clone() if len(parts) == 1 else torch.cat(parts)
    return fused
