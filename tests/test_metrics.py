"""Metrics per task kind: hand-computed float64 references, scikit-learn cross-checks and degenerate inputs (None)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (
    f1_score,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    roc_auc_score,
)

import recsys_transfer.metrics as base_metrics
from recsys_transfer.metrics.classification import (
    auc,
    calibration,
    group_auc,
    group_aucs,
    logloss,
    normalized_entropy,
)
from recsys_transfer.metrics.multiclass import accuracy, macro_f1
from recsys_transfer.metrics.ranking import (
    full_ranking_ranks,
    hit_rate,
    mrr,
    ndcg,
    positive_ranks,
    ranking_metrics,
)
from recsys_transfer.metrics.regression import mae, mse, rmse

EMPTY = np.zeros(0)


def _log2(x: float) -> float:
    return math.log(x) / math.log(2.0)


# ---------------------------------------------------------------------------------------------- classification


def test_auc_hand_and_sklearn():
    # pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3/4
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75, abs=1e-15)
    assert auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5  # a tie counts half
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500), 1)  # many ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-15)
    assert isinstance(auc(y, s), float)


@pytest.mark.parametrize("fn", [auc, logloss, normalized_entropy, calibration])
def test_binary_metrics_empty_is_none(fn):
    assert fn(EMPTY, EMPTY) is None


def test_auc_single_class_is_none():
    assert auc(np.ones(3), np.array([0.1, 0.2, 0.3])) is None
    assert auc(np.zeros(3, dtype=np.int64), np.array([0.1, 0.2, 0.3])) is None


def test_logloss_hand_clip_and_sklearn():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.2, 0.6, 0.4])
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.6)) / 4
    assert logloss(y, p) == pytest.approx(expected, rel=1e-14)
    # p = 0 for a positive is clipped to 1e-7, p = 1 for a negative to 1 - 1e-7
    assert logloss(np.array([1, 0]), np.array([0.0, 1.0])) == pytest.approx(-math.log(1e-7), rel=1e-9)
    assert logloss(np.ones(2), np.array([0.7, 0.8])) == pytest.approx(-(math.log(0.7) + math.log(0.8)) / 2)
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 2, 300), rng.random(300)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-13)
    assert logloss(y, p) == pytest.approx(base_metrics.logloss(y, p), rel=1e-15)


def test_normalized_entropy_hand():
    # base rate 1/2: base-rate entropy is exactly 1 bit per row
    y = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.2, 0.6, 0.4])
    ce = -(_log2(0.9) + _log2(0.8) + _log2(0.6) + _log2(0.6))
    assert normalized_entropy(y, p) == pytest.approx(ce / 4.0, rel=1e-14)
    # base rate 1/4
    y = np.array([1.0, 0.0, 0.0, 0.0])
    p = np.array([0.7, 0.1, 0.2, 0.3])
    ce = -(_log2(0.7) + _log2(0.9) + _log2(0.8) + _log2(0.7))
    norm = -1 * _log2(0.25) - 3 * _log2(0.75)
    assert normalized_entropy(y, p) == pytest.approx(ce / norm, rel=1e-14)
    # a perfectly calibrated constant predictor (the base rate) has NE = 1
    assert normalized_entropy(y, np.full(4, 0.25)) == pytest.approx(1.0, rel=1e-14)


def test_normalized_entropy_eta_clamp():
    # TorchRec clamps predictions to [1e-12, 1 - 1e-12] (not logloss's 1e-7)
    ne = normalized_entropy(np.array([1, 0]), np.array([0.0, 0.0]))
    assert ne == pytest.approx((-_log2(1e-12) - _log2(1 - 1e-12)) / 2.0, rel=1e-12)


def test_normalized_entropy_is_logloss_over_base_entropy():
    rng = np.random.default_rng(2)
    y = (rng.random(1000) < 0.2).astype(np.float64)
    p = rng.uniform(0.01, 0.99, 1000)
    m = y.mean()
    h = -(m * math.log(m) + (1 - m) * math.log(1 - m))
    assert normalized_entropy(y, p) == pytest.approx(log_loss(y, p) / h, rel=1e-12)


def test_normalized_entropy_single_class_is_none():
    assert normalized_entropy(np.ones(3), np.array([0.9, 0.8, 0.7])) is None
    assert normalized_entropy(np.zeros(3), np.array([0.1, 0.2, 0.3])) is None


def test_calibration():
    assert calibration(np.array([1, 0, 1, 0]), np.array([0.9, 0.2, 0.6, 0.4])) == pytest.approx(2.1 / 2.0)
    assert calibration(np.array([0, 0, 1]), np.array([0.1, 0.1, 0.3])) == pytest.approx(0.5)
    assert calibration(np.zeros(3), np.array([0.1, 0.2, 0.3])) is None  # zero positives


def test_non_finite_scores_raise():
    with pytest.raises(ValueError):
        normalized_entropy(np.array([1, 0]), np.array([np.nan, 0.5]))
    with pytest.raises(ValueError):
        calibration(np.array([1, 0]), np.array([np.inf, 0.5]))


# ---------------------------------------------------------------------------------------------- gAUC


def _fuxictr_gauc(y, s, g) -> float:
    """FuxiCTR fuxictr/metrics.py gAUC + evaluate_metrics, as a plain loop: size-weighted, both-class groups only."""
    rows: dict = defaultdict(list)
    for i, gid in enumerate(g.tolist()):
        rows[gid].append(i)
    num = den = 0.0
    for idx in rows.values():
        yt = y[idx]
        if 0 < yt.sum() < len(yt):
            num += roc_auc_score(yt, s[idx]) * len(yt)
            den += len(yt)
    return num / den


def test_group_auc_hand():
    rows = [
        # group 7: pos 0.9 beats neg 0.5, loses to neg 0.95 -> AUC 1/2, 3 rows
        (7, 1, 0.9), (7, 0, 0.5), (7, 0, 0.95),
        # group 3: pos 0.8 beats both; pos 0.3 ties 0.3 (1/2), beats 0.1 -> 3.5/4, 4 rows
        (3, 1, 0.8), (3, 1, 0.3), (3, 0, 0.3), (3, 0, 0.1),
        # group 5: positives only; group 9: one negative -> do not qualify
        (5, 1, 0.2), (5, 1, 0.6), (9, 0, 0.4),
    ]
    perm = np.random.default_rng(3).permutation(len(rows))
    g, y, s = (np.array(c)[perm] for c in zip(*rows))
    expected = (3 * 0.5 + 4 * 0.875) / 7
    assert group_auc(y, s, g) == pytest.approx(expected, abs=1e-15)
    ids, aucs, sizes = group_aucs(y, s, g)
    assert ids.tolist() == [3, 7]
    assert aucs.tolist() == pytest.approx([0.875, 0.5], abs=1e-15)
    assert sizes.tolist() == [4, 3]


def test_group_auc_matches_fuxictr_loop():
    rng = np.random.default_rng(4)
    n = 3000
    g = rng.integers(0, 200, n).astype(str)  # string group ids work too
    y = (rng.random(n) < 0.3).astype(np.int64)
    s = np.round(rng.random(n), 1)
    assert group_auc(y, s, g) == pytest.approx(_fuxictr_gauc(y, s, g), abs=1e-12)


def test_group_auc_none():
    assert group_auc(EMPTY, EMPTY, EMPTY) is None
    g = np.array([1, 1, 2, 2])
    assert group_auc(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.3, 0.4]), g) is None  # one class per group
    assert len(group_aucs(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.3, 0.4]), g)[0]) == 0


def test_group_auc_ml100k(ml100k_dir: Path):
    """Score = the item's mean training rating; label = rating >= 4; groups = users of every fifth rating."""
    rows = [line.split("\t") for line in (ml100k_dir / "u.data").read_text().splitlines()]
    train = [r for i, r in enumerate(rows) if i % 5 != 0]
    test = [r for i, r in enumerate(rows) if i % 5 == 0]
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for _u, item, rating, _ts in train:
        total[item] += int(rating)
        count[item] += 1
    global_mean = sum(total.values()) / sum(count.values())
    users = np.array([int(u) for u, _i, _r, _t in test])
    labels = np.array([1 if int(r) >= 4 else 0 for _u, _i, r, _t in test])
    scores = np.array([total[i] / count[i] if count[i] else global_mean for _u, i, _r, _t in test])

    n_rows: dict[int, int] = defaultdict(int)
    n_pos: dict[int, int] = defaultdict(int)
    for u, lab in zip(users.tolist(), labels.tolist()):
        n_rows[u] += 1
        n_pos[u] += lab
    qualifying = sum(1 for u in n_rows if 0 < n_pos[u] < n_rows[u])

    ids, aucs, sizes = group_aucs(labels, scores, users)
    assert len(ids) == qualifying
    assert 0 < qualifying < len(n_rows)  # some users have a single class among their test ratings
    assert sizes.sum() == sum(n_rows[u] for u in n_rows if 0 < n_pos[u] < n_rows[u])
    value = group_auc(labels, scores, users)
    assert value is not None and math.isfinite(value)
    assert 0.5 < value < 1.0  # the item's mean rating ranks a user's liked items higher
    assert value == pytest.approx(_fuxictr_gauc(labels, scores, users), abs=1e-12)


