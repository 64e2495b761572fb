"""k-nearest-neighbour probe on frozen embeddings, as Landsat-Bench runs it by default: k = 5,
Euclidean distance, brute force, on the features as they are (no scaling unless ``scale``).

Search: exact, in blocks. For a block of queries and a block of training rows, squared distances
come from one matrix product, ``|q|^2 - 2 q.t + |t|^2`` (float32); the best ``k + 8`` candidates
of every query over all training blocks are kept and then re-ranked by their exact distances
(float64, from the differences), so that float32 rounding cannot reorder the k-th and
(k+1)-th neighbours. Ties in distance go to the lower training index, as in scikit-learn's
brute-force search. ``metric="cosine"``: the rows are L2-normalised first (Euclidean distance
on unit vectors ranks as cosine distance does).

Weighting: none, each of the k neighbours has one vote.
- Multiclass: the score of a class is the fraction of the k neighbours in it; the prediction is
  the majority class (ties go to the lowest class index, as in scikit-learn).
- Multilabel: the score of a label is the fraction of the k neighbours carrying it; a label is
  predicted when that fraction is > 0.5 (a strict majority of the neighbours).

The fitted model keeps the training features in memory, in their stored dtype (float16 stays
float16): its joblib file is about the size of the training embeddings.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from sklearn.preprocessing import StandardScaler

from classification_models.base import Probe
from classification_models.rows import RowSource
from classification_models.solver import torch_threads
from utils.errors import UserInputError

KNN_METRICS = ("euclidean", "cosine")
QUERY_BLOCK = 1024
TRAIN_BLOCK = 8192
RERANK_EXTRA = 8


class KNNModel(Probe):
    """kNN probe with the interface of LogisticRegressionModel (fit/predict/predict_proba/evaluate)."""

    def __init__(self, k=5, scale=False, multilabel=False, n_jobs=None, metric="euclidean"):
        if metric not in KNN_METRICS:
            raise ValueError(f"unknown kNN metric {metric!r}; choose from {KNN_METRICS}")
        self.k = k
        self.scale = scale
        self.multilabel = multilabel
        self.n_jobs = n_jobs
        self.metric = metric
        self.scaler: Optional[StandardScaler] = None
        self.x_train: Optional[np.ndarray] = None
        self.y_train: Optional[np.ndarray] = None
        self.classes_: Optional[np.ndarray] = None

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) float rows -> the rows the distances are taken on (float64 for re-ranking)."""
        if self.scaler is not None:
            x = (x - torch.as_tensor(self.scaler.mean_, dtype=x.dtype)) / torch.as_tensor(
                self.scaler.scale_, dtype=x.dtype)
        if self.metric == "cosine":
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return x

    def fit(self, x_train, y_train) -> "KNNModel":
        """x_train: (N, D) features (array or RowSource); y_train: (N,) class indices or (N, C) 0/1."""
        x_train = x_train.to_array() if isinstance(x_train, RowSource) else np.asarray(x_train)
        if self.k > len(x_train):
            raise UserInputError(f"kNN: k={self.k} exceeds the {len(x_train)} training rows")
        self.scaler = StandardScaler().fit(x_train) if self.scale else None
        self.x_train = x_train
        if self.multilabel:
            self.y_train = np.asarray(y_train, dtype=np.uint8)
        else:
            self.classes_, self.y_train = np.unique(y_train, return_inverse=True)
        return self

    def kneighbors(self, x) -> np.ndarray:
        """(N, D) queries (array or RowSource) -> (N, k) training indices, nearest first."""
        with torch_threads(self.n_jobs):
            blocks = (x.raw_blocks(QUERY_BLOCK) if isinstance(x, RowSource)
                      else ((s, x[s:s + QUERY_BLOCK]) for s in range(0, len(x), QUERY_BLOCK)))
            return np.concatenate([self._search(np.asarray(block)) for _, block in blocks])

    def _search(self, queries: np.ndarray) -> np.ndarray:
        q = self._prepare(torch.from_numpy(np.ascontiguousarray(queries)).double())
        q32 = q.float()
        n_candidates = min(self.k + RERANK_EXTRA, len(self.x_train))
        best_d = torch.full((len(q), 0), float("inf"))
        best_i = torch.zeros((len(q), 0), dtype=torch.int64)
        for start in range(0, len(self.x_train), TRAIN_BLOCK):
            t = self._prepare(torch.from_numpy(self.x_train[start:start + TRAIN_BLOCK]).double())
            t32 = t.float()
            d = (q32 * q32).sum(1, keepdim=True) - 2 * q32 @ t32.T + (t32 * t32).sum(1)[None]
            index = torch.arange(start, start + len(t))[None].expand(len(q), -1)
            best_d = torch.cat([best_d, d], dim=1)
            best_i = torch.cat([best_i, index], dim=1)
            keep = torch.topk(best_d, min(n_candidates, best_d.shape[1]), dim=1, largest=False).indices
            best_d, best_i = best_d.gather(1, keep), best_i.gather(1, keep)
        # exact re-ranking of the candidates: float64 distances, ties to the lower index
        exact = np.empty(best_i.shape)
        for j in range(best_i.shape[1]):
            candidates = self._prepare(torch.from_numpy(self.x_train[best_i[:, j].numpy()]).double())
            exact[:, j] = ((candidates - q) ** 2).sum(1).numpy()
        order = np.lexsort((best_i.numpy(), exact), axis=1)[:, :self.k]
        return np.take_along_axis(best_i.numpy(), order, axis=1)

    def predict_proba(self, x) -> np.ndarray:
        """(N, D) -> (N, K) neighbour vote fractions per class in ``classes_`` (multiclass) or
        (N, C) fraction of neighbours carrying each label (multilabel)."""
        neighbours = self.kneighbors(x)  # (N, k)
        neighbour_labels = self.y_train[neighbours]  # (N, k) or (N, k, C)
        if self.multilabel:
            return neighbour_labels.mean(axis=1, dtype=np.float32)
        votes = np.zeros((len(neighbours), len(self.classes_)), dtype=np.float32)
        np.add.at(votes, (np.arange(len(neighbours))[:, None], neighbour_labels), 1.0)
        return votes / self.k
