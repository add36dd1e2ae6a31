"""Evaluation metrics (AUC and log loss via scikit-learn, on exact float64 scores)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; ties in scores count half (scikit-learn's convention). NaN when only one class is present."""
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(log_loss(np.asarray(labels), np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7), labels=[0, 1]))