# ---------------------------------------------------------------------------------------------- regression


def test_regression_hand_and_sklearn():
    y = np.array([1.0, 2.0, 3.0])
    pred = np.array([1.5, 2.0, 1.0])  # errors -0.5, 0, 2
    assert mse(y, pred) == pytest.approx((0.25 + 0 + 4) / 3, rel=1e-15)
    assert mae(y, pred) == pytest.approx(2.5 / 3, rel=1e-15)
    assert rmse(y, pred) == pytest.approx(math.sqrt(4.25 / 3), rel=1e-15)
    rng = np.random.default_rng(5)
    y, pred = rng.normal(size=100), rng.normal(size=100)
    assert mse(y, pred) == pytest.approx(mean_squared_error(y, pred), rel=1e-13)
    assert mae(y, pred) == pytest.approx(mean_absolute_error(y, pred), rel=1e-13)
    assert all(isinstance(f(y, pred), float) for f in (mse, mae, rmse))


@pytest.mark.parametrize("fn", [mse, mae, rmse])
def test_regression_empty_is_none(fn):
    assert fn(EMPTY, EMPTY) is None


# ---------------------------------------------------------------------------------------------- multiclass


def test_multiclass_hand():
    labels = np.array([0, 1, 2, 2, 1])
    pred = np.array([0, 2, 2, 2, 1])
    assert accuracy(labels, pred) == pytest.approx(4 / 5)
    # F1_c = 2TP / (2TP + FP + FN): c0 = 2/2, c1 = 2/(2+0+1), c2 = 4/(4+1+0)
    f1 = [1.0, 2 / 3, 4 / 5]
    assert macro_f1(labels, pred) == pytest.approx(sum(f1) / 3, rel=1e-15)
    assert macro_f1(labels, pred, num_classes=4) == pytest.approx(sum(f1) / 4, rel=1e-15)  # class 3 absent: F1 0
    # classes present in labels OR predictions: {0, 3}; c0 = 2/(2+0+1), c3 = 0
    assert macro_f1(np.array([0, 0]), np.array([0, 3])) == pytest.approx((2 / 3 + 0.0) / 2, rel=1e-15)


