"""What the experts learn: routing maps, contributions, ablations and usage of a checkpoint.

    python analyze_experts.py --config_yaml configs/analyze_experts.yaml [--set analysis.layer=7]

For a checkpoint (ours or the published format) and one split (BEN-L by default; EuroSAT-L
with ``data.dataset: eurosat``), writes into ``output.dir``:

* ``expert_usage.csv``: per encoder layer and expert, the share of routed patch tokens
  (top-k and top-1), its standard deviation over chips, and the layer's routing entropies;
* ``usage_heatmap.png``: the layer x expert table of those shares;
* ``class_usage.csv``: per layer and class, the share of routed patch tokens per expert over
  the chips that carry the class (a multi-hot chip counts for each of its classes);
* ``usage_bars_layer{L}.png``: the chosen layer's shares with their spread over chips;
* for the first ``analysis.num_examples`` chips and the layer ``analysis.layer``:
  ``routing_layer{L}_chip{i}.png`` (top-1 expert per patch), ``contribution_layer{L}_chip{i}.png``
  (``||g_e f_e(x)||``) and ``ablation_layer{L}_chip{i}.png`` (``||y - y_(-e)||``);
* ``analysis_config.yaml``: the resolved config.

See utils/analysis_utils.py for the definitions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from datasets.builders import DATA_FIELDS, build_split, class_names
from embed.compute_embed import dataset_ids
from utils.analysis_utils import (ABLATION_POINTS, analyze_layer, expert_usage_statistics,
                                  plot_expert_maps, plot_routing_map, plot_usage_bars,
                                  plot_usage_heatmap)
from utils.checkpoint import load_pretrained_and_hour
from utils.config import (Field, config_arguments, dump_config, load_config, model_fields,
                          non_negative, positive)
from utils.data_config import BigEarthNetInfo, EuroSATInfo
from utils.errors import UserInputError, run_cli
from utils.files import check_output_dir, write_csv, write_text
from utils.runtime import select_device

DEMO_CHECKPOINT = "runs/demo/pretrain/pretrained_S_best.pth"
EXAMPLE_BATCH = 16  # chips per batch for the per-chip figures (every layer's tokens are kept)

SCHEMA = {
    "model": model_fields(
        checkpoint_path=Field("path", DEMO_CHECKPOINT, help="checked in main (hint: make demo)"),
        device=Field("str", "auto")),
    "data": {
        **DATA_FIELDS,
        "split": Field("path", "sample_dataset/bigearthnet-test.csv", must_exist="any",
                       help="BEN-L split CSV (or packed dir), or EuroSAT-L split file"),
        "max_chips": Field("int", None, nullable=True, check=positive,
                           help="statistics over the first N chips only"),
    },
    "analysis": {
        "layer": Field("int", 0, check=non_negative, help="encoder layer of the chip figures"),
        "num_examples": Field("int", 4, check=non_negative),
        "ablation_at": Field("str", "final", choices=ABLATION_POINTS,
                             help="layer: at the MoE output; final: after the final norm"),
        "renormalize": Field("bool", False, help="rescale the remaining gates to sum to 1"),
    },
    "output": {
        "dir": Field("path", "runs/demo/analysis"),
    },
}


def main(argv=None) -> int:
    args = config_arguments("Map what the experts of a checkpoint do.").parse_args(argv)
    config = load_config(args.config_yaml, SCHEMA, args.set)
    model_cfg, data_cfg, analysis = config["model"], config["data"], config["analysis"]
    checkpoint = Path(model_cfg["checkpoint_path"])
    check_output_dir(config["output"]["dir"], "output.dir")
    if not checkpoint.is_file():
        hint = ": run `make demo` first, or set model.checkpoint_path" \
            if model_cfg["checkpoint_path"] == DEMO_CHECKPOINT else ""
        raise UserInputError(f"model.checkpoint_path: checkpoint not found: {checkpoint}{hint}")
    device = select_device(model_cfg["device"], key="model.device")
    mae, data_cfg["legacy_hour"] = load_pretrained_and_hour(model_cfg, data_cfg["legacy_hour"],
                                                             device)
    encoder = mae.encoder
    layer = analysis["layer"]
    if layer >= len(encoder.layers):
        raise UserInputError(f"analysis.layer: {layer} does not exist, the {model_cfg['size']} "
                             f"encoder has layers 0..{len(encoder.layers) - 1}")

    # chips without a label file count in the usage statistics, in no class's
    dataset = build_split(data_cfg, data_cfg["split"], model_cfg["img_size"],
                          allow_unlabelled=True)
    unlabelled = sorted(getattr(dataset, "unlabelled", ()))
    if unlabelled:
        print(f"note: {len(unlabelled)} chip(s) have no label file ({', '.join(unlabelled[:3])}"
              f"{', ...' if len(unlabelled) > 3 else ''}): counted in the usage statistics, "
              f"in no class's")
    if data_cfg["max_chips"] is not None:
        dataset = Subset(dataset, range(min(data_cfg["max_chips"], len(dataset))))
    if len(dataset) == 0:
        raise UserInputError(f"data.split: no chips in {data_cfg['split']}")
    names = class_names(data_cfg)
    statistics = (EuroSATInfo if data_cfg["dataset"] == "eurosat" and
                  data_cfg["normalization"] == "eurosat" else BigEarthNetInfo).STATISTICS
    out = Path(config["output"]["dir"])
    out.mkdir(parents=True, exist_ok=True)

    loader = DataLoader(dataset, batch_size=data_cfg["batch_size"], shuffle=False,
                        num_workers=data_cfg["num_workers"],
                        generator=torch.Generator().manual_seed(0))  # not the global generator
    stats = expert_usage_statistics(encoder, loader, device, class_names=names)
    write_csv(out / "expert_usage.csv", stats.usage_rows())
    plot_usage_heatmap(stats, out / "usage_heatmap.png",
                       title=f"{checkpoint.name}: expert usage per layer ({stats.num_chips} chips)")
    if stats.class_share is not None:
        write_csv(out / "class_usage.csv", stats.class_rows())
    tag = f"layer{layer:02d}"
    plot_usage_bars(stats.topk_share[layer], stats.chip_share_std[layer],
                    out / f"usage_bars_{tag}.png",
                    title=f"layer {layer}: share of routed patch tokens (mean and std over "
                          f"{stats.num_chips} chips)")

    figures, chip = 0, 0
    measured = "at the layer's MoE output" if analysis["ablation_at"] == "layer" \
        else "after the final norm"
    examples = Subset(dataset, range(min(analysis["num_examples"], len(dataset))))
    ids = dataset_ids(examples)
    for imgs, _, *meta in DataLoader(examples, batch_size=EXAMPLE_BATCH,
                                     generator=torch.Generator().manual_seed(0)):
        meta = [m.to(device) for m in meta]  # none for EuroSAT-L
        result = analyze_layer(encoder, imgs.to(device), *meta, layer=layer,
                               renormalize=analysis["renormalize"],
                               measured_at=analysis["ablation_at"])
        for index, img in enumerate(imgs):
            name, about = f"{tag}_chip{chip:03d}.png", f"layer {layer}, chip {chip} ({ids[chip]})"
            plot_routing_map(img, result.top1[index], result.num_experts,
                             out / f"routing_{name}", statistics=statistics,
                             title=f"{about}\ntop-1 expert per patch")
            plot_expert_maps(img, result.contributions[index], "contribution",
                             out / f"contribution_{name}", statistics=statistics,
                             title=f"{about}\ncontribution ||g_e f_e(x)||")
            plot_expert_maps(img, result.ablations[index], "ablation",
                             out / f"ablation_{name}", statistics=statistics,
                             title=f"{about}\nablation ||y - y_(-e)|| {measured}")
            figures, chip = figures + 3, chip + 1
    write_text(out / "analysis_config.yaml", dump_config(config))

    entropy = ", ".join(f"{value:.2f}" for value in stats.usage_entropy)
    print(f"{stats.num_chips} chips, {len(stats.layer_names)} layers; usage entropy per layer "
          f"(1 = balanced): {entropy}")
    print(f"per-layer usage: {out / 'expert_usage.csv'}")
    print(f"layer x expert heatmap: {out / 'usage_heatmap.png'}")
    if stats.class_share is not None:
        print(f"per-class usage: {out / 'class_usage.csv'}")
    print(f"layer {layer}: usage bars and {figures} chip figures (routing, contribution, "
          f"ablation) in {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
