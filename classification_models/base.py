"""What every probe shares: scores -> labels, predict and evaluate.

A probe subclass sets ``multilabel`` and ``classes_`` (multiclass: the training classes, in the
order of the score columns) and implements ``fit`` and ``predict_proba``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from classification_models.metrics import probe_metrics


class Probe:
    multilabel: bool
    classes_: np.ndarray

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def labels_from_scores(self, scores: np.ndarray) -> np.ndarray:
        """predict_proba output -> (N,) class indices or (N, C) 0/1 predictions (score > 0.5)."""
        if self.multilabel:
            return (scores > 0.5).astype(np.uint8)
        return self.classes_[np.argmax(scores, axis=1)]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) class indices (multiclass) or (N, C) 0/1 (multilabel)."""
        return self.labels_from_scores(self.predict_proba(x))

    def evaluate(self, x: np.ndarray, y: np.ndarray,
                 class_names: Optional[Sequence[str]] = None) -> tuple[dict, np.ndarray]:
        """(metrics, y_pred); metric names are documented in classification_models.metrics."""
        scores = self.predict_proba(x)
        y_pred = self.labels_from_scores(scores)
        return probe_metrics(y, y_pred, scores, self.multilabel, class_names), y_pred