def test_multiclass_sklearn_and_empty():
    rng = np.random.default_rng(6)
    labels, pred = rng.integers(0, 5, 200), rng.integers(0, 6, 200)
    assert macro_f1(labels, pred) == pytest.approx(f1_score(labels, pred, average="macro"), rel=1e-13)
    assert macro_f1(labels, pred, 5) == pytest.approx(
        f1_score(labels, pred, labels=range(5), average="macro", zero_division=0), rel=1e-13
    )
    assert accuracy(labels, pred) == pytest.approx(np.mean(labels == pred))
    assert accuracy(EMPTY, EMPTY) is None
    assert macro_f1(EMPTY, EMPTY) is None
    assert macro_f1(EMPTY, EMPTY, num_classes=3) is None


# ---------------------------------------------------------------------------------------------- ranking

POS = np.array([0.9, 0.5, 0.2, 0.0])
NEG = np.array([
    [0.1, 0.2, 0.3],  # nothing >= 0.9 -> rank 1
    [0.5, 0.1, 0.6],  # tie 0.5 and 0.6 count -> rank 3
    [0.3, 0.4, 0.5],  # all above -> rank 4
    [0.0, 0.0, 0.0],  # constant scorer: all ties -> worst rank 4
])


def test_positive_ranks_pessimistic_ties():
    ranks = positive_ranks(POS, NEG)
    assert ranks.dtype == np.int64
    assert ranks.tolist() == [1, 3, 4, 4]
    assert positive_ranks(np.full(2, 0.3), np.full((2, 99), 0.3)).tolist() == [100, 100]
    assert positive_ranks(np.array([np.nan]), np.array([[0.1, 0.2]])).tolist() == [3]  # NaN never helps
    assert positive_ranks(EMPTY, np.zeros((0, 5))).tolist() == []


