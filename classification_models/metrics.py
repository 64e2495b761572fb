"""Probe metrics, computed with sklearn's metric functions (``zero_division=0`` throughout).

Multiclass (``multiclass_metrics``), from (N,) true and predicted class indices:
    overall_accuracy                accuracy_score
    precision_macro, precision_micro, recall_macro, recall_micro, f1_macro, f1_micro
                                    precision/recall/f1_score with average="macro" / "micro"
                                    (macro over the classes present in y_true or y_pred)
    per_class                       {class name: {precision, recall, f1, support}}
    n_samples

Multilabel (``multilabel_metrics``), from (N, C) 0/1 truth, (N, C) 0/1 predictions and (N, C)
scores (predict_proba):
    map_micro, map_macro            average_precision_score(y_true, scores, average=...);
                                    as in sklearn, a label with no positive in y_true has AP 0
                                    and still counts in map_macro (its per-class support is 0)
    f1_micro, f1_macro              f1_score on the 0/1 predictions
    subset_accuracy                 accuracy_score on the 0/1 rows (exact match of all labels)
    per_class                       {class name: {average_precision, precision, recall, f1, support}}
    n_samples

Class names come from the embedding settings when known, else the class index as a string.

Both also hold the published ``LogisticRegressionModel.evaluate`` names (the same numbers), so
the published notebooks read them (``PUBLISHED_NAMES``):
    overall_accuracy (subset accuracy for multilabel)
    overall_precision = precision_micro     average_precision = precision_macro (macro
    overall_recall = recall_micro           *precision*, not AP)
    overall_f1 = f1_micro                   average_recall = recall_macro
    overall_map = map_micro (multilabel)    average_f1 = f1_macro
                                            average_map = map_macro (multilabel)
The published script's JSON held, for the validation split, f1_micro, f1_macro, accuracy
(multiclass) and a classification report (``published_split_metrics``).
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
from sklearn.metrics import (accuracy_score, average_precision_score, classification_report,
                             f1_score, precision_recall_fscore_support, precision_score,
                             recall_score)

HEADLINE_METRIC = {"multiclass": "overall_accuracy", "multilabel": "map_micro"}
PUBLISHED_NAMES = {"overall_precision": "precision_micro", "average_precision": "precision_macro",
                   "overall_recall": "recall_micro", "average_recall": "recall_macro",
                   "overall_f1": "f1_micro", "average_f1": "f1_macro",
                   "overall_map": "map_micro", "average_map": "map_macro"}


def class_name(index: int, class_names: Optional[Sequence[str]]) -> str:
    if class_names is not None and 0 <= index < len(class_names):
        return str(class_names[index])
    return str(index)


def multiclass_metrics(y_true: np.ndarray, y_pred: np.ndarray,
                       class_names: Optional[Sequence[str]] = None) -> dict:
    """y_true, y_pred: (N,) class indices."""
    metrics = {"overall_accuracy": float(accuracy_score(y_true, y_pred))}
    for average in ("macro", "micro"):
        metrics[f"precision_{average}"] = float(
            precision_score(y_true, y_pred, average=average, zero_division=0))
        metrics[f"recall_{average}"] = float(
            recall_score(y_true, y_pred, average=average, zero_division=0))
        metrics[f"f1_{average}"] = float(f1_score(y_true, y_pred, average=average, zero_division=0))
    labels = np.union1d(y_true, y_pred)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0)
    metrics["per_class"] = {
        class_name(int(label), class_names): {
            "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for label, p, r, f, s in zip(labels, precision, recall, f1, support)
    }
    metrics["n_samples"] = int(len(y_true))
    return metrics


def multilabel_metrics(y_true: np.ndarray, y_pred: np.ndarray, y_score: np.ndarray,
                       class_names: Optional[Sequence[str]] = None) -> dict:
    """y_true, y_pred: (N, C) 0/1; y_score: (N, C) scores in [0, 1]."""
    with warnings.catch_warnings():
        # a label absent from y_true: sklearn warns and uses AP 0, which per_class support shows
        warnings.filterwarnings("ignore", message="No positive class found in y_true")
        metrics = {
            "map_micro": float(average_precision_score(y_true, y_score, average="micro")),
            "map_macro": float(average_precision_score(y_true, y_score, average="macro")),
        }
        per_class_ap = average_precision_score(y_true, y_score, average=None)
    for average in ("macro", "micro"):
        metrics[f"precision_{average}"] = float(
            precision_score(y_true, y_pred, average=average, zero_division=0))
        metrics[f"recall_{average}"] = float(
            recall_score(y_true, y_pred, average=average, zero_division=0))
    metrics["f1_micro"] = float(f1_score(y_true, y_pred, average="micro", zero_division=0))
    metrics["f1_macro"] = float(f1_score(y_true, y_pred, average="macro", zero_division=0))
    metrics["subset_accuracy"] = float(accuracy_score(y_true, y_pred))
    metrics["overall_accuracy"] = metrics["subset_accuracy"]
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, average=None, zero_division=0)
    metrics["per_class"] = {
        class_name(j, class_names): {
            "average_precision": float(per_class_ap[j]), "precision": float(precision[j]),
            "recall": float(recall[j]), "f1": float(f1[j]), "support": int(support[j])}
        for j in range(y_true.shape[1])
    }
    metrics["n_samples"] = int(len(y_true))
    return metrics


def probe_metrics(y_true: np.ndarray, y_pred: np.ndarray, y_score: np.ndarray, multilabel: bool,
                  class_names: Optional[Sequence[str]] = None) -> dict:
    metrics = (multilabel_metrics(y_true, y_pred, y_score, class_names) if multilabel
               else multiclass_metrics(y_true, y_pred, class_names))
    return with_published_names(metrics)


def with_published_names(metrics: dict) -> dict:
    """``metrics`` plus the published names of the same numbers (see the module docstring)."""
    published = {name: metrics[ours] for name, ours in PUBLISHED_NAMES.items() if ours in metrics}
    return {**metrics, **published}


def published_split_metrics(y_true: np.ndarray, y_pred: np.ndarray, multilabel: bool) -> dict:
    """The published script's record of a split: f1_micro, f1_macro, accuracy (multiclass) and
    sklearn's classification_report as a dict."""
    metrics = {"f1_micro": float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
               "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0))}
    if not multilabel:
        metrics["accuracy"] = float(accuracy_score(y_true, y_pred))
    metrics["report"] = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    return metrics


def scalar_metrics(metrics: dict) -> dict:
    """The single-number entries of a metrics dict (drops per_class and the published aliases),
    e.g. for a CSV row."""
    return {key: value for key, value in metrics.items()
            if not isinstance(value, dict) and key not in PUBLISHED_NAMES}
