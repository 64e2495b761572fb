"""k-nearest-neighbour probe on frozen embeddings, as in Landsat-Bench (k = 5).

Distance: cosine. Features are L2-normalised (after the optional StandardScaler) and searched
by brute-force Euclidean distance, which on unit vectors ranks neighbours exactly as cosine
distance does (|a - b|^2 = 2 - 2 cos(a, b)) and uses fast matrix products. Cosine suits frozen
transformer embeddings, whose norms vary between samples without carrying the class.

Weighting: none, each of the k neighbours has one vote.
- Multiclass: the score of a class is the fraction of the k neighbours in it; the prediction is
  the majority class (ties go to the lowest class index, as in sklearn).
- Multilabel: the score of a label is the fraction of the k neighbours carrying it; a label is
  predicted when that fraction is > 0.5 (a strict majority of the neighbours).

The fitted model keeps the (normalised, float32) training features: its joblib file is about the
size of the training embeddings.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler, normalize

from classification_models.base import Probe
from utils.errors import UserInputError


class KNNModel(Probe):
    """kNN probe with the interface of LogisticRegressionModel (fit/predict/predict_proba/evaluate)."""

    def __init__(self, k=5, scale=False, multilabel=False, n_jobs=None):
        self.k = k
        self.scale = scale
        self.multilabel = multilabel
        self.n_jobs = n_jobs
        self.scaler: Optional[StandardScaler] = None
        self.index: Optional[NearestNeighbors] = None
        self.y_train: Optional[np.ndarray] = None
        self.classes_: Optional[np.ndarray] = None

    def _embed(self, x: np.ndarray) -> np.ndarray:
        if self.scaler is not None:
            x = self.scaler.transform(x)
        return normalize(np.asarray(x, dtype=np.float32))

    def fit(self, x_train: np.ndarray, y_train: np.ndarray) -> "KNNModel":
        """x_train: (N, D) features; y_train: (N,) class indices or (N, C) 0/1."""
        if self.k > len(x_train):
            raise UserInputError(f"kNN: k={self.k} exceeds the {len(x_train)} training rows")
        if self.scale:
            self.scaler = StandardScaler().fit(x_train)
        self.index = NearestNeighbors(n_neighbors=self.k, algorithm="brute", metric="euclidean",
                                      n_jobs=self.n_jobs).fit(self._embed(x_train))
        if self.multilabel:
            self.y_train = np.asarray(y_train, dtype=np.uint8)
        else:
            self.classes_, self.y_train = np.unique(y_train, return_inverse=True)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, K) neighbour vote fractions per class in ``classes_`` (multiclass) or
        (N, C) fraction of neighbours carrying each label (multilabel)."""
        neighbours = self.index.kneighbors(self._embed(x), return_distance=False)  # (N, k)
        neighbour_labels = self.y_train[neighbours]  # (N, k) or (N, k, C)
        if self.multilabel:
            return neighbour_labels.mean(axis=1, dtype=np.float32)
        n_classes = len(self.classes_)
        votes = np.zeros((len(x), n_classes), dtype=np.float32)
        np.add.at(votes, (np.arange(len(x))[:, None], neighbour_labels), 1.0)
        return votes / self.k
