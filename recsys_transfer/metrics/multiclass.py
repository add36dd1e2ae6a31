"""Multiclass metrics on integer class ids; each returns a ``float``, or ``None`` on empty input (JSON ``null``).

* ``accuracy``: mean_i [label_i == pred_i]   (scikit-learn ``accuracy_score``)
* ``macro_f1``: unweighted mean over classes c of F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c), scikit-learn
  ``f1_score(average="macro", zero_division=0)``. Classes averaged:

  - ``num_classes=None``: the classes present in ``labels`` or ``pred_class`` (their sorted union, scikit-learn's
    default); a class never seen in either does not count.
  - ``num_classes=K``: exactly ``range(K)``. A class absent from both labels and predictions has 0/0 and
    contributes F1 = 0 (``zero_division=0``), which lowers the mean; predictions outside ``range(K)`` still count
    as false negatives of the true class but their own column is not averaged.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score


def _pair(labels, pred_class) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).ravel().astype(np.int64)
    p = np.asarray(pred_class).ravel().astype(np.int64)
    if y.shape != p.shape:
        raise ValueError(f"labels have {y.size} rows, predictions {p.size}")
    return y, p


def accuracy(labels, pred_class) -> float | None:
    """Fraction of rows whose predicted class id equals the label. None when empty."""
    y, p = _pair(labels, pred_class)
    return float(np.mean(y == p)) if y.size else None


def macro_f1(labels, pred_class, num_classes: int | None = None) -> float | None:
    """Macro-averaged F1 (zero_division=0) over present classes, or over range(num_classes). None when empty."""
    y, p = _pair(labels, pred_class)
    if y.size == 0 or num_classes == 0:
        return None
    classes = None if num_classes is None else np.arange(num_classes)
    return float(f1_score(y, p, labels=classes, average="macro", zero_division=0))
