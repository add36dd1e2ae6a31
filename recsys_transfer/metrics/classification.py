"""Binary-classification metrics on exact float64 scores; each returns a ``float``, or ``None`` when undefined.

``None`` (never NaN, never an exception) is returned on empty or degenerate inputs, so results can go to strict
JSON as ``null``. Labels are 0/1 (int or float); scores/probabilities are cast to float64. Non-finite scores or
probabilities are invalid input and raise ``ValueError`` (as scikit-learn does), so a diverged model is not hidden.

* ``auc``: ROC AUC = P(score_pos > score_neg) + 0.5 * P(score_pos == score_neg), scikit-learn's ``roc_auc_score``.
  None when empty or a single label class.
* ``logloss``: -mean(y ln p + (1 - y) ln(1 - p)) with p clipped to [1e-7, 1 - 1e-7], scikit-learn's ``log_loss``
  with ``labels=[0, 1]`` (same as ``recsys_transfer.metrics.logloss``). None when empty.
* ``normalized_entropy``: TorchRec's NE, ``torchrec/metrics/ne.py`` (``compute_cross_entropy``,
  ``_compute_cross_entropy_norm``, ``compute_ne``; read in pytorch/torchrec at commit a48cef79, 2025-10-04, and in
  the installed torchrec 1.8.0, identical for these lines), with unit weights::

      p_i  = clamp(prob_i, eta, 1 - eta),  eta = 1e-12                       (NEMetricComputation.eta)
      CE   = sum_i -y_i log2(p_i) - (1 - y_i) log2(1 - p_i)
      P    = sum_i y_i,  N = sum_i (1 - y_i),  m = clamp(P / max(n, eta), eta, 1 - eta)
      NE   = CE / (-P log2(m) - N log2(1 - m))

  i.e. the log loss divided by the entropy of the base rate (the base of the log cancels). Departure: when P == 0
  or N == 0 (single class) TorchRec's clamp gives a huge finite number; here the result is None. Also None when
  empty. Note eta (1e-12) differs from ``logloss``'s 1e-7 clip, as in TorchRec.
* ``calibration``: TorchRec's calibration, ``torchrec/metrics/calibration.py`` (``get_calibration_states``,
  ``compute_calibration``, same commit), unit weights: sum_i prob_i / sum_i y_i. Departure: TorchRec returns 0.0
  when sum_i y_i <= 0; here None.
* ``group_auc``: FuxiCTR's gAUC, ``fuxictr/metrics.py`` (``gAUC`` + ``evaluate_metrics``; read in reczoo/FuxiCTR
  at commit 0245987f): groups with 0 < sum(y_g) < n_g (both classes present) count, each weighted by its number
  of rows n_g::

      gAUC = sum_g n_g * AUC_g / sum_g n_g     over qualifying groups g

  (the DIN paper's impression-weighted gAUC, one row = one impression; not weighted by clicks). Groups with one
  class are skipped (FuxiCTR returns (0, 0) for them). None when no group qualifies (FuxiCTR: 0/0 = NaN).
  Departure: FuxiCTR's ``roc_auc_score`` per group (in a process pool); here all groups at once from one
  lexicographic sort by (group, score) with mid-ranks for ties (Mann-Whitney U, equal to ``roc_auc_score`` with
  ties counting half, to ~1e-15). Measured: 1M rows in 100k groups take about 0.35 s (single thread, 2-core box).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

LOGLOSS_EPS = 1e-7
NE_ETA = 1e-12  # torchrec NEMetricComputation.eta


def _as_pair(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels have {y.size} rows, scores {s.size}")
    if not np.isfinite(s).all():
        raise ValueError("scores/probabilities contain NaN or inf")
    return y, s


def auc(labels, scores) -> float | None:
    """ROC AUC, ties count half (scikit-learn). None when empty or only one label class is present."""
    y, s = _as_pair(labels, scores)
    if y.size == 0 or y.min() == y.max():
        return None
    return float(roc_auc_score(y, s))


def logloss(labels, probs) -> float | None:
    """Mean natural-log binary cross-entropy, probs clipped to [1e-7, 1 - 1e-7]. None when empty."""
    y, p = _as_pair(labels, probs)
    if y.size == 0:
        return None
    return float(log_loss(y, np.clip(p, LOGLOSS_EPS, 1 - LOGLOSS_EPS), labels=[0, 1]))


def normalized_entropy(labels, probs) -> float | None:
    """TorchRec NE: sum of log2 cross-entropy / base-rate entropy (see module docstring). None if single class/empty."""
    y, p = _as_pair(labels, probs)
    pos, neg = y.sum(), (1.0 - y).sum()
    if y.size == 0 or pos <= 0 or neg <= 0:
        return None
    p = np.clip(p, NE_ETA, 1 - NE_ETA)
    ce = float(np.sum(-y * np.log2(p) - (1.0 - y) * np.log2(1.0 - p)))
    m = min(max(pos / max(float(y.size), NE_ETA), NE_ETA), 1 - NE_ETA)
    norm = -pos * np.log2(m) - neg * np.log2(1.0 - m)
    return float(ce / norm)


def calibration(labels, probs) -> float | None:
    """TorchRec calibration: sum(probs) / sum(labels). None when sum(labels) <= 0 (including empty)."""
    y, p = _as_pair(labels, probs)
    denom = y.sum()
    if denom <= 0:
        return None
    return float(p.sum() / denom)


def group_aucs(labels, scores, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group AUC for the groups that qualify for FuxiCTR's gAUC (0 < sum(y_g) < n_g).

    Returns ``(group_ids, aucs, sizes)``: the qualifying group ids (sorted), their AUC (ties count half) and their
    row counts n_g, all of equal length (0 when none qualifies).
    """
    y, s = _as_pair(labels, scores)
    g = np.asarray(groups).ravel()
    if g.shape != y.shape:
        raise ValueError(f"labels have {y.size} rows, groups {g.size}")
    if y.size == 0:
        return g[:0], np.zeros(0), np.zeros(0, dtype=np.int64)
    ids, code = np.unique(g, return_inverse=True)
    order = np.lexsort((s, code))
    cs, ss, ys = code[order], s[order], y[order]
    n = y.size
    pos = np.arange(n, dtype=np.float64)
    # Mid-rank (1-based, within the group) of each tie block of equal (group, score).
    tie_start = np.flatnonzero(np.r_[True, (cs[1:] != cs[:-1]) | (ss[1:] != ss[:-1])])
    tie_len = np.diff(np.r_[tie_start, n])
    grp_start = np.flatnonzero(np.r_[True, cs[1:] != cs[:-1]])
    first_row = np.repeat(grp_start, np.diff(np.r_[grp_start, n]))  # group's first sorted row, per row
    mid = pos[tie_start] + (tie_len - 1) / 2.0 - first_row[tie_start] + 1.0
    rank = np.repeat(mid, tie_len)
    size = np.bincount(cs, minlength=ids.size).astype(np.int64)
    npos = np.bincount(cs, weights=ys, minlength=ids.size)
    rank_sum = np.bincount(cs, weights=ys * rank, minlength=ids.size)
    ok = (npos > 0) & (npos < size)
    npos, nneg = npos[ok], size[ok] - npos[ok]
    aucs = (rank_sum[ok] - npos * (npos + 1) / 2.0) / (npos * nneg)
    return ids[ok], aucs, size[ok]


def group_auc(labels, scores, groups) -> float | None:
    """FuxiCTR gAUC: sum_g n_g AUC_g / sum_g n_g over groups with both classes. None when no group qualifies."""
    _, aucs, sizes = group_aucs(labels, scores, groups)
    if sizes.size == 0:
        return None
    return float(np.sum(aucs * sizes) / np.sum(sizes))
