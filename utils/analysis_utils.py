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


# =====================================================================================
# The published analysis API
# =====================================================================================
#
# The names, signatures and return types that the published repository's
# ``moe_experiments.ipynb`` imports from ``utils.analysis_utils``, implemented on the analysis
# above. Token tensors are (B, L, dim) in the encoder's order ``[week, hour, lat, lon, CLS,
# patches...]``; ``num_meta_tokens`` and ``has_cls`` say where the patches start. Like the
# published functions, the figures are shown (in a notebook) instead of returned.
#
# Where they differ from the published ones:
# * ``layer_report_simple`` reads a layer's routing, contributions and ablations from what its
#   MoE sees (``norm2`` of the residual stream, :func:`analyze_layer`), and measures the
#   ablation after the remaining layers, residual included, and the final norm: the maps of
#   ``analyze_experts.py``. (The published report routes each layer's *output* through that
#   layer's gate, and ablates without the residual.) For that, two additions:
#   :func:`encoder_layer_states` and the trailing ``residual_base_tokens=None`` of
#   ``compute_ablation_heatmaps`` (published calls are unchanged).
# * ``plot_expert_usage_bars`` draws each expert's share of a chip's routed patch tokens
#   (mean and standard deviation over the chips) rather than raw counts, as the project's
#   other usage figures do.

import io  # noqa: E402  (this section's own imports)

from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

from models.moe_mae import NoisyTopKGate, load_balancing_loss  # noqa: E402

_BEN_MEAN = list(BigEarthNetInfo.STATISTICS["mean"])
_BEN_STD = list(BigEarthNetInfo.STATISTICS["std"])
_PUBLISHED_MAX_VALUES = (65454.0, 65454.0, 65330.308)  # the published notebook's RGB scaling


def _show_figure(fig: Figure) -> None:
    """Show a figure in a running notebook, as a PNG (what ``plt.show()`` does with the inline
    backend, whichever backend is active); elsewhere nothing. The figure is not registered
    with pyplot, so nothing is left open."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return
    if get_ipython() is not None:
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100, bbox_inches="tight")
        display(Image(data=png.getvalue(), format="png"))


def _first_patch_token(num_meta_tokens: int, has_cls: bool) -> int:
    return num_meta_tokens + (1 if has_cls else 0)


def _patch_tokens(values: torch.Tensor, patch_grid: int, num_meta_tokens: int,
                  has_cls: bool) -> torch.Tensor:
    """values (B, L, ...) -> (B, patch_grid ** 2, ...): the patch tokens; an error when L does
    not hold exactly that many patches after the metadata (and CLS) tokens."""
    start = _first_patch_token(num_meta_tokens, has_cls)
    patches = values[:, start:]
    if patches.shape[1] != patch_grid * patch_grid:
        raise ValueError(f"{values.shape[1]} tokens with {start} before the patches leave "
                         f"{patches.shape[1]} patch tokens, not patch_grid ** 2 = "
                         f"{patch_grid * patch_grid}")
    return patches


@contextlib.contextmanager
def deterministic_routing(model: nn.Module) -> Iterator[None]:
    """Within the block every :class:`NoisyTopKGate` of ``model`` routes on its clean logits
    (no noise), whatever the model's mode; the rest of the model (dropout) keeps its mode,
    and every gate's mode is restored afterwards. (In ``eval()`` the gates are already
    deterministic.)"""
    modes = [(module, module.training) for gate in model.modules()
             if isinstance(gate, NoisyTopKGate) for module in gate.modules()]
    for module, _ in modes:
        module.training = False
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _moe_loss(encoder: MOEEncoder, moe_inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over the layers of the load-balancing loss of each layer's gate on its MoE input
    (B, L, dim): the encoder's ``moe_loss`` when the routing is deterministic."""
    total = moe_inputs[0].new_zeros(())
    for layer, x in zip(encoder.layers, moe_inputs):
        moe = layer.moe
        routing = moe.gate(x.reshape(-1, x.shape[-1]))
        total = total + load_balancing_loss(routing, moe.w_importance, moe.w_load)
    return total


