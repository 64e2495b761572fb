"""Linear probe on frozen embeddings: the published model (L2-regularised logistic regression,
C=1, one-vs-rest for multilabel, optional ``StandardScaler``) with a fast exact solver.

Solvers (``solver=``):

- ``"lbfgs"`` (default): :mod:`classification_models.solver`, full-batch L-BFGS on all classes
  at once in torch, over row blocks (the features can be a
  :class:`~classification_models.rows.RowSource` streamed from disk), to a relative
  gradient-norm tolerance ``tol``. Objective: exactly scikit-learn's, one-vs-rest per label
  (multilabel), one binary problem (two classes), multinomial (three or more classes, as
  scikit-learn 1.9's ``LogisticRegression`` fits them). With fewer rows than features
  (``row_space=True``, the default) the same problem is solved exactly on N features per row,
  the rows of the Cholesky factor of their Gram matrix (:mod:`classification_models.row_space`;
  e.g. a 2,000-row all-token file: 2,000 instead of 15,120 columns). ``fit_report`` holds
  iterations, data passes, the final objective and gradient norm per class (of the problem
  itself, also when it was solved on the row space) and ``row_space`` (None: not used).
- ``"sag"``: the published solver, scikit-learn ``LogisticRegression(solver="sag",
  max_iter=max_iter, random_state=seed)``, for exact reproduction of old runs. scikit-learn 1.9
  ignores ``LogisticRegression(n_jobs=...)`` (deprecated), so ``n_jobs`` only parallelises the
  per-label fits of ``OneVsRestClassifier``.

Either way ``model`` is a fitted scikit-learn estimator, ``OneVsRestClassifier`` of
``LogisticRegression`` (multilabel; a constant label column gets scikit-learn's constant
predictor) or ``LogisticRegression`` (multiclass), and ``scaler`` a fitted ``StandardScaler`` or
None: the saved ``.joblib`` loads and predicts in the published code and notebooks.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier, _ConstantPredictor
from sklearn.preprocessing import LabelBinarizer, StandardScaler

from classification_models.base import Probe
from classification_models.row_space import row_space_reduction
from classification_models.rows import ArrayRows, RowSource
from classification_models.solver import (DEFAULT_TOL, PRECOND_RANK, LogisticProblem, fit_lbfgs,
                                          nystrom_preconditioner, torch_threads)

SOLVERS = ("lbfgs", "sag")


def as_rows(x) -> RowSource:
    return x if isinstance(x, RowSource) else ArrayRows(np.asarray(x))


def safe_scale(var: np.ndarray) -> np.ndarray:
    """Standard deviations with zero (constant columns) replaced by 1, as StandardScaler does."""
    std = np.sqrt(var)
    return np.where(std > 10 * np.finfo(np.float64).eps * max(1.0, float(std.max(initial=0))),
                    std, 1.0)


class LogisticRegressionModel(Probe):
    """Logistic-regression probe with the published constructor, defaults and ``evaluate``.

    Multiclass: y is (N,) class indices; ``predict_proba`` gives (N, K) probabilities over
    ``classes_``, ``predict`` the most probable class. Multilabel: y is (N, C) 0/1;
    ``predict_proba`` gives (N, C) per-label probabilities, ``predict`` thresholds them at > 0.5.
    ``x`` may be an (N, D) array (float16 is kept) or a RowSource.
    """

    def __init__(self, scale=False, max_iter=1000, seed=0, multilabel=False, n_jobs=None,
                 verbose=False, solver="lbfgs", C=1.0, tol=DEFAULT_TOL, device="cpu",
                 block_rows=None, precond_rank=PRECOND_RANK, row_space=True):
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose from {SOLVERS}")
        self.scale = scale
        self.max_iter = max_iter
        self.seed = seed
        self.multilabel = multilabel
        self.n_jobs = n_jobs
        self.verbose = verbose
        self.solver = solver
        self.C = C
        self.tol = tol
        self.device = device
        self.block_rows = block_rows
        self.precond_rank = precond_rank
        self.row_space = row_space
        self.scaler: Optional[StandardScaler] = None
        self.model = None
        self.fit_report: Optional[dict] = None

    # ------------------------------------------------------------------ fit

    def fit(self, x_train, y_train) -> "LogisticRegressionModel":
        """x_train: (N, D) features (array or RowSource); y_train: (N,) class indices or (N, C) 0/1."""
        y_train = np.asarray(y_train)
        if self.solver == "sag":
            return self._fit_sag(as_rows(x_train).to_array(), y_train)
        source = as_rows(x_train)
        stats = source.stats()
        if self.scale:
            std = safe_scale(stats.var)
            self.scaler = _fitted_scaler(stats, std)
            feature_mean, feature_scale = stats.mean, std
        else:
            self.scaler = feature_mean = feature_scale = None
        if self.multilabel:
            y_train = y_train.astype(np.uint8)
            positives = y_train.sum(axis=0)
            fitted = np.flatnonzero((positives > 0) & (positives < len(y_train)))
            targets, n_outputs, multinomial = y_train[:, fitted], len(fitted), False
        else:
            classes, y_index = np.unique(y_train, return_inverse=True)
            multinomial = len(classes) > 2
            targets = y_index if multinomial else (y_index == 1)[:, None]
            n_outputs = len(classes) if multinomial else 1
        problem = LogisticProblem(source, targets, n_outputs, multinomial, C=self.C,
                                  feature_mean=feature_mean, feature_scale=feature_scale,
                                  device=self.device, block_rows=self.block_rows)
        coef = self._solve(problem)
        dim = source.shape[1]
        if self.multilabel:
            self.model = _one_vs_rest(self._base_estimator(), y_train, fitted, coef, dim,
                                      self.fit_report["iterations"])
        else:
            self.model = _fitted_logistic(self._base_estimator(), classes, coef,
                                          self.fit_report["iterations"])
        return self

    def _solve(self, problem: LogisticProblem) -> np.ndarray:
        """Coefficients ((D+1, K) on the model's features, intercepts in the last row) at the
        optimum of ``problem`` (which has no change of variables yet); sets ``fit_report``.

        With fewer rows than features the problem is solved on its row-space reduction
        (classification_models/row_space.py) and the report's objective and gradient norms are
        those of ``problem`` itself, at the mapped-back coefficients."""
        with torch_threads(self.n_jobs):
            reduction = row_space_reduction(
                problem.source, problem.source.stats().mean, problem.settings["feature_mean"],
                problem.settings["feature_scale"], device=self.device,
                block_rows=self.block_rows) if self.row_space else None
            solved = problem if reduction is None else problem.replace(
                source=ArrayRows(reduction.features), feature_mean=None, feature_scale=None)
            solved = solved.replace(**self._preconditioner(solved))
            coef, report = fit_lbfgs(solved, tol=self.tol, max_iter=self.max_iter,
                                     verbose=bool(self.verbose))
            if reduction is not None:
                coef = reduction.coefficients(coef)
                report.restate(problem, coef)
        self.fit_report = report.as_dict()
        self.fit_report["row_space"] = None if reduction is None else reduction.as_dict()
        for status in report.status:
            if status != "converged":
                warnings.warn(f"lbfgs stopped ({status}) before the gradient tolerance "
                              f"{self.tol}", ConvergenceWarning)
        return coef

    def _preconditioner(self, problem: LogisticProblem) -> dict:
        """The solver's change of variables for ``problem``: column standardisation (unless the
        model's own ``--scale`` did it) and the spectral preconditioner."""
        stats = problem.source.stats()
        std = safe_scale(stats.var)
        scaled = problem.settings["feature_scale"] is not None
        # the penalty's mean curvature in the solver's coordinates (u = w * precond_std)
        penalty = 1.0 if scaled else float(np.mean(1.0 / std ** 2))
        spectral = nystrom_preconditioner(
            problem.source, stats.mean, std, self.precond_rank,
            4 * penalty / (self.C * len(problem.source)), self.seed, self.device, self.block_rows)
        return dict(precond_mean=None if scaled else stats.mean,
                    precond_std=None if scaled else std, spectral=spectral)

    def _base_estimator(self) -> LogisticRegression:
        return LogisticRegression(C=self.C, tol=self.tol, max_iter=self.max_iter,
                                  random_state=self.seed)

    def _fit_sag(self, x_train: np.ndarray, y_train: np.ndarray) -> "LogisticRegressionModel":
        if self.scale:
            self.scaler = StandardScaler()
            x_train = self.scaler.fit_transform(x_train)
        base_model = LogisticRegression(solver="sag", C=self.C, max_iter=self.max_iter,
                                        random_state=self.seed, verbose=int(bool(self.verbose)))
        if self.multilabel:
            self.model = OneVsRestClassifier(base_model, n_jobs=self.n_jobs)
        else:
            self.model = base_model
        self.model.fit(x_train, y_train)
        self.fit_report = {"solver": "sag"}
        return self

    # -------------------------------------------------------------- predict

    @property
    def classes_(self) -> np.ndarray:
        return self.model.classes_

    def _transform(self, x: np.ndarray) -> np.ndarray:
        return self.scaler.transform(x) if self.scaler is not None else x

    def predict_proba(self, x) -> np.ndarray:
        """(N, D) -> (N, K) class probabilities (multiclass) or (N, C) label probabilities;
        a RowSource is scored block by block."""
        if not isinstance(x, RowSource):
            return self.model.predict_proba(self._transform(x))
        return np.concatenate([self.model.predict_proba(self._transform(block))
                               for _, block in x.raw_blocks()])

    def evaluate(self, x_test, y_test, class_names: Optional[Sequence[str]] = None):
        """(metrics, y_pred), as published: ``model.evaluate(x_test, y_test)``. The metrics hold
        the published names (``overall_accuracy``, ``overall_map``, ...) and the project's
        (classification_models/metrics.py)."""
        return super().evaluate(x_test, y_test, class_names)


def _fitted_scaler(stats, std: np.ndarray) -> StandardScaler:
    scaler = StandardScaler()
    scaler.mean_, scaler.var_, scaler.scale_ = stats.mean, stats.var, std
    scaler.n_samples_seen_ = np.int64(stats.n_rows)
    scaler.n_features_in_ = len(stats.mean)
    return scaler


def _fitted_logistic(template: LogisticRegression, classes: np.ndarray, coef: np.ndarray,
                     iterations: int) -> LogisticRegression:
    """A LogisticRegression carrying ``coef`` ((D+1, k), intercepts in the last row)."""
    model = LogisticRegression(**template.get_params())
    model.coef_ = np.ascontiguousarray(coef[:-1].T)
    model.intercept_ = coef[-1].copy()
    model.classes_ = classes
    model.n_features_in_ = coef.shape[0] - 1
    model.n_iter_ = np.array([iterations], dtype=np.int32)
    return model


def _one_vs_rest(template: LogisticRegression, y_train: np.ndarray, fitted: np.ndarray,
                 coef: np.ndarray, dim: int, iterations: int) -> OneVsRestClassifier:
    """A fitted OneVsRestClassifier: the solver's column j for label fitted[j], scikit-learn's
    constant predictor for a label that is constant in training."""
    model = OneVsRestClassifier(template)
    model.label_binarizer_ = LabelBinarizer(sparse_output=True).fit(y_train)
    model.classes_ = model.label_binarizer_.classes_
    column_of = {int(label): j for j, label in enumerate(fitted)}
    binary = np.array([0, 1])
    estimators = []
    for label in range(y_train.shape[1]):
        if label in column_of:
            j = column_of[label]
            estimators.append(_fitted_logistic(template, binary, coef[:, j:j + 1], iterations))
        else:
            estimators.append(_ConstantPredictor().fit(np.zeros((1, dim)), y_train[:1, label]))
    model.estimators_ = estimators
    model.n_features_in_ = dim
    return model
