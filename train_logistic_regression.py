"""Train a probe (logistic regression, as published, or kNN) on frozen embeddings and evaluate it.

    python train_logistic_regression.py --train train.npz --val val.npz [--test test.npz] \\
        --out DIR --name N [--multilabel true|false] [--n-jobs 8] [--feature-slice a:b] \\
        [--pool [true|false]] [--scale] [--train-fraction f --seed s] [--probe logreg|knn] \
        [--solver lbfgs|sag] [--C 1] [--tol 1e-5] [--device cpu|cuda] [--knn-metric euclidean]

The logistic-regression probe is fitted by the exact L-BFGS solver on features streamed from the
file (classification_models/solver.py, rows.py); ``--solver sag`` is the published solver.

Writes ``DIR/{name}_{timestamp}.joblib`` (the fitted model, a published-compatible
``LogisticRegressionModel``) and ``DIR/{name}_{timestamp}.json``, both atomically; a second run
in the same second gets ``{timestamp}-1``. The record holds the published script's keys
(``train_npz``, ``val_npz``, ``x_shape_train``, ``y_shape_train``, ``x_shape_val``,
``y_shape_val``, ``multilabel``, ``feature_slice``, ``n_jobs``, ``version``, ``timestamp`` and
``metrics`` with the validation ``f1_micro``, ``f1_macro``, ``accuracy`` (multiclass) and
``report``) and the project's: ``metrics.val`` and ``metrics.test`` (all metrics of each
split), settings, inputs, task, class names and ``fit`` (the solver's report). Embedding file format, task inference, --pool and
--feature-slice: classification_models/embeddings.py. Metric names:
classification_models/metrics.py.

Differences from the published script: ``--pool false`` really disables pooling (any value used
to enable it), validation features are pooled with their own row count, pooling takes the token
count from the file's settings, and one-hot label rows with no 1 are no longer read as class 0.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from classification_models.embeddings import (check_compatible, check_fraction,
                                              check_training_labels, label_fraction_indices,
                                              load_split, parse_feature_slice)
from classification_models.metrics import HEADLINE_METRIC, published_split_metrics
from classification_models.probes import (add_probe_arguments, build_probe, fit_probe,
                                          probe_options, warn)
from utils.config import check_range, check_seed
from utils.errors import UserInputError, run_cli
from utils.files import check_output_dir, joblib_dump, write_json

EVAL_ROLES = ("val", "test")
PUBLISHED_RECORD_VERSION = "simple-1.0"  # the published record's schema, which this one extends


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, type=Path, help="training embeddings .npz")
    parser.add_argument("--val", type=Path, default=None, help="validation embeddings .npz")
    parser.add_argument("--test", type=Path, default=None, help="test embeddings .npz")
    parser.add_argument("--out", type=Path, default=Path("."), help="output folder (default .)")
    parser.add_argument("--name", default=None,
                        help="base name of the outputs (default: the probe, logreg or knn)")
    parser.add_argument("--train-fraction", type=float, default=1.0,
                        help="train on a seeded, label-stratified fraction in (0, 1] of the "
                             "training rows (default 1)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the training subset and of the sag solver (default 0)")
    add_probe_arguments(parser)
    return parser


def check_probe_arguments(args) -> None:
    """Numbers of the probe options in range and the output folder writable, before any
    work (the option names appear in the messages)."""
    check_seed("--seed", args.seed)
    check_range("--k", args.k, 1)
    check_range("--max-iter", args.max_iter, 1)
    for option, value in (("--C", args.C), ("--tol", args.tol)):
        if not value > 0:  # also NaN
            raise UserInputError(f"{option} must be > 0, got {value}")
    if args.n_jobs == 0 or args.n_jobs < -1:
        raise UserInputError(f"--n-jobs must be -1 (all cores) or at least 1, got {args.n_jobs}")
    check_output_dir(args.out, "--out")


def unique_run_id(out: Path, name: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_id, suffix = stamp, 0
    while any((out / f"{name}_{run_id}{ext}").exists() for ext in (".joblib", ".json")):
        suffix += 1
        run_id = f"{stamp}-{suffix}"
    return run_id


def format_metrics(metrics: dict, task: str) -> str:
    keys = ([HEADLINE_METRIC[task], "map_macro", "f1_micro", "f1_macro"] if task == "multilabel"
            else [HEADLINE_METRIC[task], "f1_macro", "precision_macro", "recall_macro"])
    return "  ".join(f"{key} {metrics[key]:.4f}" for key in keys)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_probe_arguments(args)
    check_fraction(args.train_fraction)
    if args.feature_slice:
        parse_feature_slice(args.feature_slice)  # fail on the format before loading large files
    args.name = args.name or args.probe

    train = load_split(args.train, args.multilabel, args.pool, args.feature_slice, stream=True)
    eval_splits = {}
    for role in EVAL_ROLES:
        path = getattr(args, role)
        if path is not None:
            eval_splits[role] = load_split(path, train.multilabel, args.pool, args.feature_slice,
                                           stream=True)
            check_compatible(train, eval_splits[role])
    class_names = train.class_names

    x_fit, y_fit, context = train.x, train.y, ""
    if args.train_fraction < 1.0:
        rows = label_fraction_indices(train.y, train.multilabel, args.train_fraction, args.seed)
        x_fit, y_fit = train.x.select(rows).cached(), train.y[rows]
        context = f" (--train-fraction {args.train_fraction}, seed {args.seed}: {len(rows)} rows)"
    for message in check_training_labels(y_fit, train.multilabel, train.path, class_names, context):
        warn(message)

    print(f"[train] {train.path}  x {tuple(train.x.shape)}  y {tuple(train.y.shape)}  "
          f"task {train.task}  rows used {len(y_fit)}  probe {args.probe}")
    model = build_probe(args.probe, multilabel=train.multilabel, **probe_options(args))
    fit_probe(model, x_fit, y_fit)

    metrics, predictions = {}, {}
    for role, split in eval_splits.items():
        metrics[role], predictions[role] = model.evaluate(split.x, split.y, class_names)
        print(f"[{role}] {split.path}  x {tuple(split.x.shape)}  "
              f"{format_metrics(metrics[role], train.task)}")

    args.out.mkdir(parents=True, exist_ok=True)
    run_id = unique_run_id(args.out, args.name)
    model_path = args.out / f"{args.name}_{run_id}.joblib"
    record_path = args.out / f"{args.name}_{run_id}.json"
    val = eval_splits.get("val")
    record = {
        # the published script's keys (a reader of its files finds them all) ...
        "run_id": run_id,
        "train_npz": str(args.train),
        "val_npz": str(args.val) if args.val else None,
        "x_shape_train": [len(y_fit), train.x.shape[1]],
        "y_shape_train": list(y_fit.shape),
        "x_shape_val": list(val.x.shape) if val else None,
        "y_shape_val": list(val.y.shape) if val else None,
        "multilabel": train.multilabel,
        "feature_slice": args.feature_slice,
        "n_jobs": args.n_jobs,
        "metrics": {**(published_split_metrics(val.y, predictions["val"], train.multilabel)
                       if val else {}), **metrics},
        "version": PUBLISHED_RECORD_VERSION,
        "timestamp": run_id,
        # ... and the project's

        "settings": {key: str(value) if isinstance(value, Path) else value
                     for key, value in vars(args).items()},
        "task": train.task,
        "class_names": class_names,
        "seed": args.seed,
        "n_train": int(len(y_fit)),
        "inputs": {"train": train.describe(),
                   **{role: split.describe() for role, split in eval_splits.items()}},
        "fit": getattr(model, "fit_report", None),
        "model_path": str(model_path),
    }
    joblib_dump(model, model_path)
    write_json(record_path, record)
    print(f"[saved] model:    {model_path}")
    print(f"[saved] metadata: {record_path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