def encoder_layer_states(encoder: nn.Module, imgs: torch.Tensor, meta_week=None,
                         meta_hour=None, meta_lat=None, meta_lon=None):
    """Every layer's states for imgs (B, C, H, W) and metadata (B, 2) each (or None), in the
    model's current mode, without autograd.

    Returns ``(states_by_layer, total_moe_loss, num_meta_tokens)``: one dict per layer with
    ``x_after_attn`` (the residual stream before the MoE), ``z_pre_moe`` (its ``norm2``, what
    the gate and the experts see) and ``x_out`` (the layer's output; after the final norm for
    the last layer, as ``encoder(...)`` returns it), each (B, L, dim); the summed
    load-balancing loss (scalar tensor, from each layer's gate on ``z_pre_moe``: the forward
    pass's loss in ``eval()`` or within :func:`deterministic_routing`; in training mode the gates
    draw new noise for it); the number of metadata tokens.
    """
    encoder = as_encoder(encoder)
    with torch.no_grad():
        inputs = encoder.prepare_tokens(imgs, meta_week, meta_hour, meta_lat, meta_lon)
        steps = list(run_layers(encoder, inputs))
        states = [{"x_after_attn": s.residual, "z_pre_moe": s.moe_input, "x_out": s.output}
                  for s in steps]
        states[-1]["x_out"] = encoder.norm(steps[-1].output)
        total_moe_loss = _moe_loss(encoder, [s.moe_input for s in steps])
    return states, total_moe_loss, encoder.num_meta_tokens


def encoder_tokens_per_layer(encoder: nn.Module, imgs: torch.Tensor, meta_week=None,
                             meta_hour=None, meta_lat=None, meta_lon=None):
    """``(tokens_by_layer, total_moe_loss, num_meta_tokens)``: each layer's output (B, L, dim),
    the last one after the final norm; see :func:`encoder_layer_states`."""
    states, total_moe_loss, num_meta_tokens = encoder_layer_states(
        encoder, imgs, meta_week, meta_hour, meta_lat, meta_lon)
    return [state["x_out"] for state in states], total_moe_loss, num_meta_tokens


def routing_assign_and_usage_for_layer(moe_layer: MoELayer, x_tokens: torch.Tensor,
                                       patch_grid: int, num_meta_tokens: int = 4,
                                       has_cls: bool = True):
    """Routing of the patch tokens of x_tokens (B, L, dim) by ``moe_layer``'s gate.

    Returns numpy int64 ``(assign_maps (B, patch_grid, patch_grid), usage (B, E))``: the
    first-choice expert of every patch, and per chip how many patches route to each expert
    among their top k (each row sums to k * patch_grid ** 2); :func:`top1_map` and
    :func:`usage_counts` of the gate's routing.
    """
    with torch.no_grad():
        B, L, dim = x_tokens.shape
        routing = moe_layer.gate(x_tokens.reshape(-1, dim))
        topk_idx = _patch_tokens(routing.topk_idx.view(B, L, -1), patch_grid,
                                 num_meta_tokens, has_cls)
        assign_maps = top1_map(topk_idx, patch_grid)
        usage = usage_counts(topk_idx, moe_layer.num_experts)
    return assign_maps.cpu().numpy(), usage.cpu().numpy()


def plot_expert_usage_bars(usage, title: str = "Expert usage") -> None:
    """Show the mean and standard deviation over the chips of each expert's share of a chip's
    routed patch tokens, from usage (B, E) counts (:func:`routing_assign_and_usage_for_layer`);
    the dashed line marks perfect balance."""
    usage = _as_numpy(usage).astype(np.float64)
    shares = usage / usage.sum(axis=1, keepdims=True)
    _show_figure(plot_usage_bars(shares.mean(axis=0), shares.std(axis=0), title=title,
                                 ylabel="share of routed patch tokens"))