def test_ranking_metrics_hand():
    ranks = positive_ranks(POS, NEG)  # [1, 3, 4, 4]
    assert hit_rate(ranks, 1) == 0.25
    assert hit_rate(ranks, 3) == 0.5
    assert mrr(ranks, 3) == pytest.approx((1 + 1 / 3) / 4, rel=1e-15)
    assert ndcg(ranks, 3) == pytest.approx((1 + 1 / _log2(4)) / 4, rel=1e-15)
    out = ranking_metrics(ranks, ks=(3, 5))
    assert list(out) == ["hr@3", "mrr@3", "ndcg@3", "hr@5", "mrr@5", "ndcg@5"]
    assert out["hr@5"] == 1.0
    assert out["mrr@5"] == pytest.approx((1 + 1 / 3 + 1 / 4 + 1 / 4) / 4, rel=1e-15)
    assert out["ndcg@5"] == pytest.approx((1 + 1 / _log2(4) + 2 / _log2(5)) / 4, rel=1e-15)
    assert list(ranking_metrics(ranks)) == ["hr@5", "mrr@5", "ndcg@5", "hr@10", "mrr@10", "ndcg@10"]
    assert all(isinstance(v, float) for v in out.values())


def test_ranking_metrics_empty_and_bad_k():
    assert ranking_metrics(np.zeros(0, dtype=np.int64)) == {
        k: None for k in ["hr@5", "mrr@5", "ndcg@5", "hr@10", "mrr@10", "ndcg@10"]
    }
    with pytest.raises(ValueError):
        hit_rate(np.array([1]), 0)


def test_full_ranking_ranks_hand():
    scores = np.array([
        [0.1, 0.9, 0.3, 0.9, 0.2],  # positive 1 ties item 3 -> rank 2
        [0.5, 0.5, 0.5, 0.5, 0.5],  # constant -> worst rank 5
        [0.3, 0.2, 0.1, 0.4, 0.0],  # positive 2: items 0, 1, 3 >= 0.1 -> rank 4
    ])
    positive = np.array([1, 0, 2])
    ranks = full_ranking_ranks(scores, positive)
    assert ranks.dtype == np.int64
    assert ranks.tolist() == [2, 5, 4]
    exclude = np.zeros_like(scores, dtype=bool)
    exclude[0, 3] = True
    exclude[1, [0, 1, 2]] = True  # item 0 is row 1's positive: never excluded
    exclude[2, [0, 3]] = True
    assert full_ranking_ranks(scores, positive, exclude).tolist() == [1, 3, 2]


def test_full_ranking_equals_sampled_when_negatives_are_all_other_items():
    rng = np.random.default_rng(7)
    n, items = 50, 30
    scores = np.round(rng.random((n, items)), 1)  # many ties
    positive = rng.integers(0, items, n)
    rows = np.arange(n)
    others = np.ones((n, items), dtype=bool)
    others[rows, positive] = False
    neg = scores[others].reshape(n, items - 1)
    full = full_ranking_ranks(scores, positive)
    assert np.array_equal(full, positive_ranks(scores[rows, positive], neg))
    assert full.max() > full.min()  # not a trivial case
