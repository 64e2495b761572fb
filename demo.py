"""The whole pipeline on the bundled sample_dataset: what ``make demo`` runs.

    python demo.py [--out runs/demo] [--epochs 70]

1. pretrain the MoE-MAE S (configs/demo_pretrain.yaml);
2. evaluate its reconstructions on the BEN-L test split, with figures (configs/eval_moe_mae.yaml);
3. embed BEN-L (all tokens) and EuroSAT-L (CLS token) train/val/test splits
   (configs/embed_bigearthnet.yaml, configs/embed_eurosat.yaml);
4. train the published linear probe on each and score the test split;
5. map what the experts do (configs/analyze_experts.yaml);
6. print a summary: the masked reconstruction loss against the mean-patch baseline (each
   masked patch guessed as the mean of its chip's visible patches, see
   ``eval.evaluate_mae.mean_patch_baseline``), probe metrics against a majority-class
   baseline, output paths (also written to ``<out>/summary.json``).

Running it again replaces the earlier outputs in ``--out`` (pretraining runs with
``--overwrite``).

Every step is the same command a user runs by hand (shown as it starts), with ``--set``
overrides pointing its outputs into ``--out``. On synthetic data the numbers say that the
pipeline works, not how good the model is.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
from sklearn.metrics import accuracy_score, average_precision_score

import analyze_experts
import compute_embeddings
import eval_mae
import map_scene
import pretrain_mae
import train_logistic_regression
from utils.errors import UserInputError, run_cli
from utils.files import write_json


def step(title: str, script, args: list) -> None:
    print(f"\n=== {title}\n$ python {script.__name__}.py {' '.join(map(str, args))}", flush=True)
    start = time.perf_counter()
    code = script.main([str(a) for a in args])
    if code:
        raise UserInputError(f"demo step '{title}' failed with exit status {code}")
    print(f"({time.perf_counter() - start:.0f} s)", flush=True)


def majority_baseline(train_y: np.ndarray, test_y: np.ndarray) -> float:
    """Multiclass: accuracy of always predicting the most frequent training class.
    Multilabel: micro mAP of scoring every label by its training frequency (a prior)."""
    if train_y.ndim == 1:
        return float(accuracy_score(test_y, np.full(len(test_y), np.bincount(train_y).argmax())))
    prior = np.tile(train_y.mean(axis=0), (len(test_y), 1))
    return float(average_precision_score(test_y, prior, average="micro"))


def probe(name: str, embeddings: Path, multilabel: bool, out: Path) -> dict:
    """Train the published probe on ``{embeddings}_train.npz``; score val and test."""
    step(f"linear probe: {name}", train_logistic_regression, [
        "--train", f"{embeddings}_train.npz", "--val", f"{embeddings}_val.npz",
        "--test", f"{embeddings}_test.npz", "--out", out / "probes", "--name", name,
        "--multilabel", str(multilabel).lower(), "--n-jobs", 2])
    record = max((out / "probes").glob(f"{name}_*.json"), key=lambda p: p.stat().st_mtime)
    metrics = json.loads(record.read_text())["metrics"]["test"]
    metric = "map_micro" if multilabel else "overall_accuracy"
    with np.load(f"{embeddings}_train.npz") as train, np.load(f"{embeddings}_test.npz") as test:
        baseline = majority_baseline(train["y"], test["y"])
    return {"metric": metric, "probe": metrics[metric], "majority_baseline": baseline,
            "beats_baseline": metrics[metric] > baseline, "record": str(record)}


def pretraining_args(out: Path, epochs: Optional[int] = None) -> list:
    """The demo's pretraining command line: configs/demo_pretrain.yaml into ``out/pretrain``,
    replacing an earlier demo run there."""
    return ["--config_yaml", "configs/demo_pretrain.yaml", "--overwrite",
            "--set", f"training.weight_path={out / 'pretrain'}",
            *([] if epochs is None else ["--set", f"training.epochs={epochs}"])]


def map_demo_scene(out: Path, probe_record: str) -> None:
    """Map a synthetic Landsat scene (sample_dataset/generate_scene.py) with the EuroSAT-L
    probe: embeddings, probabilities, classes and a quicklook in ``<out>/scene_map``."""
    from sample_dataset.generate_scene import generate_scene

    generate_scene(out / "scene", 1200, 1200)
    step("scene map", map_scene, ["--config_yaml", "configs/map_scene.yaml",
                                  "--set", f"scene.path={out / 'scene'}",
                                  "--set", f"probe.path={probe_record}",
                                  "--set", f"output.dir={out / 'scene_map'}"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the whole pipeline on sample_dataset.")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--epochs", type=int, default=None,
                        help="pretraining epochs (default: configs/demo_pretrain.yaml)")
    args = parser.parse_args(argv)
    out = args.out
    checkpoint = out / "pretrain" / "pretrained_S_best.pth"
    started = time.perf_counter()

    step("pretraining", pretrain_mae, pretraining_args(out, args.epochs))
    step("reconstruction evaluation", eval_mae, [
        "--config_yaml", "configs/eval_moe_mae.yaml",
        "--set", f"model.checkpoint_path={checkpoint}",
        "--set", f"eval.reconstructions_dir={out / 'reconstruction'}"])
    for config in ("configs/embed_bigearthnet.yaml", "configs/embed_eurosat.yaml"):
        step(f"embeddings ({Path(config).stem})", compute_embeddings, [
            "--config_yaml", config, "--set", f"model.checkpoint_path={checkpoint}",
            "--set", f"embed.output_dir={out / 'embeddings'}"])
    embeddings = out / "embeddings"
    probes = {
        "bigearthnet_all_tokens": probe("bigearthnet_S_all", embeddings / "bigearthnet_S_all",
                                        True, out),
        "eurosat_cls": probe("eurosat_S_cls", embeddings / "eurosat_S_cls", False, out),
    }
    map_demo_scene(out, probes["eurosat_cls"]["record"])
    step("expert analysis", analyze_experts, [
        "--config_yaml", "configs/analyze_experts.yaml", "--set",
        f"model.checkpoint_path={checkpoint}", "--set", f"output.dir={out / 'analysis'}"])

    losses = json.loads((out / "reconstruction" / "eval_metrics.json").read_text())
    summary = {"seconds": round(time.perf_counter() - started, 1),
               "reconstruction": {k: losses[k] for k in (
                   "masked_loss", "mean_patch_baseline_loss", "unmasked_loss", "moe_loss",
                   "total_loss", "full_loss")},
               "probes": probes, "outputs": {name: str(out / name) for name in (
                   "pretrain", "reconstruction", "embeddings", "probes", "analysis")}}
    write_json(out / "summary.json", summary)

    print("\n=== summary (synthetic sample: checks the pipeline, not the model's quality)")
    recon = summary["reconstruction"]
    verdict = "below" if recon["masked_loss"] < recon["mean_patch_baseline_loss"] else "NOT below"
    print(f"  masked loss {recon['masked_loss']:.4f} is {verdict} the mean-patch baseline "
          f"{recon['mean_patch_baseline_loss']:.4f} (each masked patch guessed as the mean of "
          f"its chip's visible patches)")
    for name in ("unmasked_loss", "moe_loss", "total_loss", "full_loss"):
        print(f"  {name:<14} {recon[name]:.4f}")
    print(f"  reconstructions {out / 'reconstruction'} (result_masked_*.png)")
    for name, result in probes.items():
        verdict = "beats" if result["beats_baseline"] else "does NOT beat"
        print(f"  probe {name}: test {result['metric']} {result['probe']:.3f} {verdict} the "
              f"majority-class baseline {result['majority_baseline']:.3f}")
    for name, path in summary["outputs"].items():
        print(f"  {name:<15} {path}")
    print(f"  summary         {out / 'summary.json'}  ({summary['seconds']:.0f} s in all)")
    return 0 if all(result["beats_baseline"] for result in probes.values()) else 1


if __name__ == "__main__":
    run_cli(main)
