"""Probes on frozen embeddings: logistic regression (published protocol) and kNN (Landsat-Bench).

- ``logistic_regression.LogisticRegressionModel`` and ``knn.KNNModel``: fit / predict /
  predict_proba / evaluate(x, y, class_names) -> (metrics, y_pred).
- ``metrics``: the metric names and how each is computed.
- ``embeddings``: loading and validating embedding .npz files, label-fraction subsets.
- ``probes``: building a probe by name and the shared command-line options.
"""

from classification_models.knn import KNNModel
from classification_models.logistic_regression import LogisticRegressionModel

__all__ = ["KNNModel", "LogisticRegressionModel"]
