"""Label efficiency: probe metrics vs. the fraction of training labels, over several seeds, for
one or more embedding variants (e.g. metadata on vs. off).

    python label_efficiency.py --train train.npz --test test.npz --out DIR
    python label_efficiency.py --variant meta_on=train_on.npz,test_on.npz \\
        --variant meta_off=train_off.npz,test_off.npz --out DIR \\
        [--fractions 0.01,0.05,0.1,0.25,0.5,1.0] [--seeds 0,1,2] [--probe logreg|knn] ...

For every fraction and seed the probe is trained on a label-stratified subset of the training
rows (classification_models.embeddings.label_fraction_indices) and evaluated on the whole test
file. Writes ``DIR/{name}.csv`` (one row per variant, fraction and seed: variant, fraction,
seed, n_train, n_test and the scalar metrics of classification_models/metrics.py) and
``DIR/{name}.png`` (the headline metric, overall accuracy for multiclass or micro mAP for
multilabel, mean +- std over seeds vs. fraction), both atomically.

Comparability: the subset for a (fraction, seed) is drawn once and used for every variant, so
the variants must hold the same samples in the same order. This is checked on the ``ids`` of
the train files (and of the test files) when both variants have them, and otherwise, more
weakly, on their labels; a mismatch is an error.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from classification_models.embeddings import (EmbeddingSplit, check_compatible, check_fraction,
                                              check_training_labels, label_fraction_indices,
                                              load_split, parse_feature_slice)
from classification_models.metrics import HEADLINE_METRIC, scalar_metrics
from classification_models.probes import (add_probe_arguments, build_probe, fit_probe,
                                          probe_options, warn)
from train_logistic_regression import check_probe_arguments
from utils.config import check_seed
from utils.errors import UserInputError, run_cli
from utils.files import atomic_path, write_csv

DEFAULT_FRACTIONS = "0.01,0.05,0.1,0.25,0.5,1.0"
DEFAULT_SEEDS = "0,1,2"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=TRAIN,TEST",
                        help="a named pair of train and test embedding files; repeat to compare")
    parser.add_argument("--train", type=Path, default=None,
                        help="train embeddings (single-variant form, with --test)")
    parser.add_argument("--test", type=Path, default=None,
                        help="test embeddings (single-variant form, with --train)")
    parser.add_argument("--out", type=Path, default=Path("."), help="output folder (default .)")
    parser.add_argument("--name", default="label_efficiency",
                        help="base name of the CSV and PNG (default label_efficiency)")
    parser.add_argument("--fractions", default=DEFAULT_FRACTIONS,
                        help=f"comma-separated label fractions in (0, 1] (default {DEFAULT_FRACTIONS})")
    parser.add_argument("--seeds", default=DEFAULT_SEEDS,
                        help=f"comma-separated seeds (default {DEFAULT_SEEDS})")
    add_probe_arguments(parser)
    return parser


def parse_variants(args) -> list[tuple[str, Path, Path]]:
    if args.variant and (args.train or args.test):
        raise UserInputError("use either --variant NAME=TRAIN,TEST or --train/--test, not both")
    if not args.variant:
        if not (args.train and args.test):
            raise UserInputError("give --train and --test, or one or more --variant NAME=TRAIN,TEST")
        return [("default", args.train, args.test)]
    variants = []
    for spec in args.variant:
        name, _, paths = spec.partition("=")
        files = paths.split(",")
        if not name or len(files) != 2 or not all(files):
            raise UserInputError(f"bad --variant '{spec}': use NAME=TRAIN.npz,TEST.npz")
        variants.append((name, Path(files[0]), Path(files[1])))
    names = [name for name, _, _ in variants]
    if len(set(names)) != len(names):
        raise UserInputError(f"--variant names must be unique, got {names}")
    return variants


def parse_list(text: str, convert, option: str) -> list:
    try:
        values = [convert(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UserInputError(f"bad {option} '{text}': use comma-separated numbers") from None
    if not values:
        raise UserInputError(f"{option} is empty")
    return values


def check_same_rows(reference: EmbeddingSplit, other: EmbeddingSplit) -> None:
    """Both files must list the same samples in the same order (ids, else labels)."""
    if reference.ids is not None and other.ids is not None:
        if not np.array_equal(reference.ids, other.ids):
            raise UserInputError(f"{reference.path} and {other.path} hold different sample ids "
                                 "(or order); variants must embed the same samples")
    elif not np.array_equal(reference.y, other.y):
        raise UserInputError(f"{reference.path} and {other.path} have different labels "
                             "(rows or order); variants must embed the same samples")


def load_variants(variants, args) -> list[tuple[str, EmbeddingSplit, EmbeddingSplit]]:
    loaded = []
    for name, train_path, test_path in variants:
        multilabel = loaded[0][1].multilabel if loaded else args.multilabel
        train = load_split(train_path, multilabel, args.pool, args.feature_slice, stream=True)
        test = load_split(test_path, train.multilabel, args.pool, args.feature_slice, stream=True)
        check_compatible(train, test)
        if loaded:
            check_same_rows(loaded[0][1], train)
            check_same_rows(loaded[0][2], test)
        loaded.append((name, train, test))
    return loaded


def summarise(rows: list[dict], metric: str) -> dict:
    """{variant: (fractions, means, stds)} of ``metric`` over seeds, fractions ascending."""
    summary = {}
    for variant in dict.fromkeys(row["variant"] for row in rows):
        fractions = sorted({row["fraction"] for row in rows if row["variant"] == variant})
        values = [[row[metric] for row in rows if row["variant"] == variant
                   and row["fraction"] == fraction] for fraction in fractions]
        summary[variant] = (fractions, [float(np.mean(v)) for v in values],
                            [float(np.std(v)) for v in values])
    return summary


def plot(path: Path, summary: dict, metric: str, n_seeds: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for variant, (fractions, means, stds) in summary.items():
        means, stds = np.array(means), np.array(stds)
        axes.plot(fractions, means, marker="o", label=variant)
        axes.fill_between(fractions, means - stds, means + stds, alpha=0.2)
    axes.set_xscale("log")
    all_fractions = sorted({f for fractions, _, _ in summary.values() for f in fractions})
    axes.set_xticks(all_fractions, [f"{f:g}" for f in all_fractions])
    axes.minorticks_off()
    axes.set_xlabel("fraction of training labels")
    axes.set_ylabel(f"{metric} (mean ± std over {n_seeds} seeds)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    variants = parse_variants(args)
    fractions = parse_list(args.fractions, float, "--fractions")
    for fraction in fractions:
        check_fraction(fraction)
    seeds = parse_list(args.seeds, int, "--seeds")
    for seed in seeds:
        check_seed("--seeds", seed)
    args.seed = seeds[0]
    check_probe_arguments(args)
    if args.feature_slice:
        parse_feature_slice(args.feature_slice)

    loaded = load_variants(variants, args)
    reference_train = loaded[0][1]
    task = reference_train.task
    class_names = reference_train.class_names
    metric = HEADLINE_METRIC[task]
    print(f"[label efficiency] task {task}  probe {args.probe}  variants "
          f"{', '.join(name for name, _, _ in loaded)}  train rows {len(reference_train.y)}")

    rows = []
    for fraction in fractions:
        for seed in seeds:
            subset = label_fraction_indices(reference_train.y, reference_train.multilabel,
                                            fraction, seed)
            context = f" (fraction {fraction}, seed {seed}: {len(subset)} rows)"
            for message in check_training_labels(reference_train.y[subset],
                                                 reference_train.multilabel,
                                                 reference_train.path, class_names, context):
                warn(message)
            for name, train, test in loaded:
                model = build_probe(args.probe, multilabel=train.multilabel,
                                    **{**probe_options(args), "seed": seed})
                fit_probe(model, train.x.select(subset).cached(), train.y[subset])
                metrics = scalar_metrics(model.evaluate(test.x, test.y, class_names)[0])
                n_test = metrics.pop("n_samples")
                rows.append({"variant": name, "fraction": fraction, "seed": seed,
                             "n_train": int(len(subset)), "n_test": n_test, **metrics})
                print(f"  {name:>12}  fraction {fraction:<6g} seed {seed:<3d} "
                      f"n_train {len(subset):<7d} {metric} {metrics[metric]:.4f}")

    csv_path = args.out / f"{args.name}.csv"
    png_path = args.out / f"{args.name}.png"
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(csv_path, rows)
    summary = summarise(rows, metric)
    plot(png_path, summary, metric, len(seeds), f"Label efficiency ({args.probe} probe)")
    for variant, (variant_fractions, means, stds) in summary.items():
        print(f"[{variant}] {metric}: " + "  ".join(
            f"{f:g}: {m:.4f}±{s:.4f}" for f, m, s in zip(variant_fractions, means, stds)))
    print(f"[saved] {csv_path}")
    print(f"[saved] {png_path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
