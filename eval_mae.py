"""Evaluate MoE-MAE reconstructions on a BigEarthNet-L split.

    python eval_mae.py --config_yaml configs/eval_moe_mae.yaml [--set eval.max_images=16 ...]

Runs the published eval config unchanged and prints its five lines (Masked, Unmasked, MoE,
Total and Full Loss), then per-band RMSE in reflectance DN. Writes every number to
``eval.metrics_json`` (default ``<reconstructions_dir>/eval_metrics.json``) and up to
``eval.max_images`` figures to ``eval.reconstructions_dir``. See eval/evaluate_mae.py for the
definitions. The hour encoding follows the checkpoint (``data.legacy_hour``: null); an
explicit ``data.legacy_hour`` overrides it, with a warning when it differs.

Output paths are checked before any work. A checkpoint with NaN or inf weights is an error
naming it (exit status 2), and so is an evaluation whose numbers come out non-finite: no JSON
with NaN (which is not valid JSON) is ever written.
"""

from __future__ import annotations

from pathlib import Path

from datasets.builders import check_split_source
from eval.evaluate_mae import SCHEMA, MAEEvaluator
from utils.config import config_arguments, load_config
from utils.errors import UserInputError, run_cli
from utils.files import check_output_dir, check_output_file, write_json
from utils.runtime import select_device


def main(argv=None) -> int:
    args = config_arguments("Evaluate MoE-MAE reconstructions.").parse_args(argv)
    config = load_config(args.config_yaml, SCHEMA, args.set)
    if config["model"]["img_size"] % config["model"]["patch_size"]:
        raise UserInputError("model.img_size must be a multiple of model.patch_size")
    data, eval_cfg = config["data"], config["eval"]
    check_split_source(data["dataset_path"], data["dataset_csv"], data["dataset_format"],
                       "data.dataset_path", "data.dataset_csv")
    json_path = Path(eval_cfg["metrics_json"] or
                     Path(eval_cfg["reconstructions_dir"]) / "eval_metrics.json")
    check_output_dir(eval_cfg["reconstructions_dir"], "eval.reconstructions_dir")
    check_output_file(json_path, "eval.metrics_json")
    device = select_device(config["model"]["device"], key="model.device")
    evaluator = MAEEvaluator(config, device=device)
    metrics = evaluator.run()

    print(f"Masked Loss: {metrics['masked_loss']:.4f}")
    print(f"Unmasked Loss: {metrics['unmasked_loss']:.4f}")
    print(f"MoE Loss: {metrics['moe_loss']:.4f}")
    print(f"Total Loss: {metrics['total_loss']:.4f}")
    print(f"Full Loss: {metrics['full_loss']:.4f}")
    print("\n| band | RMSE masked patches (DN) | RMSE full reconstruction (DN) |")
    print("|---|---:|---:|")
    for band, masked in metrics["rmse_masked_dn"].items():
        print(f"| {band} | {masked:.1f} | {metrics['rmse_full_dn'][band]:.1f} |")
    write_json(json_path, {"config": evaluator.config, **metrics})  # the hour it used
    print(f"\n{metrics['num_samples']} samples; metrics: {json_path}; "
          f"{len(metrics['figures'])} figures in {config['eval']['reconstructions_dir']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
