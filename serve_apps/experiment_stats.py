"""Statistics of online experiments: per-user ratio metrics, lift with CIs, always-valid mSPRT.

The unit of randomization is the user (serve_apps.experiments.assign_arm), so the unit of
analysis is the user too: a metric such as CTR is a ratio of per-user sums,
``sum(clicks) / sum(exposures)``, whose variance comes from the delta method over users (a
binomial variance over exposures would ignore that one user's exposures are correlated and
understate it).

Sequential testing: the mixture SPRT of Johari, Pekelis and Walsh ("Always valid inference",
2017). With the difference of two arms' metrics estimated as ``d ~ N(theta, V)`` and a normal
mixing distribution ``theta ~ N(0, tau^2)`` under the alternative, the likelihood ratio against
``theta = 0`` is

    Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 d^2 / (2 V (V + tau^2)))

and ``p_k = min(1, min_{j <= k} 1 / Lambda_j)`` over the checks so far is a p-value that stays
valid however often one looks: reject at level alpha the first time ``p_k <= alpha``. A
fixed-horizon z-test repeated after every batch ("peeking") does not have that property: its
false-positive rate grows with the number of looks (tests/serve_apps/test_experiment_stats.py
simulates both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

Z_95 = float(norm.ppf(0.975))


@dataclass(frozen=True)
class RatioEstimate:
    """``sum(num) / sum(den)`` over users, with its delta-method variance."""

    value: float
    variance: float
    users: int
    numerator: float
    denominator: float


def ratio(num: np.ndarray, den: np.ndarray) -> RatioEstimate:
    """A per-user ratio metric (e.g. clicks / exposures) and its delta-method variance.

    ``num``, ``den``: (users,) per-user totals of one arm. Var(mean_x / mean_n) ~=
    (var_x - 2 r cov_xn + r^2 var_n) / (N mean_n^2)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError(
            f"ratio: num and den must be equal 1-d arrays, got {num.shape}, {den.shape}"
        )
    n = len(num)
    if n < 2 or den.sum() <= 0:
        return RatioEstimate(math.nan, math.nan, n, float(num.sum()), float(den.sum()))
    mx, mn = num.mean(), den.mean()
    r = mx / mn
    cov = np.cov(num, den, ddof=1)  # (2, 2)
    var = (cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / (n * mn * mn)
    return RatioEstimate(float(r), float(max(var, 0.0)), n, float(num.sum()), float(den.sum()))


@dataclass(frozen=True)
class Comparison:
    """Treatment against control: absolute and relative lift with 95% CIs."""

    control: float
    treatment: float
    diff: float
    diff_ci: tuple[float, float]
    lift: float  # treatment / control - 1
    lift_ci: tuple[float, float]
    variance: float  # of diff


def compare(control: RatioEstimate, treatment: RatioEstimate) -> Comparison:
    """Difference and relative lift, CIs from the delta method (normal approximation)."""
    d = treatment.value - control.value
    v = control.variance + treatment.variance
    half = Z_95 * math.sqrt(v) if v == v else math.nan
    if control.value > 0:
        q = treatment.value / control.value
        # Var(t / c) ~= (Var t + q^2 Var c) / c^2 (delta method)
        rel_var = (treatment.variance + q * q * control.variance) / control.value**2
        rel_half = Z_95 * math.sqrt(rel_var)
        lift = q - 1
    else:
        lift, rel_half = math.nan, math.nan
    return Comparison(
        control=control.value,
        treatment=treatment.value,
        diff=d,
        diff_ci=(d - half, d + half),
        lift=lift,
        lift_ci=(lift - rel_half, lift + rel_half),
        variance=v,
    )


def msprt_lambda(diff: np.ndarray, variance: np.ndarray, tau: float) -> np.ndarray:
    """The mixture likelihood ratio for each (diff, variance) pair (any shape), in logs
    internally so large statistics do not overflow; returns Lambda (inf when huge)."""
    diff = np.asarray(diff, dtype=np.float64)
    v = np.asarray(variance, dtype=np.float64)
    t2 = float(tau) ** 2
    if not (t2 > 0 and math.isfinite(t2)):
        raise ValueError(f"msprt: tau must be a finite number > 0, got {tau}")
    with np.errstate(divide="ignore", invalid="ignore"):
        log_lr = 0.5 * np.log(v / (v + t2)) + t2 * diff**2 / (2 * v * (v + t2))
    log_lr = np.where(v > 0, log_lr, 0.0)  # no information yet: Lambda = 1
    return np.exp(np.minimum(log_lr, 700.0))


def msprt_pvalues(diff: np.ndarray, variance: np.ndarray, tau: float) -> np.ndarray:
    """Always-valid p-values after each check: ``diff`` / ``variance`` (..., checks), the
    running minimum of 1 / Lambda along the last axis, capped at 1."""
    lam = msprt_lambda(diff, variance, tau)
    return np.minimum.accumulate(np.minimum(1.0, 1.0 / lam), axis=-1)


def naive_peeking_rejects(diff: np.ndarray, variance: np.ndarray, alpha: float) -> np.ndarray:
    """Whether a fixed-horizon two-sided z-test at ``alpha``, repeated after each check,
    ever rejected (along the last axis): the procedure mSPRT replaces."""
    z_crit = float(norm.ppf(1 - alpha / 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.abs(diff) / np.sqrt(variance)
    return np.any(np.where(variance > 0, z > z_crit, False), axis=-1)
