"""Experiment statistics: the delta-method ratio variance against a simulation, lift CIs
that cover, and the always-valid mSPRT against naive peeking on simulated A/A tests."""

import numpy as np
import pytest

from serve_apps.experiment_stats import (
    compare,
    msprt_lambda,
    msprt_pvalues,
    naive_peeking_rejects,
    ratio,
)

pytestmark = pytest.mark.unit


def users(rng, n: int, rate: float, exposures: float = 5.0, spread: float = 0.5):
    """Per-user totals: Poisson exposures, each user's own click rate around ``rate``
    (a beta with mean ``rate``), so a user's clicks are correlated as in real traffic."""
    exp = 1 + rng.poisson(exposures - 1, size=n)
    k = 1 / spread
    p = rng.beta(rate * k, (1 - rate) * k, size=n)
    return rng.binomial(exp, p), exp


def test_ratio_variance_matches_the_spread_of_the_estimate():
    rng = np.random.default_rng(0)
    estimates, variances = [], []
    for _ in range(400):
        clicks, exp = users(rng, 2000, 0.1)
        r = ratio(clicks, exp)
        estimates.append(r.value)
        variances.append(r.variance)
    empirical = np.var(estimates, ddof=1)
    assert np.mean(variances) == pytest.approx(empirical, rel=0.15)
    # a binomial variance over exposures ignores the per-user correlation: too small
    naive = 0.1 * 0.9 / (2000 * 5.0)
    assert naive < 0.7 * empirical


def test_ratio_refuses_bad_shapes_and_reports_no_data():
    with pytest.raises(ValueError, match="equal 1-d arrays"):
        ratio(np.zeros(3), np.zeros(4))
    assert np.isnan(ratio(np.zeros(1), np.ones(1)).value)  # one user: no variance
    assert np.isnan(ratio(np.zeros(5), np.zeros(5)).value)  # no exposures


def test_lift_ci_covers_the_true_lift_about_95_percent():
    rng = np.random.default_rng(1)
    hits, n = 0, 300
    for _ in range(n):
        a = ratio(*users(rng, 1500, 0.10))
        b = ratio(*users(rng, 1500, 0.11))
        c = compare(a, b)
        lo, hi = c.lift_ci
        hits += lo <= 0.10 <= hi
        assert c.diff_ci[0] < c.diff < c.diff_ci[1]
    assert 0.91 <= hits / n <= 0.99


def simulate(rng, experiments: int, checks: int, per_check: int, rate_a: float, rate_b: float):
    """Cumulative (diff, variance) after each check of many experiments, users arriving in
    batches of ``per_check`` per arm: arrays (experiments, checks)."""
    diff = np.empty((experiments, checks))
    var = np.empty((experiments, checks))
    for e in range(experiments):
        ca, ea = users(rng, checks * per_check, rate_a)
        cb, eb = users(rng, checks * per_check, rate_b)
        for k in range(checks):
            m = (k + 1) * per_check
            c = compare(ratio(ca[:m], ea[:m]), ratio(cb[:m], eb[:m]))
            diff[e, k], var[e, k] = c.diff, c.variance
    return diff, var


def test_msprt_keeps_alpha_under_continuous_peeking_and_naive_peeking_does_not():
    """A/A: 400 experiments, a look after each of 25 batches of 200 users per arm."""
    rng = np.random.default_rng(2)
    alpha, tau = 0.05, 0.01
    diff, var = simulate(rng, 400, 25, 200, 0.1, 0.1)
    p = msprt_pvalues(diff, var, tau)
    assert (np.diff(p, axis=1) <= 0).all()  # a running minimum: never goes back up
    msprt_fpr = float((p[:, -1] <= alpha).mean())
    naive_fpr = float(naive_peeking_rejects(diff, var, alpha).mean())
    # 400 experiments: the binomial sd of a 5% rate is 1.1 points
    assert msprt_fpr <= alpha + 0.02, msprt_fpr
    assert naive_fpr > 2 * alpha, naive_fpr  # peeking 25 times inflates it (typically 0.2+)
    # a single look at the end is a valid fixed-horizon test
    final = naive_peeking_rejects(diff[:, -1:], var[:, -1:], alpha).mean()
    assert final <= alpha + 0.03


def test_msprt_detects_a_real_lift_before_the_horizon():
    rng = np.random.default_rng(3)
    diff, var = simulate(rng, 60, 25, 200, 0.10, 0.12)
    p = msprt_pvalues(diff, var, tau=0.01)
    detected = p <= 0.05  # (experiments, checks)
    assert detected[:, -1].mean() >= 0.9
    first = np.argmax(detected, axis=1)[detected[:, -1]]
    assert np.median(first) < 24  # typically stopped well before the last look


def test_msprt_lambda_is_one_without_information_and_tau_must_be_positive():
    assert msprt_lambda(np.array([0.3]), np.array([0.0]), 0.1)[0] == 1.0
    assert msprt_lambda(np.array([0.0]), np.array([1e-4]), 0.01)[0] < 1.0  # no effect seen
    assert np.isfinite(msprt_lambda(np.array([1.0]), np.array([1e-9]), 0.5)).all()  # no overflow
    with pytest.raises(ValueError, match="tau"):
        msprt_lambda(np.array([0.1]), np.array([0.1]), 0.0)
