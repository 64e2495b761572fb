"""Linear probe on frozen embeddings, as published: sklearn ``LogisticRegression`` with solver
``sag``, ``max_iter=1000``, ``random_state=seed`` (L2 penalty, C=1), one-vs-rest for multilabel,
optional ``StandardScaler``.

``n_jobs`` (scikit-learn 1.9): ``LogisticRegression`` ignores ``n_jobs`` (deprecated since 1.8,
no effect), so it is not passed there; it parallelises the per-label fits of
``OneVsRestClassifier`` (multilabel) and has no effect on a multiclass fit, which sag solves as
one multinomial problem on a single core.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler

from classification_models.base import Probe


class LogisticRegressionModel(Probe):
    """Logistic-regression probe with the published constructor and defaults.

    Multiclass: y is (N,) class indices; ``predict_proba`` gives (N, K) softmax probabilities
    over ``classes_`` (the K classes seen in training), ``predict`` the most probable class.
    Multilabel: y is (N, C) 0/1; ``predict_proba`` gives (N, C) per-label probabilities and
    ``predict`` thresholds them at > 0.5 (the same as a positive decision function).
    """

    def __init__(self, scale=False, max_iter=1000, seed=0, multilabel=False, n_jobs=None,
                 verbose=False):
        self.scale = scale
        self.max_iter = max_iter
        self.seed = seed
        self.multilabel = multilabel
        self.n_jobs = n_jobs
        self.verbose = verbose
        self.scaler: Optional[StandardScaler] = None
        self.model = None

    def fit(self, x_train: np.ndarray, y_train: np.ndarray) -> "LogisticRegressionModel":
        """x_train: (N, D) features; y_train: (N,) class indices or (N, C) 0/1."""
        if self.scale:
            self.scaler = StandardScaler()
            x_train = self.scaler.fit_transform(x_train)
        base_model = LogisticRegression(solver="sag", max_iter=self.max_iter,
                                        random_state=self.seed, verbose=int(bool(self.verbose)))
        if self.multilabel:
            self.model = OneVsRestClassifier(base_model, n_jobs=self.n_jobs)
        else:
            self.model = base_model
        self.model.fit(x_train, y_train)
        return self

    @property
    def classes_(self) -> np.ndarray:
        return self.model.classes_

    def _transform(self, x: np.ndarray) -> np.ndarray:
        return self.scaler.transform(x) if self.scaler is not None else x

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, K) class probabilities (multiclass) or (N, C) label probabilities."""
        return self.model.predict_proba(self._transform(x))
