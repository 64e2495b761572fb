"""What the probe scripts share: the probe command-line options, building a probe by name and
fitting it with one-line warnings."""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np
from joblib import parallel_backend
from sklearn.exceptions import ConvergenceWarning

from classification_models.knn import KNN_METRICS, KNNModel
from classification_models.logistic_regression import SOLVERS, LogisticRegressionModel
from classification_models.solver import DEFAULT_TOL
from utils.errors import UserInputError

PROBES = ("logreg", "knn")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that select the features, the task and the probe (both probe scripts)."""
    parser.add_argument("--multilabel", type=parse_bool, default=None, metavar="true|false",
                        help="force the task (default: inferred from the training labels)")
    parser.add_argument("--pool", type=parse_bool, nargs="?", const=True, default=False,
                        metavar="true|false",
                        help="average the features over tokens, (N, T*E) -> (N, E); T, E from "
                             "the file's settings, else T=105. Bare --pool means true")
    parser.add_argument("--feature-slice", default=None, metavar="a:b",
                        help="keep feature columns a:b (after --pool), e.g. 576:720")
    parser.add_argument("--scale", type=parse_bool, nargs="?", const=True, default=False,
                        metavar="true|false", help="standardise features (fit on train)")
    parser.add_argument("--probe", choices=PROBES, default="logreg",
                        help="logistic regression (published) or kNN (default: logreg)")
    parser.add_argument("--k", type=int, default=5, help="neighbours for --probe knn (default 5)")
    parser.add_argument("--knn-metric", choices=KNN_METRICS, default="euclidean",
                        help="kNN distance (default euclidean, as Landsat-Bench)")
    parser.add_argument("--solver", choices=SOLVERS, default="lbfgs",
                        help="logreg solver: lbfgs (fast, exact optimum, streamed) or sag "
                             "(the published solver, in memory) (default lbfgs)")
    parser.add_argument("--C", type=float, default=1.0,
                        help="inverse L2 regularisation strength of logreg (default 1)")
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL,
                        help="lbfgs: stop when the gradient norm is this fraction of its value "
                             f"at zero (default {DEFAULT_TOL:g})")
    parser.add_argument("--device", default="cpu",
                        help="lbfgs: torch device of the data passes, cpu or cuda (default cpu)")
    parser.add_argument("--max-iter", type=int, default=1000,
                        help="logreg iterations: sag epochs or lbfgs iterations (default 1000)")
    parser.add_argument("--n-jobs", type=int, default=4,
                        help="parallel jobs: lbfgs threads, per-label sag fits (multilabel) "
                             "and kNN threads; -1: all cores (default 4)")


def probe_options(args) -> dict:
    """build_probe's keyword arguments from the parsed options (not the task)."""
    return dict(scale=args.scale, seed=args.seed, n_jobs=args.n_jobs, k=args.k,
                max_iter=args.max_iter, solver=args.solver, C=args.C, tol=args.tol,
                device=args.device, knn_metric=args.knn_metric)


def build_probe(probe: str, *, multilabel: bool, scale: bool = False, seed: int = 0,
                n_jobs=None, k: int = 5, max_iter: int = 1000, solver: str = "lbfgs",
                C: float = 1.0, tol: float = DEFAULT_TOL, device: str = "cpu",
                knn_metric: str = "euclidean"):
    if k < 1 or max_iter < 1:
        raise UserInputError(f"--k and --max-iter must be at least 1, got {k} and {max_iter}")
    if probe == "logreg":
        return LogisticRegressionModel(scale=scale, max_iter=max_iter, seed=seed,
                                       multilabel=multilabel, n_jobs=n_jobs, solver=solver, C=C,
                                       tol=tol, device=device)
    if probe == "knn":
        return KNNModel(k=k, scale=scale, multilabel=multilabel, n_jobs=n_jobs, metric=knn_metric)
    raise ValueError(f"unknown probe {probe!r}; choose from {PROBES}")


def fit_probe(model, x: np.ndarray, y: np.ndarray):
    """Fit, reporting sklearn's repeated warnings as one line each: non-convergence of the
    solver (once per fitted label for multilabel) and constant label columns (the scripts
    report those themselves, see embeddings.check_training_labels)."""
    # threads, not processes, for the per-label fits: sag releases the GIL, and warnings raised
    # in threads reach this process's warning filters
    with warnings.catch_warnings(record=True) as caught, parallel_backend("threading"):
        warnings.simplefilter("always", ConvergenceWarning)
        warnings.filterwarnings("ignore", message="Label .*present in all training examples")
        model.fit(x, y)
    not_converged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    if not_converged:
        fits = y.shape[1] if getattr(model, "multilabel", False) else 1
        warn(f"the solver did not converge within --max-iter {getattr(model, 'max_iter', '?')} "
             f"iterations in {not_converged} of {fits} fit(s); the probe is still usable "
             "(the published protocol stops there too); --scale often helps")
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
