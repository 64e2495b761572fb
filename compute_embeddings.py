"""Embed dataset splits with a frozen MoE-MAE encoder, one ``.npz`` per split.

    python compute_embeddings.py --config_yaml configs/embed_bigearthnet.yaml [--set ...]
    torchrun --nproc_per_node=N compute_embeddings.py --config_yaml ...   # sharded

Writes ``{embed.output_dir}/{embed.name}_{split}.npz`` for every split of ``data.splits``
(``x``, ``y``, ``ids``, ``settings``; see embed/compute_embed.py), atomically and streamed
(memory does not grow with the number of samples). Train probes on them with
``train_logistic_regression.py``. The hour encoding follows the checkpoint unless
``data.legacy_hour`` is given (see README, "Hour encoding").
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from datasets.builders import DATA_FIELDS, build_split, class_names
from embed.compute_embed import DTYPES, KEY_STYLES, PRECISIONS, compute_embeddings, output_keys
from models.moe_mae import POOLINGS
from utils.checkpoint import load_pretrained_and_hour
from utils.config import Field, config_arguments, dump_config, load_config, model_fields
from utils.errors import run_cli
from utils.files import check_output_dir, check_output_file
from utils.runtime import select_device, setup_distributed, teardown_distributed

SCHEMA = {
    "model": model_fields(checkpoint_path=Field("path", must_exist="file"),
                          device=Field("str", "auto")),
    "data": {
        **DATA_FIELDS,
        "splits": Field("paths", must_exist="any",
                        help="split name -> BEN-L CSV or packed dir, or EuroSAT-L split file"),
    },
    "embed": {
        "pooling": Field("str", "all", choices=POOLINGS),
        "normed": Field("bool", False, help="after the final norm (published: false)"),
        "use_metadata": Field("bool", True, help="false: zeros (metadata ablation)"),
        "dtype": Field("str", "float32", choices=tuple(DTYPES), help="of the stored rows"),
        "precision": Field("str", "fp32", choices=tuple(PRECISIONS),
                           help="the encoder's: fp32, or bf16/fp16 autocast"),
        "compile": Field("bool", False, help="torch.compile the encoder"),
        "output_dir": Field("path"),
        "name": Field("str", "embeddings"),
        "keys": Field("str", "ours", choices=KEY_STYLES,
                      help="published: x_<split>/y_<split> int16 one-hot, as the published "
                           "notebooks read"),
    },
}


def main(argv=None) -> int:
    args = config_arguments("Embed dataset splits with a frozen encoder.").parse_args(argv)
    config = load_config(args.config_yaml, SCHEMA, args.set)
    model_cfg, data_cfg, embed_cfg = config["model"], config["data"], config["embed"]
    output_dir = Path(embed_cfg["output_dir"])
    outputs = {split: output_dir / f"{embed_cfg['name']}_{split}.npz"
               for split in data_cfg["splits"]}
    check_output_dir(output_dir, "embed.output_dir")
    for output in outputs.values():
        check_output_file(output, "embed.output_dir")
    dist = setup_distributed()
    try:
        device = select_device(model_cfg["device"], dist.local_rank, key="model.device")
        mae, data_cfg["legacy_hour"] = load_pretrained_and_hour(model_cfg,
                                                                 data_cfg["legacy_hour"], device)
        encoder = mae.encoder
        # every split is built (and its files checked) before the first one is embedded
        datasets = {split: build_split(data_cfg, path, model_cfg["img_size"])
                    for split, path in data_cfg["splits"].items()}
        for split, path in data_cfg["splits"].items():
            dataset, output = datasets[split], outputs[split]
            settings = {"dataset": data_cfg["dataset"], "split": split, "split_source": path,
                        "checkpoint": model_cfg["checkpoint_path"], "model_size": model_cfg["size"],
                        "class_names": list(getattr(dataset, "classes", None) or
                                            class_names(data_cfg)),
                        "legacy_hour": data_cfg["legacy_hour"], "config": dump_config(config)}
            start = time.perf_counter()
            result = compute_embeddings(
                encoder, dataset, output, pooling=embed_cfg["pooling"],
                normed=embed_cfg["normed"], use_metadata=embed_cfg["use_metadata"],
                dtype=embed_cfg["dtype"], precision=embed_cfg["precision"],
                compile=embed_cfg["compile"], batch_size=data_cfg["batch_size"],
                num_workers=data_cfg["num_workers"], device=device, settings=settings,
                keys=embed_cfg["keys"], split=split)
            if dist.is_main:
                x_key = output_keys(embed_cfg["keys"], split)[0]
                print(f"[{split}] {len(dataset)} samples -> {output} x {result[x_key].shape} "
                      f"({time.perf_counter() - start:.1f} s)", flush=True)
                result.close()
    finally:
        teardown_distributed(dist)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_cli(main)
