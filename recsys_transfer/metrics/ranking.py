"""Retrieval metrics for next-item recommendation with one relevant (positive) item per row.

Ranks are 1-based and ties are counted PESSIMISTICALLY: every competing item whose score is >= the positive's
ranks above it::

    rank_i = 1 + #{j competing : score_ij >= pos_score_i}

Why: with optimistic (or first-index) tie breaking a degenerate model that gives every item the same score (e.g.
collapsed or zero embeddings, an untrained tower) would put the positive at rank 1 and get perfect HR/MRR/NDCG.
Pessimistic ties give it the worst rank, so a metric can only be earned by scoring the positive strictly higher.
NaN scores are treated the same way (``~(neg < pos)`` is true whenever either side is NaN), so they never help.

* ``positive_ranks(pos_scores [n], neg_scores [n, N])``: competitors are the N sampled negatives of the row.
* ``full_ranking_ranks(scores [n, I], positive [n], exclude [n, I] bool | None)``: competitors are all items except
  the positive and the excluded ones (e.g. the user's history); the positive itself is never excluded.
  With the negatives of a row being all other items, both give the same ranks.

Per-row metrics at cutoff k, averaged over rows (``None`` when there are no rows, for strict JSON ``null``):

* ``hit_rate``: [rank <= k]
* ``mrr``:      1 / rank if rank <= k else 0              (MRR@k)
* ``ndcg``:     1 / log2(rank + 1) if rank <= k else 0    (NDCG@k with one relevant item, ideal DCG = 1)
"""

from __future__ import annotations

import numpy as np


def positive_ranks(pos_scores, neg_scores) -> np.ndarray:
    """int64 [n]: 1 + number of sampled negatives scoring >= the positive (pessimistic ties)."""
    pos = np.asarray(pos_scores, dtype=np.float64).ravel()
    neg = np.asarray(neg_scores, dtype=np.float64)
    if neg.ndim != 2 or neg.shape[0] != pos.size:
        raise ValueError(f"neg_scores must be [n={pos.size}, N], got {neg.shape}")
    return 1 + np.sum(~(neg < pos[:, None]), axis=1, dtype=np.int64)


def full_ranking_ranks(scores, positive, exclude=None) -> np.ndarray:
    """int64 [n]: 1 + number of non-excluded other items scoring >= the positive item (pessimistic ties)."""
    s = np.asarray(scores, dtype=np.float64)
    item = np.asarray(positive).ravel().astype(np.int64)
    if s.ndim != 2 or s.shape[0] != item.size:
        raise ValueError(f"scores must be [n={item.size}, num_items], got {s.shape}")
    if item.size and (item.min() < 0 or item.max() >= s.shape[1]):
        raise ValueError("positive item index out of range")
    rows = np.arange(item.size)
    beats = ~(s < s[rows, item][:, None])
    if exclude is not None:
        ex = np.asarray(exclude, dtype=bool)
        if ex.shape != s.shape:
            raise ValueError(f"exclude must have shape {s.shape}, got {ex.shape}")
        beats &= ~ex
    beats[rows, item] = False  # the positive never competes with itself (and is never excluded)
    return 1 + np.sum(beats, axis=1, dtype=np.int64)


def _ranks(ranks, k: int) -> np.ndarray:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return np.asarray(ranks, dtype=np.float64).ravel()


def hit_rate(ranks, k: int) -> float | None:
    """HR@k: fraction of rows with rank <= k. None when empty."""
    r = _ranks(ranks, k)
    return float(np.mean(r <= k)) if r.size else None


def mrr(ranks, k: int) -> float | None:
    """MRR@k: mean of 1/rank where rank <= k, else 0. None when empty."""
    r = _ranks(ranks, k)
    return float(np.mean(np.where(r <= k, 1.0 / r, 0.0))) if r.size else None


def ndcg(ranks, k: int) -> float | None:
    """NDCG@k, one relevant item: mean of 1/log2(rank + 1) where rank <= k, else 0. None when empty."""
    r = _ranks(ranks, k)
    return float(np.mean(np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0))) if r.size else None


def ranking_metrics(ranks, ks=(5, 10)) -> dict[str, float | None]:
    """``{"hr@k", "mrr@k", "ndcg@k"}`` for each k in ``ks``, in that order."""
    out: dict[str, float | None] = {}
    for k in ks:
        out[f"hr@{k}"] = hit_rate(ranks, k)
        out[f"mrr@{k}"] = mrr(ranks, k)
        out[f"ndcg@{k}"] = ndcg(ranks, k)
    return out