def safe_unnormalize(x: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """x (C, H, W) z-scored -> ``x * std + mean`` per band; x itself when mean or std is None."""
    if mean is None or std is None:
        return x
    return unnormalize(x, mean, std)


def to_rgb_landsat(img_tensor: torch.Tensor, max_values, bands=(3, 2, 1), mean=_BEN_MEAN,
                   std=_BEN_STD) -> np.ndarray:
    """A (C, H, W) chip (z-scored with mean and std; None: as it is) -> RGB (H, W, 3) float32
    in [0, 1]: the bands ``bands`` (those the chip has; the first three if none), each divided
    by its entry of ``max_values`` (one per band, or one for all) and clipped to [0, 1], then
    one 1-99 percentile stretch over the three bands."""
    raw = safe_unnormalize(img_tensor.detach().float(), mean, std).cpu().numpy()
    channels = raw.shape[0]
    chosen = [int(b) for b in bands if int(b) < channels] or list(range(min(3, channels)))
    scale = np.asarray(max_values, dtype=np.float32)
    if scale.ndim == 1:
        scale = scale[:len(chosen)]
    rgb = np.clip(np.moveaxis(raw[chosen], 0, -1) / np.maximum(scale, 1e-6), 0.0, 1.0)
    lo, hi = np.percentile(rgb, (1, 99))
    if hi > lo:
        rgb = stretch(rgb, (lo, hi))
    return rgb.astype(np.float32)


def make_rgb(imgs: torch.Tensor, index: int, max_values, bands=(3, 2, 1), mean=_BEN_MEAN,
             std=_BEN_STD) -> np.ndarray:
    """Chip ``index`` of imgs (B, C, H, W) as RGB (H, W, 3) in [0, 1] (:func:`to_rgb_landsat`)."""
    return to_rgb_landsat(imgs[index], max_values=np.asarray(max_values), bands=bands,
                          mean=mean, std=std)


def plot_routing_assignment_with_dots(base_rgb, *, assignment_map, num_experts=None,
                                      patch_size: int = 16,
                                      title: str = "Routing: top-1 expert per patch",
                                      border_color=(1, 1, 1, 0.55), border_lw=0.6, dot_size=18,
                                      dot_edge_color="k", dot_edge_lw=0.25) -> None:
    """Show base_rgb (H, W, 3) in [0, 1] with its patch grid and a dot per patch coloured by
    the patch's first-choice expert (assignment_map (H / patch_size, W / patch_size)); the
    legend gives each expert's share of the patches. ``num_experts`` defaults to the largest
    expert id + 1."""
    assignment_map = _as_numpy(assignment_map).astype(np.int64)
    rows, cols = assignment_map.shape
    height, width = np.asarray(base_rgb).shape[:2]
    if (height, width) != (rows * patch_size, cols * patch_size):
        raise ValueError(f"image of {height}x{width} pixels, but {rows}x{cols} patches of "
                         f"{patch_size} pixels cover {rows * patch_size}x{cols * patch_size}")
    if num_experts is None:
        num_experts = int(assignment_map.max()) + 1 if assignment_map.size else 0
    colors = expert_colors(num_experts)
    fig = Figure(figsize=(5.8, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(base_rgb, interpolation="nearest", extent=(0, width, height, 0))
    for y in range(0, height + 1, patch_size):
        ax.plot([0, width], [y, y], color=border_color, linewidth=border_lw)
    for x in range(0, width + 1, patch_size):
        ax.plot([x, x], [0, height], color=border_color, linewidth=border_lw)
    centre_rows, centre_cols = np.mgrid[0:rows, 0:cols]
    ax.scatter((centre_cols.ravel() + 0.5) * patch_size, (centre_rows.ravel() + 0.5) * patch_size,
               s=dot_size, c=[colors[e] for e in assignment_map.ravel()],
               edgecolors=dot_edge_color, linewidths=dot_edge_lw)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    handles = [Line2D([], [], marker="o", linestyle="", markerfacecolor=colors[e],
                      markeredgecolor=dot_edge_color, markeredgewidth=dot_edge_lw, markersize=6,
                      label=f"E{e} ({(assignment_map == e).mean():.0%})")
               for e in range(num_experts)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    _show_figure(fig)


def get_expert_contributions_for_layer(moe_layer: MoELayer, x_tokens: torch.Tensor
                                       ) -> torch.Tensor:
    """Contribution ``||g_e f_e(x)||`` of every expert e to every token of x_tokens
    (B, L, dim): (B, L, E), zero where a token does not route to e (the contribution maps of
    :func:`analyze_layer` on the patch tokens)."""
    with torch.no_grad():
        B, L, dim = x_tokens.shape
        flat = x_tokens.reshape(-1, dim)
        gates = moe_layer.gate(flat).gates
        contributions = (gates.unsqueeze(-1) * expert_outputs(moe_layer, flat)).norm(dim=-1)
    return contributions.view(B, L, moe_layer.num_experts)


def tokens_to_patch_maps(contributions, patch_grid: int, num_meta_tokens: int = 4,
                         has_cls: bool = True) -> List[List[np.ndarray]]:
    """Per-token values (B, L, E) -> ``maps[b][e]``, a (patch_grid, patch_grid) numpy map of
    the patch tokens of chip b for expert e."""
    patches = _patch_tokens(torch.as_tensor(contributions), patch_grid, num_meta_tokens, has_cls)
    grids = patches.detach().cpu().numpy().reshape(patches.shape[0], patch_grid, patch_grid, -1)
    return [[grids[b, :, :, e] for e in range(grids.shape[-1])] for b in range(len(grids))]


def show_original_plus_expert_heatmaps(maps_for_image, base_rgb, title: str = "",
                                       patch_size: int = 16, alpha: float = 0.4,
                                       cmap: str = "plasma", routed_counts=None,
                                       clip_percentile=99.0, show_standalone: bool = True
                                       ) -> None:
    """Show one row per expert: base_rgb (H, W, 3), the expert's map (G, G) over it (opacity
    ``alpha``) and, with ``show_standalone``, the map alone. All maps share one colour scale,
    from their minimum to their ``clip_percentile`` percentile (values above are clipped;
    None: to their maximum). ``routed_counts`` (E,): the routed patches per expert, for the
    titles. A map of G x G patches covers G * patch_size pixels."""
    maps = [_as_numpy(m).astype(np.float64) for m in maps_for_image]
    num_experts = len(maps)
    values = np.concatenate([m.ravel() for m in maps]) if maps else np.zeros(1)
    vmin = float(values.min())
    vmax = float(np.percentile(values, clip_percentile)) if clip_percentile is not None \
        else float(values.max())
    vmax = max(vmax, vmin + 1e-6)
    maps = [np.clip(m, vmin, vmax) for m in maps]
    columns = 3 if show_standalone else 2
    fig = Figure(figsize=(5 * columns, 3 * max(num_experts, 1)), layout="constrained")
    axes = fig.subplots(max(num_experts, 1), columns, squeeze=False)
    for expert, heat in enumerate(maps):
        extent = (0, heat.shape[1] * patch_size, heat.shape[0] * patch_size, 0)
        original, overlay = axes[expert, 0], axes[expert, 1]
        original.imshow(base_rgb, extent=extent)
        original.set_title("Original")
        overlay.imshow(base_rgb, extent=extent)
        overlay.imshow(heat, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax,
                       interpolation="nearest", extent=extent)
        label = f"Expert {expert}"
        if routed_counts is not None:
            label += f" (tokens: {routed_counts[expert]})"
            if routed_counts[expert] == 0:
                label += ": no tokens"
        overlay.set_title(label)
        if show_standalone:
            axes[expert, 2].imshow(heat, cmap=cmap, vmin=vmin, vmax=vmax,
                                   interpolation="nearest", extent=extent)
            axes[expert, 2].set_title(f"Expert {expert} heatmap")
    for ax in axes.ravel():
        ax.axis("off")
    if maps:  # the scale at full opacity, not the overlay's
        fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap), ax=axes.ravel().tolist(),
                     shrink=0.7, label="Activation / Δ")
    fig.suptitle(title, fontsize=14)
    _show_figure(fig)


def compute_ablation_heatmaps(layer_moe: MoELayer, x_tokens: torch.Tensor, patch_grid: int,
                              num_meta_tokens: int, has_cls: bool = True,
                              propagate_through=None, layer_norm=None,
                              residual_base_tokens=None) -> np.ndarray:
    """Ablation maps ``||y - y_(-e)||`` of every expert of ``layer_moe``: (B, E, G, G) numpy.

    x_tokens (B, L, dim) is the MoE's input. ``y`` is its output (plus
    ``residual_base_tokens`` (B, L, dim) when given: the layer's output), then run through the
    layers ``propagate_through`` (if any) and ``layer_norm`` (if any); ``y_(-e)`` the same with
    expert e's gated term removed from every token (:func:`without_expert`, the remaining
    gates not renormalised). With the MoE input and residual of an encoder layer, the
    remaining layers and the encoder's final norm, the maps are :func:`analyze_layer`'s
    ablations ``measured_at="final"``; without any of the three, its contributions.
    """
    with torch.no_grad():
        B, L, dim = x_tokens.shape
        flat = x_tokens.reshape(-1, dim)
        gates = layer_moe.gate(flat).gates
        outputs = expert_outputs(layer_moe, flat)

        def measured(layer_gates: torch.Tensor) -> torch.Tensor:
            tokens = mix(layer_gates, outputs).view(B, L, dim)
            if residual_base_tokens is not None:
                tokens = residual_base_tokens + tokens
            for layer in propagate_through if propagate_through is not None else ():
                tokens = layer(tokens)[0]
            return layer_norm(tokens) if layer_norm is not None else tokens

        reference = measured(gates)
        maps = [_patch_tokens((reference - measured(without_expert(gates, e))).norm(dim=-1),
                              patch_grid, num_meta_tokens, has_cls)
                for e in range(len(layer_moe.experts))]
    return torch.stack(maps, dim=1).view(B, -1, patch_grid, patch_grid).cpu().numpy()


def layer_report_simple(model: nn.Module, imgs: torch.Tensor, meta_week=None, meta_hour=None,
                        meta_lat=None, meta_lon=None, image_index: int = 0,
                        layer_index: int = 0,
                        max_values=np.array(_PUBLISHED_MAX_VALUES, dtype=np.float32),
                        rgb_bands=(3, 2, 1), device="cuda") -> dict:
    """The published one-layer report: shows, for encoder layer ``layer_index`` and the batch
    imgs (B, C, H, W) with metadata (B, 2) each (or None),

    1. the experts' usage (:func:`plot_expert_usage_bars`, over the batch);
    2. chip ``image_index`` with its top-1 expert per patch
       (:func:`plot_routing_assignment_with_dots`);
    3. its contribution maps ``||g_e f_e(x)||`` and its ablation maps ``||y - y_(-e)||``
       after the remaining layers and the final norm
       (:func:`show_original_plus_expert_heatmaps`), both from :func:`analyze_layer`.

    ``model``: an MOEMAE (or its encoder), moved to ``device``; evaluated in ``eval()`` with
    deterministic routing (its modes are restored afterwards). ``max_values`` and
    ``rgb_bands``: the RGB rendering (:func:`make_rgb`). Returns ``{"num_experts": E,
    "usage_image": (E,) int64 routed patches per expert of the chip (top k), "moe_loss": the
    encoder's summed load-balancing loss on the batch}``.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} is not available on this machine (no CUDA "
                         "device): pass device='cpu'")
    if not -len(imgs) <= image_index < len(imgs):
        raise ValueError(f"image_index {image_index} does not exist: the batch has "
                         f"{len(imgs)} chips")
    encoder = as_encoder(model)
    model.to(device)
    imgs = imgs.to(device)
    meta = [None if m is None else m.to(device)
            for m in (meta_week, meta_hour, meta_lat, meta_lon)]
    with evaluation(model), deterministic_routing(model):
        tokens = encoder_layer_tokens(encoder, imgs, *meta)
        result = analyze_layer(encoder, imgs, *meta, layer=layer_index, measured_at="final",
                               tokens=tokens)
        moe_loss = float(_moe_loss(encoder, tokens.moe_inputs))
    usage = result.usage.cpu().numpy()
    counts_image = usage[image_index]

    plot_expert_usage_bars(usage, title=f"Layer {layer_index}: expert routing (patch tokens)")
    base_rgb = make_rgb(imgs, image_index, max_values=max_values, bands=rgb_bands)
    plot_routing_assignment_with_dots(
        base_rgb, assignment_map=result.top1[image_index].cpu().numpy(),
        num_experts=result.num_experts, patch_size=encoder.patch_size,
        title=f"Layer {layer_index}: top-1 expert per patch")
    for maps, title, cmap in (
            (result.contributions, "Contribution (||g_e·f_e||)", "plasma"),
            (result.ablations, "Ablation Δ (||y - y_(-e)||)", "viridis")):
        show_original_plus_expert_heatmaps(
            list(maps[image_index].cpu().numpy()), base_rgb=base_rgb,
            title=f"Layer {layer_index} • {title}", patch_size=encoder.patch_size, alpha=0.35,
            cmap=cmap, routed_counts=counts_image, clip_percentile=99.0, show_standalone=True)
    return {"num_experts": int(result.num_experts), "usage_image": counts_image,
            "moe_loss": moe_loss}
