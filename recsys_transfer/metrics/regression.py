"""Regression metrics on float64 values; each returns a ``float``, or ``None`` on empty input (JSON ``null``).

* ``mse``:  mean_i (y_i - pred_i)^2       (scikit-learn ``mean_squared_error``)
* ``mae``:  mean_i |y_i - pred_i|         (scikit-learn ``mean_absolute_error``)
* ``rmse``: sqrt(mse)                     (scikit-learn ``root_mean_squared_error``)

Computed directly in numpy (same formulas as scikit-learn, unweighted). Non-finite inputs raise ``ValueError``.
"""

from __future__ import annotations

import math

import numpy as np


def _errors(y, pred) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64).ravel()
    pred = np.asarray(pred, dtype=np.float64).ravel()
    if y.shape != pred.shape:
        raise ValueError(f"y has {y.size} rows, pred {pred.size}")
    if not (np.isfinite(y).all() and np.isfinite(pred).all()):
        raise ValueError("y/pred contain NaN or inf")
    return y - pred


def mse(y, pred) -> float | None:
    """Mean squared error. None when empty."""
    e = _errors(y, pred)
    return float(np.mean(e * e)) if e.size else None


def mae(y, pred) -> float | None:
    """Mean absolute error. None when empty."""
    e = _errors(y, pred)
    return float(np.mean(np.abs(e))) if e.size else None


def rmse(y, pred) -> float | None:
    """Root mean squared error, sqrt(mse). None when empty."""
    m = mse(y, pred)
    return None if m is None else math.sqrt(m)
