"""What the experts do: routing, expert contributions and ablations, usage statistics, figures.

This module analyses a trained encoder (an :class:`~models.moe_mae.MOEEncoder`, or the
:class:`~models.moe_mae.MOEMAE` around it), always in ``eval()`` mode (deterministic gates, no
dropout; the model's own mode is restored afterwards) and without autograd:

* :func:`encoder_layer_tokens`: every encoder layer's MoE input (after ``norm2``), MoE output
  and layer output for a batch;
* :func:`analyze_layer`: for one MoE layer and a batch, the top-1 expert of every patch, the
  top-k usage counts per chip, the contribution maps ``||g_e f_e(x)||`` and the ablation maps
  ``||y - y_(-e)||``;
* :func:`expert_usage_statistics`: per layer over a DataLoader, the share of routed patch
  tokens per expert, routing entropies and per-class expert usage;
* figures (a ``matplotlib.figure.Figure`` each, saved as a PNG when a path is given; they
  are never registered with pyplot, so they need no display and nothing to close):
  :func:`plot_routing_map`, :func:`plot_expert_maps`, :func:`plot_usage_bars`,
  :func:`plot_usage_heatmap`, :func:`plot_tsne` (with :func:`tsne_embedding`).

Patch maps are (B, H/p, W/p) in image order: entry ``[b, i, j]`` is the patch of rows
``i*p..(i+1)*p`` and columns ``j*p..(j+1)*p`` of chip b.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from datasets.builders import split_batch
from models.moe_mae import CLS_INDEX, MOEEncoder, MOEMAE, MoELayer, Routing
from models.routing_stats import RoutingCounter, moe_layer_name  # noqa: F401 (re-export)
from utils.data_config import BigEarthNetInfo
from utils.data_utils import rgb_bands, save_figure, stretch, stretch_limits, unnormalize

PathLike = Union[str, Path]
FIRST_PATCH = CLS_INDEX + 1  # tokens [week, hour, lat, lon, CLS, patches...]
ABLATION_POINTS = ("layer", "final")


# ----------------------------------------------------------------------- encoder tokens


def as_encoder(model: nn.Module) -> MOEEncoder:
    """The encoder of an :class:`MOEMAE`, or the encoder itself."""
    if isinstance(model, MOEMAE):
        return model.encoder
    if isinstance(model, MOEEncoder):
        return model
    raise TypeError(f"expected an MOEEncoder or MOEMAE, got {type(model).__name__}")


@contextlib.contextmanager
def evaluation(model: nn.Module) -> Iterator[nn.Module]:
    """``eval()`` and no autograd within the block; every submodule's mode is restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes:
            module.training = training


class LayerStep(NamedTuple):
    """One encoder layer ``out = h + moe(norm2(h))`` with ``h = x + attn(norm1(x))``, as the
    layer itself reports it (:meth:`~models.moe_mae.MoETransformerEncoderLayer.steps`);
    every tensor (B, L, dim)."""

    index: int
    residual: torch.Tensor  # h, the stream the MoE output is added to
    moe_input: torch.Tensor  # norm2(h), what the gate and the experts see
    moe_output: torch.Tensor
    output: torch.Tensor
    routing: Routing  # the gate's decisions for the B * L tokens


def run_layers(encoder: MOEEncoder, tokens: torch.Tensor, start: int = 0) -> Iterator[LayerStep]:
    """Run ``encoder.layers[start:]`` on tokens (B, L, dim), yielding each layer's step."""
    for index in range(start, len(encoder.layers)):
        step = encoder.layers[index].steps(tokens, with_loss=False)
        tokens = step.output
        yield LayerStep(index, step.residual, step.moe_input, step.moe_output, step.output,
                        step.routing)


class EncoderTokens(NamedTuple):
    """Every layer's tokens for a batch: lists with one (B, L, dim) tensor per layer, in the
    token order ``[week, hour, lat, lon, CLS, patches...]``."""

    inputs: torch.Tensor  # (B, L, dim) embedded tokens, the first layer's input
    residuals: List[torch.Tensor]  # x + attn(norm1(x)) per layer
    moe_inputs: List[torch.Tensor]  # norm2(residual) per layer: the MoE layer's input
    moe_outputs: List[torch.Tensor]
    outputs: List[torch.Tensor]  # residual + moe_output per layer: the layer's output
    normed: torch.Tensor  # (B, L, dim) the final norm of the last output (the encoder's output)
    routings: List[Routing]  # per layer, the gate's routing of the B * L tokens


