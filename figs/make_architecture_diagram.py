"""Draw the MoE-MAE architecture (figs/moe_mae_architecture.png) with matplotlib.

    python figs/make_architecture_diagram.py [--size S] [--out figs/moe_mae_architecture.png]

Widths, depth, heads and experts per stage are read from models/moe_mae.py, so the diagram
follows the code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.moe_mae import MODEL_SIZES, build_mae  # noqa: E402
from utils.data_utils import save_figure  # noqa: E402

COLORS = {"meta": "#f6c28b", "cls": "#f28e8e", "patch": "#9ecae1", "attn": "#c7e9c0",
          "moe": "#dadaeb", "norm": "#eeeeee", "decoder": "#fdd0a2", "out": "#bcbddc"}


def box(ax, x, y, width, height, text, color, fontsize=8, weight="normal"):
    ax.add_patch(FancyBboxPatch((x, y), width, height, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=color, edgecolor="black", linewidth=0.8))
    ax.text(x + width / 2, y + height / 2, text, ha="center", va="center", fontsize=fontsize,
            weight=weight)


def arrow(ax, start, end):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=10,
                                 linewidth=1.0, color="black"))


def draw(size: str = "S") -> Figure:
    """The architecture of a model size as a Figure."""
    mae = build_mae(size)
    encoder = mae.encoder
    config = MODEL_SIZES[size]
    stages = []  # (first layer, last layer, experts, hidden widths)
    for index, (experts, hidden) in enumerate(zip(encoder.experts_config, encoder.dh_list)):
        if stages and stages[-1][2] == experts:
            stages[-1][1], stages[-1][3] = index, stages[-1][3] + [hidden]
        else:
            stages.append([index, index, experts, [hidden]])
    dim, decoder_dim = encoder.embed_dim, mae.decoder_embed.out_features
    grid, patch = encoder.patch_grid, encoder.patch_size

    fig = Figure(figsize=(13.0, 5.8))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 16)
    ax.set_ylim(0, 7.2)
    ax.axis("off")
    ax.text(8, 6.85, f"MoE-MAE {size}: metadata-aware mixture-of-experts masked autoencoder "
            f"({sum(p.numel() for p in mae.parameters()):,} parameters)", ha="center",
            fontsize=11, weight="bold")

    # inputs -> token sequence: metadata above its four tokens, the chip above its patches
    box(ax, 0.2, 4.9, 2.3, 0.85, "acquisition metadata\nweek, hour, lat, lon\n(sin, cos) each",
        COLORS["meta"])
    box(ax, 0.2, 3.6, 2.3, 0.8, f"Linear(2, {dim})\nper metadata token", COLORS["meta"])
    box(ax, 2.9, 4.9, 2.2, 0.85, f"Landsat chip\n{encoder.in_chans} x {encoder.img_size} x "
        f"{encoder.img_size}", COLORS["patch"])
    box(ax, 2.9, 3.6, 2.2, 0.8, f"{patch}x{patch} Conv patch\nembedding: {grid * grid} tokens",
        COLORS["patch"])
    arrow(ax, (1.35, 4.9), (1.35, 4.4))
    arrow(ax, (4.0, 4.9), (4.0, 4.4))
    arrow(ax, (1.35, 3.6), (1.35, 2.9))
    arrow(ax, (4.0, 3.6), (4.0, 2.9))

    tokens = ["week", "hour", "lat", "lon", "CLS", "p1", "p2", "...", f"p{grid * grid}"]
    kinds = ["meta"] * 4 + ["cls"] + ["patch"] * 4
    for i, (token, kind) in enumerate(zip(tokens, kinds)):
        box(ax, 0.25 + i * 0.55, 2.3, 0.5, 0.55, token, COLORS[kind], fontsize=7)
    ax.text(2.7, 1.95, f"token sequence + positional embedding ({encoder.num_tokens} x {dim})",
            ha="center", fontsize=8)
    ax.text(2.7, 1.45, f"MAE pretraining: {mae.mask_ratio:.0%} of the patch tokens removed;\n"
            "the encoder sees the rest and the 5 metadata/CLS tokens", ha="center", fontsize=7,
            style="italic")

    # encoder: one layer in detail, then the stages
    arrow(ax, (5.25, 2.6), (5.7, 2.6))
    ax.add_patch(FancyBboxPatch((5.7, 0.5), 4.6, 5.9, boxstyle="round,pad=0.02",
                                facecolor="white", edgecolor="grey", linestyle="--"))
    ax.text(8.0, 6.1, f"encoder: {encoder.depth} pre-norm layers, width {dim}", ha="center",
            fontsize=9, weight="bold")
    box(ax, 5.9, 5.0, 4.2, 0.75, f"x = x + GQA(LN(x))\n{config['num_heads']} query heads, "
        f"{config['num_groups']} k/v groups", COLORS["attn"])
    box(ax, 5.9, 3.75, 4.2, 1.0, "x = x + MoE(LN(x))\nnoisy top-2 gate -> gated sum of the 2 "
        "chosen\nSwiGLU experts W2(silu(W_e x) * V x), V, W2 shared", COLORS["moe"])
    arrow(ax, (8.0, 5.0), (8.0, 4.75))
    for row, (first, last, experts, hidden) in enumerate(stages):
        y = 2.65 - row * 0.65
        box(ax, 5.9, y, 4.2, 0.55, f"layers {first}-{last}: {experts} experts, hidden "
            f"{max(hidden)}->{min(hidden)}", COLORS["moe"], fontsize=8)
    arrow(ax, (8.0, 3.75), (8.0, 3.2))
    box(ax, 5.9, 0.65, 4.2, 0.4, "final LayerNorm", COLORS["norm"])

    # outputs: embeddings and the decoder
    arrow(ax, (10.3, 0.85), (10.9, 0.85))
    box(ax, 10.9, 0.45, 2.3, 0.8, "embeddings for probes\n(CLS, mean or all tokens)",
        COLORS["out"])
    arrow(ax, (10.3, 0.95), (10.9, 3.5))
    box(ax, 10.9, 3.3, 2.3, 1.2, f"decoder\nLinear({dim}, {decoder_dim}) + mask tokens\n"
        f"{len(mae.decoder_layers)} MoE layers\n(3 experts, top-2)", COLORS["decoder"])
    arrow(ax, (13.2, 3.9), (13.6, 3.9))
    box(ax, 13.6, 3.3, 2.2, 1.2, f"reconstructed patches\n{grid * grid} x ({patch}x{patch}x"
        f"{encoder.in_chans})\nloss on masked (and\nvisible) patches", COLORS["patch"])
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Draw the MoE-MAE architecture diagram.")
    parser.add_argument("--size", default="S", choices=tuple(MODEL_SIZES))
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name(
        "moe_mae_architecture.png"))
    args = parser.parse_args(argv)
    save_figure(draw(args.size), args.out)
    print(f"architecture diagram: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
