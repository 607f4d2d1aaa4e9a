"""Isotonic (PAV), Platt, down-sampling correction, JSON round trip."""

import json

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from model.calibration import (
    Calibrators,
    IsotonicCalibrator,
    PlattCalibrator,
    downsample_correction,
)

pytestmark = pytest.mark.unit


def _miscalibrated(n=20000, seed=0):
    rng = np.random.default_rng(seed)
    true = 1 / (1 + np.exp(-rng.normal(-1.5, 1.2, n)))
    y = (rng.random(n) < true).astype(float)
    # the "model" is overconfident: logit scaled by 2 and shifted
    z = np.log(true / (1 - true))
    p = 1 / (1 + np.exp(-(2.0 * z + 0.5)))
    return p, y, true


def test_isotonic_is_monotone_and_matches_sklearn():
    p, y, _ = _miscalibrated()
    w = np.random.default_rng(1).uniform(0.5, 2, len(p))
    cal = IsotonicCalibrator().fit(p, y, w)
    grid = np.linspace(0, 1, 1001)
    out = cal(grid)
    assert (np.diff(out) >= -1e-12).all()
    ref = IsotonicRegression(out_of_bounds="clip").fit(p, y, sample_weight=w)
    np.testing.assert_allclose(cal(p), ref.predict(p), atol=1e-9)
    np.testing.assert_allclose(out, ref.predict(grid), atol=1e-9)


def test_pav_pools_violators():
    cal = IsotonicCalibrator().fit(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 1, 0, 1.0]))
    np.testing.assert_allclose(cal(np.array([0.1, 0.2, 0.3, 0.4])), [0, 0.5, 0.5, 1])


def test_platt_recovers_the_inverse_map():
    p, y, true = _miscalibrated()
    cal = PlattCalibrator().fit(p, y)
    assert cal.a == pytest.approx(0.5, abs=0.05)
    assert cal.b == pytest.approx(-0.25, abs=0.08)
    assert np.abs(cal(p) - true).mean() < 0.01
    assert cal(p).mean() == pytest.approx(y.mean(), abs=0.002)


def test_downsampling_correction_restores_the_true_rate():
    rng = np.random.default_rng(3)
    n, r = 400_000, 0.1
    true_p = 1 / (1 + np.exp(-rng.normal(-4.0, 1.0, n)))
    y = rng.random(n) < true_p
    keep = y | (rng.random(n) < r)  # keep all positives, a fraction r of negatives
    # a calibrated model of the down-sampled data: odds inflated by 1/r
    odds = true_p / (1 - true_p) / r
    p_sampled = odds / (1 + odds)
    assert p_sampled[keep].mean() > 3 * y.mean()
    corrected = downsample_correction(p_sampled, r)
    np.testing.assert_allclose(corrected, true_p, rtol=1e-9)
    assert corrected.mean() == pytest.approx(y.mean(), rel=0.03)
    # end to end: fit on the sampled validation rows, correct, compare to the true rate
    cals = Calibrators.fit(
        {"checkout": p_sampled[keep]},
        y[keep, None].astype(float),
        np.ones((keep.sum(), 1), bool),
        ["checkout"],
        method="isotonic",
        neg_keep_rate=r,
    )
    full = cals.apply({"checkout": p_sampled})["checkout"]
    assert full.mean() == pytest.approx(y.mean(), rel=0.05)
    with pytest.raises(ValueError):
        downsample_correction(p_sampled, 0.0)


def test_per_task_type_and_json_round_trip(tmp_path):
    p, y, _ = _miscalibrated(6000)
    tt = np.where(np.arange(len(p)) % 2 == 0, "ads", "search").astype(object)
    p2 = np.where(tt == "ads", p, p**2)  # search is miscalibrated differently
    labels = np.stack([y, y], 1)
    masks = np.stack([np.ones(len(y), bool), np.arange(len(y)) % 3 > 0], 1)
    cals = Calibrators.fit(
        {"click": p2, "engage": p2},
        labels,
        masks,
        ["click", "engage"],
        method="platt",
        task_type=tt,
        per_task_type=True,
        min_rows=100,
        neg_keep_rate={"engage": 0.5},
    )
    assert set(cals.tasks["click"].by_task_type) == {"ads", "search"}
    out = cals.apply({"click": p2, "engage": p2}, tt)
    for name in ("ads", "search"):
        sel = tt == name
        assert out["click"][sel].mean() == pytest.approx(y[sel].mean(), abs=0.01)
    assert (out["engage"] <= out["click"] + 1e-12).all()  # r = 0.5 lowers probabilities
    path = tmp_path / "cal.json"
    cals.save(path)
    json.loads(path.read_text())
    back = Calibrators.load(path).apply({"click": p2, "engage": p2}, tt)
    for k in out:
        np.testing.assert_allclose(back[k], out[k])
    ident = Calibrators.identity(["click"]).apply({"click": p})
    np.testing.assert_allclose(ident["click"], p)