def encoder_layer_tokens(model: nn.Module, imgs: torch.Tensor, meta_week=None, meta_hour=None,
                         meta_lat=None, meta_lon=None) -> EncoderTokens:
    """Tokens of every encoder layer for imgs (B, C, H, W) and metadata (B, 2) each (or None),
    in ``eval()`` mode: deterministic, ``normed`` equals ``encoder(imgs, ...)[0]``."""
    encoder = as_encoder(model)
    with evaluation(encoder):
        inputs = encoder.prepare_tokens(imgs, meta_week, meta_hour, meta_lat, meta_lon)
        steps = list(run_layers(encoder, inputs))
        return EncoderTokens(inputs, [s.residual for s in steps], [s.moe_input for s in steps],
                             [s.moe_output for s in steps], [s.output for s in steps],
                             encoder.norm(steps[-1].output), [s.routing for s in steps])


# ---------------------------------------------------------------------- one MoE layer


def expert_outputs(moe: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Every expert's output ``f_e(x) = W2(silu(W_e x) * V x)`` (no dropout: ``eval()``), by
    the layer's own expert modules: x (T, dim) -> (T, E, dim), whether or not the gate routes
    the token to e."""
    return torch.stack([expert(x) for expert in moe.experts], dim=1)


def mix(gates: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """``sum_e gates[:, e] * outputs[:, e]``: gates (T, E), outputs (T, E, dim) -> (T, dim)."""
    return torch.einsum("te,ted->td", gates, outputs)


def without_expert(gates: torch.Tensor, expert: int, renormalize: bool = False) -> torch.Tensor:
    """Dense gates (T, E) with expert ``expert`` removed; ``renormalize`` rescales each token's
    remaining gates to sum to 1 (a token routed only to that expert keeps all zeros). A token
    not routed to ``expert`` keeps its gates unchanged, bit for bit."""
    kept = gates.clone()
    kept[:, expert] = 0.0
    if renormalize:
        total = kept.sum(dim=1, keepdim=True)
        # only the tokens that used the expert: the others' gates already sum to 1 (up to
        # rounding, which a division would change)
        rescale = (gates[:, expert:expert + 1] > 0) & (total > 0)
        kept = torch.where(rescale, kept / total.clamp(min=torch.finfo(kept.dtype).tiny), kept)
    return kept


def top1_map(topk_idx: torch.Tensor, grid: int) -> torch.Tensor:
    """Routing of the patch tokens, topk_idx (B, N, k) -> first-choice expert (B, grid, grid)."""
    return topk_idx[..., 0].reshape(-1, grid, grid)


def usage_counts(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """topk_idx (B, N, k) -> (B, E) int64: per chip, how many of its tokens route to each
    expert among their top k. Each row sums to k * N."""
    return F.one_hot(topk_idx, num_experts).sum(dim=(1, 2))


class LayerAnalysis(NamedTuple):
    """What one MoE layer does with the patches of a batch (B chips, N = G * G patches, E
    experts, top k). Maps are (B, E, G, G) float32."""

    layer: int
    topk_idx: torch.Tensor  # (B, N, k) routed experts of each patch, best first
    gates: torch.Tensor  # (B, N, E) dense gates of each patch, zero outside its top k
    top1: torch.Tensor  # (B, G, G) first-choice expert of each patch
    usage: torch.Tensor  # (B, E) routed patches per expert (top k); rows sum to k * N
    contributions: torch.Tensor  # ||g_e f_e(x)||: zero where a patch does not use expert e
    ablations: torch.Tensor  # ||y - y_(-e)||, y where ``measured_at`` says
    measured_at: str  # "layer": at this layer's MoE output; "final": after the final norm
    renormalized: bool  # y_(-e) with the remaining gates rescaled to sum to 1

    @property
    def num_experts(self) -> int:
        return self.gates.shape[-1]

    def chip_shares(self) -> torch.Tensor:
        """(B, E) each chip's share of routed patch tokens per expert; rows sum to 1."""
        return self.usage.double() / self.usage.sum(dim=1, keepdim=True)


def analyze_layer(model: nn.Module, imgs: torch.Tensor, meta_week=None, meta_hour=None,
                  meta_lat=None, meta_lon=None, *, layer: int, renormalize: bool = False,
                  measured_at: str = "final",
                  tokens: Optional[EncoderTokens] = None) -> LayerAnalysis:
    """Routing, contributions and ablations of encoder layer ``layer`` for a batch.

    imgs (B, C, H, W), meta (B, 2) each or None. The layer's MoE output for a token is
    ``y = sum_e g_e f_e(x)`` over its top-k experts (gates g summing to 1). Expert e's
    contribution map is ``||g_e f_e(x)||`` per patch. Its ablation map is ``||y - y_(-e)||``
    per patch, where ``y_(-e)`` drops e's gated term from every token of that layer (patches,
    CLS and metadata tokens), optionally renormalising the remaining gates
    (``renormalize``), and ``y`` is taken at that layer's MoE output (``measured_at="layer"``)
    or after the remaining layers and the final norm (``"final"``, as in the published
    figures; both y and y_(-e) then go through the same layers). Without renormalisation, the
    ablation at the layer equals the contribution.

    Every step works on the whole batch at once; ``tokens`` reuses a
    :func:`encoder_layer_tokens` result for the same batch.
    """
    encoder = as_encoder(model)
    if not 0 <= layer < len(encoder.layers):
        raise ValueError(f"layer {layer} does not exist: the encoder has {len(encoder.layers)} "
                         f"layers (0..{len(encoder.layers) - 1})")
    if measured_at not in ABLATION_POINTS:
        raise ValueError(f"measured_at must be one of {', '.join(ABLATION_POINTS)}, "
                         f"got {measured_at!r}")
    if tokens is None:
        tokens = encoder_layer_tokens(encoder, imgs, meta_week, meta_hour, meta_lat, meta_lon)
    moe = encoder.layers[layer].moe
    grid = encoder.patch_grid
    with evaluation(encoder):
        x = tokens.moe_inputs[layer]
        B, L, dim = x.shape
        flat = x.reshape(-1, dim)
        routing = tokens.routings[layer]
        gates = routing.gates  # (B * L, E)
        outputs = expert_outputs(moe, flat)  # (B * L, E, dim)
        y = mix(gates, outputs)

        def patch_map(values: torch.Tensor) -> torch.Tensor:  # (B * L, ...) -> patch tokens
            return values.view(B, L, *values.shape[1:])[:, FIRST_PATCH:]

        def final_tokens(moe_output: torch.Tensor) -> torch.Tensor:
            out = tokens.residuals[layer] + moe_output.view(B, L, dim)
            for step in run_layers(encoder, out, start=layer + 1):
                out = step.output
            return encoder.norm(out)

        contributions = (gates.unsqueeze(-1) * outputs).norm(dim=-1)  # (B * L, E)
        reference = final_tokens(y) if measured_at == "final" else y.view(B, L, dim)
        ablations = []
        for expert in range(moe.num_experts):
            y_without = mix(without_expert(gates, expert, renormalize), outputs)
            if measured_at == "final":
                y_without = final_tokens(y_without)
            change = (reference - y_without.view(B, L, dim)).norm(dim=-1)  # (B, L)
            ablations.append(change[:, FIRST_PATCH:])

    topk_idx = patch_map(routing.topk_idx)
    contribution_maps = patch_map(contributions).reshape(B, grid, grid, -1).permute(0, 3, 1, 2)
    return LayerAnalysis(
        layer=layer, topk_idx=topk_idx, gates=patch_map(gates),
        top1=top1_map(topk_idx, grid), usage=usage_counts(topk_idx, moe.num_experts),
        contributions=contribution_maps.contiguous(),
        ablations=torch.stack(ablations, dim=1).view(B, -1, grid, grid),
        measured_at=measured_at, renormalized=renormalize)


# ------------------------------------------------------------- dataset-level statistics


@dataclass
class UsageStatistics:
    """Expert usage of every encoder layer over a dataset, on the patch tokens.

    Per layer (lists of one entry per layer; E differs between stages):

    * ``topk_share`` (E,): share of the routed patch tokens (each patch counted once per
      expert of its top k) that go to each expert; sums to 1 (1/E each when balanced);
    * ``top1_share`` (E,): share of patches whose first choice is each expert; sums to 1;
    * ``chip_share_std`` (E,): standard deviation over chips of each chip's ``topk_share``
      (the error bars of :func:`plot_usage_bars`);
    * ``usage_entropy``: entropy of ``topk_share`` divided by log E: 1 = balanced, 0 = every
      routed token goes to one expert (collapse);
    * ``gate_entropy``: mean over patches of the entropy of the softmax over all E clean gate
      logits, divided by log E: low when the router is confident;
    * ``class_share`` (C, E), when the data have labels: for each class, the ``topk_share``
      computed over the chips that carry the class (a multi-hot chip counts, with all its
      patches, for every class it carries); each row sums to 1, NaN for a class without chips.
      ``class_chips`` (C,) counts those chips.
    """

    layer_names: List[str]
    num_chips: int
    k: int
    topk_share: List[np.ndarray]
    top1_share: List[np.ndarray]
    chip_share_std: List[np.ndarray]
    usage_entropy: np.ndarray
    gate_entropy: np.ndarray
    class_names: Optional[List[str]] = None
    class_chips: Optional[np.ndarray] = None
    class_share: Optional[List[np.ndarray]] = None

    def usage_matrix(self) -> np.ndarray:
        """(layers, max E) ``topk_share``, NaN where a layer has fewer experts."""
        matrix = np.full((len(self.layer_names), max(len(s) for s in self.topk_share)), np.nan)
        for row, share in enumerate(self.topk_share):
            matrix[row, :len(share)] = share
        return matrix

    def usage_rows(self) -> List[dict]:
        """One row per (layer, expert), for a CSV."""
        return [{"layer": layer, "layer_name": name, "experts": len(self.topk_share[layer]),
                 "expert": expert, "topk_share": float(self.topk_share[layer][expert]),
                 "top1_share": float(self.top1_share[layer][expert]),
                 "chip_share_std": float(self.chip_share_std[layer][expert]),
                 "usage_entropy": float(self.usage_entropy[layer]),
                 "gate_entropy": float(self.gate_entropy[layer]), "chips": self.num_chips}
                for layer, name in enumerate(self.layer_names)
                for expert in range(len(self.topk_share[layer]))]

    def class_rows(self) -> List[dict]:
        """One row per (layer, class) with columns ``expert_0 ..`` (empty beyond the layer's
        experts), for a CSV. Empty without labels."""
        if self.class_share is None:
            return []
        width = max(len(s) for s in self.topk_share)
        rows = []
        for layer, shares in enumerate(self.class_share):
            for cls, name in enumerate(self.class_names):
                row = {"layer": layer, "class_index": cls, "class": name,
                       "chips": int(self.class_chips[cls])}
                for expert in range(width):
                    value = shares[cls, expert] if expert < shares.shape[1] else None
                    row[f"expert_{expert}"] = "" if value is None or np.isnan(value) \
                        else round(float(value), 6)
                rows.append(row)
        return rows


class _LayerTotals:
    """Running sums for one layer (float64, on the CPU)."""

    def __init__(self, num_experts: int):
        self.topk = np.zeros(num_experts)
        self.top1 = np.zeros(num_experts)
        self.chip_share = np.zeros(num_experts)
        self.chip_share_sq = np.zeros(num_experts)
        self.gate_entropy = 0.0
        self.class_usage = np.zeros((0, num_experts))  # (C, E) routed patches per class

    def add(self, topk_idx: torch.Tensor, clean_logits: torch.Tensor,
            labels: Optional[torch.Tensor]) -> None:
        """topk_idx (B, N, k), clean_logits (B, N, E), labels (B, C) 0/1 or None."""
        num_experts = len(self.topk)
        counts = usage_counts(topk_idx, num_experts).double()  # (B, E)
        self.topk += counts.sum(0).cpu().numpy()
        self.top1 += torch.bincount(topk_idx[..., 0].reshape(-1),
                                    minlength=num_experts).double().cpu().numpy()
        shares = counts / counts.sum(dim=1, keepdim=True)
        self.chip_share += shares.sum(0).cpu().numpy()
        self.chip_share_sq += shares.pow(2).sum(0).cpu().numpy()
        probs = clean_logits.double().softmax(dim=-1)
        entropy = -(probs * probs.clamp(min=1e-300).log()).sum(-1)
        self.gate_entropy += float(entropy.sum())
        if labels is not None:
            self.class_usage = _add_rows(self.class_usage,
                                         (labels.double().t() @ counts).cpu().numpy())


def _add_rows(total: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``total + values`` for arrays of equal trailing shape, the shorter one padded with zero
    rows (classes seen for the first time)."""
    rows = max(len(total), len(values))
    padded = np.zeros((rows, *total.shape[1:]))
    padded[:len(total)] += total
    padded[:len(values)] += values
    return padded


def _multi_hot(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C) multi-hot targets as they are, or (B,) class indices one-hot."""
    targets = torch.as_tensor(targets)
    if targets.ndim == 2:
        return (targets > 0).double()
    return F.one_hot(targets.long(), max(num_classes, int(targets.max()) + 1)).double()


def expert_usage_statistics(model: nn.Module, loader,
                            device: Optional[Union[str, torch.device]] = None,
                            class_names: Optional[Sequence[str]] = None,
                            use_labels: bool = True) -> UsageStatistics:
    """Expert usage of every encoder layer over the batches of ``loader`` (see
    :class:`UsageStatistics`). Batches: images, ``(imgs, targets)`` or ``(imgs, targets, week,
    hour, lat, lon)``; targets (B, C) multi-hot or (B,) class indices, used for the per-class
    shares unless ``use_labels`` is False. Only patch tokens are counted. ``device``: where
    the batches go (default: the model's device)."""
    encoder = as_encoder(model)
    device = next(encoder.parameters()).device if device is None else torch.device(device)
    totals = [_LayerTotals(layer.moe.num_experts) for layer in encoder.layers]
    num_chips, class_chips, labelled = 0, np.zeros(0), False
    num_classes = len(class_names) if class_names is not None else 0
    with evaluation(encoder):
        for batch in loader:
            imgs, targets, meta = split_batch(batch)
            imgs = imgs.to(device)
            meta = [None if m is None else m.to(device) for m in meta]
            labels = None
            if use_labels and targets is not None and torch.as_tensor(targets).numel() > 0:
                labels = _multi_hot(targets, num_classes).to(device)
                num_classes, labelled = max(num_classes, labels.shape[1]), True
                class_chips = _add_rows(class_chips, labels.sum(0).cpu().numpy())
            tokens = encoder.prepare_tokens(imgs, *meta)
            for step in run_layers(encoder, tokens):
                B, L = step.moe_input.shape[:2]
                topk_idx = step.routing.topk_idx.view(B, L, -1)[:, FIRST_PATCH:]
                clean_logits = step.routing.clean_logits.view(B, L, -1)[:, FIRST_PATCH:]
                totals[step.index].add(topk_idx, clean_logits, labels)
            num_chips += imgs.shape[0]
    if num_chips == 0:
        raise ValueError("the loader yielded no batches")
    num_patches_seen = num_chips * encoder.num_patches

    k = encoder.layers[0].moe.k
    stats = UsageStatistics(
        layer_names=[f"encoder.layers.{i}" for i in range(len(encoder.layers))],
        num_chips=num_chips, k=k,
        topk_share=[t.topk / t.topk.sum() for t in totals],
        top1_share=[t.top1 / t.top1.sum() for t in totals],
        chip_share_std=[np.sqrt(np.maximum(t.chip_share_sq / num_chips -
                                           (t.chip_share / num_chips) ** 2, 0.0))
                        for t in totals],
        usage_entropy=np.array([_normalized_entropy(t.topk / t.topk.sum()) for t in totals]),
        gate_entropy=np.array([t.gate_entropy / num_patches_seen / math.log(len(t.topk))
                               for t in totals]))
    if labelled:
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for labels of {num_classes} "
                             "classes")
        stats.class_names = [f"class {c}" for c in range(num_classes)] if class_names is None \
            else list(class_names)
        stats.class_chips = _add_rows(class_chips, np.zeros(num_classes)).astype(np.int64)
        stats.class_share = []
        for t in totals:
            usage = _add_rows(t.class_usage, np.zeros((num_classes, len(t.topk))))
            routed = usage.sum(axis=1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                stats.class_share.append(np.where(routed > 0, usage / routed, np.nan))
    return stats


def _normalized_entropy(share: np.ndarray) -> float:
    """Entropy of a distribution over E > 1 outcomes divided by log E."""
    nonzero = share[share > 0]
    return float(-(nonzero * np.log(nonzero)).sum() / math.log(len(share)))


# --------------------------------------------------------------------------- figures


def expert_colors(num_experts: int) -> List[tuple]:
    """One colour per expert (tab10), the same in every figure."""
    palette = colormaps["tab10"]
    return [palette(e % 10) for e in range(num_experts)]


def chip_rgb(img: Union[torch.Tensor, np.ndarray],
             statistics: Mapping[str, Sequence[float]] = BigEarthNetInfo.STATISTICS
             ) -> np.ndarray:
    """A z-scored (7, H, W) chip as true-colour RGB (H, W, 3) in [0, 1]: un-normalised with
    ``statistics``, bands SR_B4, SR_B3, SR_B2, one 2-98 percentile stretch for the three."""
    img = img.detach().float().cpu() if isinstance(img, torch.Tensor) else \
        torch.as_tensor(np.asarray(img, dtype=np.float32))
    raw = unnormalize(img, statistics["mean"], statistics["std"])
    rgb = rgb_bands(raw)
    return stretch(rgb, stretch_limits(rgb))


def _finish(fig: Figure, path: Optional[PathLike]) -> Figure:
    if path is not None:
        save_figure(fig, path)
    return fig


def _as_numpy(values) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def plot_routing_map(img, top1, num_experts: int, path: Optional[PathLike] = None,
                     title: Optional[str] = None,
                     statistics: Mapping[str, Sequence[float]] = BigEarthNetInfo.STATISTICS
                     ) -> Figure:
    """The RGB chip (``img`` (7, H, W) z-scored) with its patch grid and one dot per patch,
    coloured by the patch's first-choice expert (``top1`` (G, G)); the legend gives each
    expert's share of the chip's patches."""
    rgb, top1 = chip_rgb(img, statistics), _as_numpy(top1)
    height, width = rgb.shape[:2]
    grid = top1.shape[0]
    patch = height / grid
    colors = expert_colors(num_experts)
    fig = Figure(figsize=(5.2, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(rgb, interpolation="nearest", extent=(0, width, height, 0))
    for line in np.arange(0, height + 1e-9, patch):
        ax.axhline(line, color="white", linewidth=0.5, alpha=0.6)
        ax.axvline(line, color="white", linewidth=0.5, alpha=0.6)
    rows, cols = np.mgrid[0:grid, 0:grid]
    centres_x, centres_y = (cols.ravel() + 0.5) * patch, (rows.ravel() + 0.5) * patch
    ax.scatter(centres_x, centres_y, c=[colors[e] for e in top1.ravel()], s=28,
               edgecolors="black", linewidths=0.5)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    handles = [Line2D([], [], marker="o", linestyle="", markerfacecolor=colors[e],
                      markeredgecolor="black", markersize=7,
                      label=f"expert {e} ({(top1 == e).mean():.0%})")
               for e in range(num_experts)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
              title="top-1 expert", title_fontsize=8, frameon=False)
    ax.set_title(title or "top-1 expert per patch", fontsize=9)
    return _finish(fig, path)


def plot_expert_maps(img, maps, kind: str = "contribution", path: Optional[PathLike] = None,
                     title: Optional[str] = None, cmap: str = "magma",
                     statistics: Mapping[str, Sequence[float]] = BigEarthNetInfo.STATISTICS
                     ) -> Figure:
    """Per expert a row: the RGB chip, the chip with the expert's map over it, and the map
    alone; every map on one colour scale (0 to the largest value over all experts).

    img (7, H, W) z-scored; maps (E, G, G), e.g. :attr:`LayerAnalysis.contributions` or
    ``ablations`` of one chip; ``kind`` names the quantity in the titles.
    """
    rgb, maps = chip_rgb(img, statistics), _as_numpy(maps)
    height, width = rgb.shape[:2]
    extent = (0, width, height, 0)
    vmax = float(maps.max()) if maps.size and maps.max() > 0 else 1.0
    num_experts = maps.shape[0]
    label = {"contribution": "||g_e f_e(x)||", "ablation": "||y - y_(-e)||"}.get(kind, kind)
    fig = Figure(figsize=(6.4, 1.9 * num_experts + 0.4), layout="constrained")
    axes = fig.subplots(num_experts, 3, squeeze=False)
    for expert, (original, overlay, heat) in enumerate(axes):
        original.imshow(rgb, interpolation="nearest", extent=extent)
        overlay.imshow(rgb, interpolation="nearest", extent=extent)
        # opacity follows the value, so the chip stays visible where the expert does nothing
        overlay.imshow(maps[expert], cmap=cmap, vmin=0.0, vmax=vmax,
                       alpha=0.85 * np.clip(maps[expert] / vmax, 0.0, 1.0),
                       interpolation="nearest", extent=extent)
        image = heat.imshow(maps[expert], cmap=cmap, vmin=0.0, vmax=vmax,
                            interpolation="nearest", extent=extent)
        original.set_ylabel(f"expert {expert}", fontsize=9)
        heat.set_title(f"mean {maps[expert].mean():.3g}", fontsize=8)
        for ax in (original, overlay, heat):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("original", fontsize=9)
    axes[0, 1].set_title("overlay", fontsize=9)
    fig.colorbar(image, ax=axes[:, 2].tolist(), shrink=0.6, label=label)
    fig.suptitle(title or f"expert {kind} per patch", fontsize=10)
    return _finish(fig, path)


def plot_usage_bars(shares, errors=None, path: Optional[PathLike] = None,
                    title: Optional[str] = None,
                    ylabel: str = "share of routed patch tokens") -> Figure:
    """Bars of per-expert shares (E,) with error bars (E,) (e.g. the standard deviation over
    chips); the dashed line marks perfect balance (1/E)."""
    shares = _as_numpy(shares).astype(np.float64)
    num_experts = len(shares)
    fig = Figure(figsize=(1.0 + 0.8 * num_experts, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(np.arange(num_experts), shares, color=expert_colors(num_experts),
           yerr=None if errors is None else _as_numpy(errors), capsize=4, edgecolor="black",
           linewidth=0.5)
    ax.axhline(1.0 / num_experts, color="grey", linestyle="--", linewidth=1,
               label="balanced")
    ax.set_xticks(np.arange(num_experts), [f"expert {e}" for e in range(num_experts)],
                  fontsize=8)
    ax.set_ylabel(ylabel, fontsize=9)
    top = shares + (0.0 if errors is None else _as_numpy(errors))
    ax.set_ylim(0, min(1.05, float(np.nanmax(top)) * 1.2 + 0.02))
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(title or "expert usage", fontsize=9)
    fig.tight_layout()
    return _finish(fig, path)


def plot_usage_heatmap(stats: UsageStatistics, path: Optional[PathLike] = None,
                       title: Optional[str] = None) -> Figure:
    """Layers (rows) x experts (columns) of ``topk_share``, each cell annotated in percent;
    blank where a layer has fewer experts."""
    matrix = stats.usage_matrix()
    layers, width = matrix.shape
    fig = Figure(figsize=(1.6 + 0.75 * width, 0.9 + 0.3 * layers))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0.0,
                      vmax=max(float(np.nanmax(matrix)), 1e-9), aspect="auto")
    for row in range(layers):
        for col in range(width):
            if not np.isnan(matrix[row, col]):
                ax.text(col, row, f"{matrix[row, col]:.0%}", ha="center", va="center",
                        fontsize=7, color="white" if matrix[row, col] < 0.6 * np.nanmax(matrix)
                        else "black")
    ax.set_xticks(range(width), [f"e{e}" for e in range(width)], fontsize=8)
    ax.set_yticks(range(layers), [str(i) for i in range(layers)], fontsize=7)
    ax.set_xlabel("expert", fontsize=9)
    ax.set_ylabel("encoder layer", fontsize=9)
    fig.colorbar(image, ax=ax, label="share of routed patch tokens")
    ax.set_title(title or f"expert usage per layer ({stats.num_chips} chips)", fontsize=9)
    return _finish(fig, path)


# ----------------------------------------------------------------------------- t-SNE


def single_labels(y: np.ndarray) -> np.ndarray:
    """One class per sample for colouring: (N,) class indices as they are; for (N, C)
    multi-hot rows, the sample's rarest class in ``y`` (fewest samples carrying it, ties to
    the lower index), so that small classes such as water or urban stay visible instead of
    being covered by the common ones; -1 for a row without labels."""
    y = np.asarray(y)
    if y.ndim == 1:
        return y.astype(np.int64)
    carried = y > 0
    frequency = carried.sum(axis=0).astype(np.float64)
    rarest = np.where(carried, frequency[None, :], np.inf).argmin(axis=1)
    return np.where(carried.any(axis=1), rarest, -1).astype(np.int64)


def tsne_embedding(x: np.ndarray, seed: int = 0, perplexity: float = 30.0,
                   pca_dim: int = 50) -> np.ndarray:
    """x (N, D) -> (N, 2) t-SNE coordinates (sklearn, seeded, PCA initialisation). Inputs
    with more than ``pca_dim`` features are first reduced to ``pca_dim`` principal components;
    the perplexity is capped at (N - 1) / 3 for small N."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    if len(x) < 4:
        raise ValueError(f"t-SNE needs at least 4 samples, got {len(x)}")
    if x.shape[1] > pca_dim:
        x = PCA(n_components=min(pca_dim, len(x)), random_state=seed).fit_transform(x)
    tsne = TSNE(n_components=2, perplexity=min(perplexity, (len(x) - 1) / 3), init="pca",
                learning_rate="auto", random_state=seed)
    return tsne.fit_transform(x)


def plot_tsne(panels: Mapping[str, np.ndarray], labels: np.ndarray,
              class_names: Optional[Sequence[str]] = None, path: Optional[PathLike] = None,
              title: Optional[str] = None) -> Figure:
    """One scatter panel per entry of ``panels`` (title -> (N, 2) coordinates, e.g. from
    :func:`tsne_embedding`), points coloured by class: ``labels`` (N,) indices or (N, C)
    multi-hot (coloured by :func:`single_labels`); one legend for all panels."""
    classes = single_labels(labels)
    palette = colormaps["tab20"]
    present = sorted(set(classes.tolist()))
    fig = Figure(figsize=(4.2 * len(panels) + 3.0, 4.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel_title, coords) in zip(axes, panels.items()):
        coords = np.asarray(coords)
        for cls in present:
            chosen = classes == cls
            color = (0.6, 0.6, 0.6, 1.0) if cls < 0 else palette(cls % 20)
            ax.scatter(coords[chosen, 0], coords[chosen, 1], s=12, color=color,
                       label=_class_label(cls, class_names), edgecolors="none")
        ax.set_title(panel_title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(0.0, 0.5), fontsize=7,
               frameon=False, markerscale=1.5)
    fig.subplots_adjust(left=2.8 / fig.get_figwidth(), right=0.98, top=0.85)
    fig.suptitle(title or "t-SNE of the embeddings", fontsize=10)
    return _finish(fig, path)


def _class_label(cls: int, class_names: Optional[Sequence[str]]) -> str:
    if cls < 0:
        return "no label"
    name = class_names[cls] if class_names is not None and cls < len(class_names) \
        else f"class {cls}"
    return name if len(name) <= 32 else name[:30] + "..."
