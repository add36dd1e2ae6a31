"""Evaluation metrics per task kind, on exact float64 scores; each returns a float, or None when undefined (no rows,
one class, ...), so results go to strict JSON as null.

* :mod:`~recsys_transfer.metrics.classification` -- binary: AUC, log loss, normalized entropy and calibration
  (TorchRec's definitions), group AUC (FuxiCTR's gAUC);
* :mod:`~recsys_transfer.metrics.regression` -- MSE, MAE, RMSE;
* :mod:`~recsys_transfer.metrics.multiclass` -- accuracy, macro-F1;
* :mod:`~recsys_transfer.metrics.ranking` -- HR@k, MRR@k, NDCG@k from the positive item's rank (sampled negatives
  or full ranking);
* :mod:`~recsys_transfer.metrics.bootstrap` -- paired bootstrap CIs of AUC differences.
"""

from __future__ import annotations

from recsys_transfer.metrics.classification import auc, logloss

__all__ = ["auc", "logloss"]
