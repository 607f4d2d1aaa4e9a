"""Metrics agree with sklearn (ties, weights) and the nested per-task x task_type helper."""

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from model.metrics import (
    auc,
    evaluate,
    expected_calibration_error,
    logloss,
    normalized_entropy,
    pred_obs_ratio,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    n = 3000
    y = (rng.random(n) < 0.3).astype(float)
    # Coarse scores -> many ties between positives and negatives.
    p = np.clip(np.round(0.3 + 0.2 * (y - 0.3) + rng.normal(0, 0.2, n), 1), 0.05, 0.95)
    w = rng.uniform(0.1, 3.0, n)
    return y, p, w


def test_auc_matches_sklearn_with_ties_and_weights(data):
    y, p, w = data
    assert len(np.unique(p)) < 15  # really tied
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert auc(y, p, w) == pytest.approx(roc_auc_score(y, p, sample_weight=w), abs=1e-12)
    assert auc(y, np.zeros_like(p)) == 0.5
    assert np.isnan(auc(np.ones(5), np.arange(5.0)))


def test_logloss_matches_sklearn(data):
    y, p, w = data
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-10)
    assert logloss(y, p, w) == pytest.approx(log_loss(y, p, sample_weight=w), rel=1e-10)


def test_ne_ece_pred_obs(data):
    y, p, w = data
    rate = (w * y).sum() / w.sum()
    base = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    assert normalized_entropy(y, p, w) == pytest.approx(logloss(y, p, w) / base)
    assert normalized_entropy(y, np.full_like(p, y.mean())) == pytest.approx(1.0, abs=1e-9)
    # ECE by hand with 10 equal-width bins
    bins = np.clip((p * 10).astype(int), 0, 9)
    ece = sum(
        abs(p[bins == b].sum() - y[bins == b].sum()) / len(y)
        for b in range(10)
        if (bins == b).any()
    )
    assert expected_calibration_error(y, p) == pytest.approx(ece)
    assert expected_calibration_error(np.array([0, 1.0]), np.array([0.0, 1.0])) == 0
    assert pred_obs_ratio(y, p, w) == pytest.approx((w * p).sum() / (w * y).sum())


def test_evaluate_per_task_and_task_type(data):
    y, p, w = data
    n = len(y)
    tt = np.arange(n) % 3  # 0 unknown, 1 ads, 2 search
    labels = np.stack([y, 1 - y], 1)
    masks = np.stack([np.ones(n, bool), tt == 2], 1)
    res = evaluate(
        {"click": p, "checkout": 1 - p},
        labels,
        masks,
        ["click", "checkout"],
        tt,
        ["<unknown>", "ads", "search"],
        w,
    )
    assert set(res) == {"click", "checkout"}
    assert set(res["click"]) == {"all", "<unknown>", "ads", "search"}
    assert set(res["checkout"]) == {"all", "search"}  # only task types with labels
    ads = tt == 1
    assert res["click"]["ads"]["auc"] == pytest.approx(
        roc_auc_score(y[ads], p[ads], sample_weight=w[ads])
    )
    assert res["checkout"]["all"]["count"] == int((tt == 2).sum())
    assert set(res["click"]["all"]) >= {"auc", "logloss", "ne", "ece", "pred_obs"}
