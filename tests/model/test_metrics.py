"""Metrics agree with sklearn (ties, weights) and the nested per-task x task_type helper."""

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from model.metrics import (
    auc,
    evaluate,
    expected_calibration_error,
    group_name,
    grouped_auc,
    logloss,
    normalized_entropy,
    pred_obs_ratio,
    within_use_case_objective,
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
    assert set(res["click"]) == {"pooled", "unknown", "ads", "search"}  # valid MLflow names
    assert set(res["checkout"]) == {"pooled", "search"}  # only task types with labels
    ads = tt == 1
    assert res["click"]["ads"]["auc"] == pytest.approx(
        roc_auc_score(y[ads], p[ads], sample_weight=w[ads])
    )
    assert res["checkout"]["pooled"]["count"] == int((tt == 2).sum())
    assert set(res["click"]["pooled"]) >= {"auc", "logloss", "ne", "ece", "pred_obs"}


def _sklearn_gauc(y, p, g, w=None):
    """Reference: per-group sklearn AUC, weighted by the group's (weighted) impressions."""
    w = np.ones(len(y)) if w is None else w
    num = den = 0.0
    for u in np.unique(g):
        s = g == u
        if 0 < y[s].sum() < s.sum():
            a = roc_auc_score(y[s], p[s], sample_weight=w[s])
            num, den = num + w[s].sum() * a, den + w[s].sum()
    return num / den


def test_grouped_auc_matches_per_group_sklearn(data):
    y, p, w = data
    rng = np.random.default_rng(1)
    g = rng.integers(0, 40, len(y))  # 40 users, ~75 rows each, tied scores inside groups
    ref = _sklearn_gauc(y, p, g)
    gauc, n = grouped_auc(y, p, g)
    assert gauc == pytest.approx(ref, abs=1e-12) and n == 40
    assert grouped_auc(y, p, g, w)[0] == pytest.approx(_sklearn_gauc(y, p, g, w), abs=1e-12)


def test_grouped_auc_hand_made_groups():
    # user 1: perfectly ordered (AUC 1, 3 rows); user 2: reversed (AUC 0, 2 rows);
    # user 3: one class only (left out); user 4: tie between its pos and neg (AUC 0.5, 2 rows)
    y = np.array([1, 0, 0, 1, 0, 1, 1, 1, 0])
    p = np.array([0.9, 0.2, 0.1, 0.3, 0.8, 0.5, 0.6, 0.4, 0.4])
    g = np.array([1, 1, 1, 2, 2, 3, 3, 4, 4])
    gauc, n = grouped_auc(y, p, g)
    assert n == 3
    assert gauc == pytest.approx((3 * 1.0 + 2 * 0.0 + 2 * 0.5) / 7)
    # Shuffling rows changes nothing (the sort is by group, then score).
    perm = np.random.default_rng(0).permutation(len(y))
    assert grouped_auc(y[perm], p[perm], g[perm])[0] == pytest.approx(gauc)
    assert np.isnan(grouped_auc(np.ones(3), np.arange(3.0), np.arange(3))[0])
    # A pooled AUC can be high while every user's ranking is random: GAUC sees through it.
    g2 = np.repeat(np.arange(200), 20)
    rng = np.random.default_rng(2)
    base = np.repeat(rng.uniform(0.05, 0.6, 200), 20)  # users differ only in base rate
    y2 = (rng.random(len(g2)) < base).astype(float)
    p2 = base + rng.normal(0, 1e-3, len(g2))  # knows the base rate, nothing within a user
    assert auc(y2, p2) > 0.65
    assert abs(grouped_auc(y2, p2, g2)[0] - 0.5) < 0.05


def test_evaluate_adds_grouped_auc_within_each_task_type(data):
    y, p, w = data
    n = len(y)
    tt = 1 + np.arange(n) % 2
    g = np.random.default_rng(3).integers(0, 30, n)
    res = evaluate({"click": p}, y[:, None], np.ones((n, 1), bool), ["click"], tt,
                   ["<unknown>", "ads", "search"], w, g)  # fmt: skip
    ads = tt == 1
    assert res["click"]["ads"]["gauc"] == pytest.approx(
        _sklearn_gauc(y[ads], p[ads], g[ads], w[ads])
    )
    assert res["click"]["ads"]["gauc_groups"] == len(np.unique(g[ads]))
    assert "gauc" not in res["click"]["pooled"]  # grouped AUC is never pooled across types


def test_objective_is_within_use_case_never_pooled():
    # Pooled AUC high (base rates differ), within-use-case AUC at chance: the objective is 0.5.
    m = {
        "click": {
            "pooled": {"auc": 0.68},
            "ads": {"auc": 0.5, "gauc": 0.6},
            "search": {"auc": 0.5},
        },
        "checkout": {"pooled": {"auc": 0.9}, "ads": {"auc": 0.8, "gauc": float("nan")}},
    }
    assert within_use_case_objective(m, {"click": 1.0}) == pytest.approx(0.5)
    # per task a weighted mean over its task_types, then a weighted mean over tasks
    m["click"]["search"]["auc"] = 0.9
    got = within_use_case_objective(m, {"click": 1.0, "checkout": 2.0}, {"ads": 3.0, "search": 1.0})
    assert got == pytest.approx((1 * (3 * 0.5 + 1 * 0.9) / 4 + 2 * 0.8) / 3)
    # a task observed on one use-case keeps its weight against one observed on many
    assert within_use_case_objective(m, {"click": 1.0, "checkout": 1.0}) == pytest.approx(
        (0.7 + 0.8) / 2
    )
    # grouped AUC: NaN cells (no user with both classes) and cells without it are left out
    assert within_use_case_objective(m, {"click": 1.0, "checkout": 1.0}, None, "gauc") == 0.6
    assert within_use_case_objective(m, {"engage": 1.0}) == float("-inf")


def test_group_names_are_valid_mlflow_names():
    from mlflow.utils.validation import _validate_metric_name

    for raw in ["<unknown>", "ads", "related_items", "a:b", "x/y", "é"]:
        name = group_name(raw)
        _validate_metric_name(f"val/click/{name}/auc")  # raises on an invalid name
    assert group_name("<unknown>") == "unknown" and group_name("ads") == "ads"
