"""The label rules as pure functions: windows, duplicates, confidence, outliers, sampling."""

import numpy as np
import pandas as pd
import pytest

from model.config import PrepareConfig
from ray_jobs import labels as L

pytestmark = pytest.mark.unit
H = L.HOUR
CUTOFF = 1_800_000_000


def _rows(**cols):
    n = len(next(iter(cols.values())))
    base = {
        c: [np.nan] * n
        for c in (
            "click_ts",
            "engage_ts",
            "add_to_cart_ts",
            "checkout_ts",
            "add_to_cart_low",
            "checkout_low",
        )
    }
    base["task_type"] = ["ads"] * n
    base.update(cols)
    return pd.DataFrame(base)


def test_window_edges_and_open_windows():
    cfg = PrepareConfig(attribution_window_hours={"add_to_cart": 10, "checkout": 100})
    click = CUTOFF - 1000 * H
    df = _rows(
        click_ts=[click, click, click, CUTOFF - 5 * H, np.nan, CUTOFF - 5 * H],
        add_to_cart_ts=[click + 10 * H, click + 10 * H + 1, np.nan, np.nan, np.nan, CUTOFF - 4 * H],
    )
    out = L.attribute(df, cfg, CUTOFF, {"ads"})
    atc = out["add_to_cart"].tolist()
    assert atc[0] == 1.0  # exactly at W counts
    assert atc[1] == 0.0  # one second late: outside the window, window closed -> negative
    assert atc[2] == 0.0  # no conversion, window closed
    assert np.isnan(atc[3])  # clicked 5 h before the cut-off, W=10 h still open -> unknown
    assert atc[4] == 0.0  # never clicked -> cannot convert
    assert atc[5] == 1.0  # converted inside an open window -> positive already
    assert out["click"].tolist() == [1, 1, 1, 1, 0, 1]  # click label kept when conversions are null
    assert np.isnan(out["checkout"].iloc[3]) and out["checkout"].iloc[0] == 0.0


def test_conversions_only_for_ads_engage_only_elsewhere():
    cfg = PrepareConfig()
    df = _rows(
        click_ts=[CUTOFF - 900 * H] * 2,
        engage_ts=[CUTOFF - 899 * H] * 2,
        task_type=["ads", "search"],
    )
    out = L.attribute(df, cfg, CUTOFF, {"ads"})
    assert np.isnan(out["engage"].iloc[0]) and out["engage"].iloc[1] == 1.0
    assert out["add_to_cart"].iloc[0] == 0.0 and np.isnan(out["add_to_cart"].iloc[1])


def _events(rows):
    return pd.DataFrame(
        rows,
        columns=["event_id", "impression_id", "event_type", "event_time_s", "match_confidence"],
    )


def test_duplicates_count_once_and_low_confidence_drop_or_downweight():
    ev = _events(
        [
            (1, 10, "click", 100, 1.0),
            (1, 10, "click", 100, 1.0),  # duplicate
            (2, 10, "add_to_cart", 200, 0.2),  # low confidence
            (3, 11, "click", 100, 1.0),
            (4, 11, "add_to_cart", 300, 0.9),
        ]
    )
    dropped = L.aggregate_events(ev, PrepareConfig(min_match_confidence=0.5)).set_index(
        "impression_id"
    )
    assert dropped.loc[10, "n_duplicates"] == 1 and dropped.loc[11, "n_duplicates"] == 0
    assert np.isnan(dropped.loc[10, "add_to_cart_ts"]) and dropped.loc[11, "add_to_cart_ts"] == 300
    assert dropped.loc[10, "n_low_confidence"] == 1
    cfg = PrepareConfig(
        min_match_confidence=0.5, low_confidence_action="downweight", low_confidence_weight=0.25
    )
    kept = L.aggregate_events(ev, cfg)
    kept["task_type"] = "ads"
    for c in ("engage_ts", "checkout_ts", "checkout_low"):
        kept[c] = kept.get(c, np.nan)
    out = L.attribute(kept, cfg, 10**9, {"ads"})
    assert out["add_to_cart"].tolist() == [1.0, 1.0]
    assert out["sample_weight"].tolist() == [0.25, 1.0]


def test_bad_reasons():
    df = pd.DataFrame(
        {
            "task_type": ["ads", "ads", "nope", "ads", "ads"],
            "event_time_s": [CUTOFF - 1, CUTOFF - 1, CUTOFF - 1, CUTOFF + 10, 5],
            "user_id": [1, None, 1, 1, 1],
            "item_id": [1, 1, 1, 1, 1],
        }
    )
    assert L.bad_reasons(df, ["ads"], CUTOFF, 946_684_800).tolist() == [
        "",
        "missing_user_id",
        "unknown_task_type",
        "timestamp_after_cutoff",
        "timestamp_too_old",
    ]


def test_noisy_advertiser_detection_on_planted_outliers():
    rng = np.random.default_rng(0)
    n = 200
    clicks = rng.integers(30, 400, size=n)
    base = 1 / (1 + np.exp(-rng.normal(-1.8, 0.6, size=n)))
    noisy = np.zeros(n, dtype=bool)
    noisy[:20] = True
    conv = rng.binomial(clicks, np.clip(base * np.where(noisy, 4, 1), 0, 0.9))
    conf = np.where(noisy, 0.55, 0.8) * conv + rng.normal(0, 0.05, size=n) * np.sqrt(conv)
    stats = pd.DataFrame(
        {"advertiser_id": np.arange(n), "clicks": clicks, "conversions": conv, "conf_sum": conf}
    )
    t = L.detect_noisy_advertisers(stats, PrepareConfig()).table
    flagged = t["flagged"].to_numpy()
    assert (flagged & noisy).sum() / noisy.sum() >= 0.9
    assert (flagged & noisy).sum() / max(flagged.sum(), 1) >= 0.9
    assert t.loc[flagged, "reliability"].max() < t.loc[~flagged, "reliability"].min() + 1e-9


def test_small_advertisers_are_shrunk_not_flagged():
    rng = np.random.default_rng(3)
    conv = rng.binomial(1000, 0.1, size=49)
    stats = pd.DataFrame(
        {
            "advertiser_id": range(50),
            "clicks": [1000] * 49 + [3],
            "conversions": [*conv, 3],
            "conf_sum": [*(0.8 * conv + rng.normal(0, 1, size=49)), 2.4],
        }
    )
    t = L.detect_noisy_advertisers(stats, PrepareConfig()).table
    assert not t["flagged"].iloc[-1]  # 3 of 3 converted is noise, not fraud


def test_negative_sampling_keeps_positives_and_weighted_rates():
    rng = np.random.default_rng(1)
    n = 400_000
    y = (rng.random(n) < 0.03).astype(float)
    labels = pd.DataFrame(
        {"add_to_cart": y, "checkout": y * (rng.random(n) < 0.5), "click": rng.random(n) < 0.2}
    )
    cfg = PrepareConfig(negative_rate=0.2)
    keep, mult = L.sample_rows(labels, np.arange(n), np.array(["ads"] * n), cfg, {})
    assert keep[y == 1].all()
    assert keep.mean() == pytest.approx(0.03 + 0.97 * 0.2, abs=0.01)
    for task in ("add_to_cart", "checkout", "click"):
        v = labels[task].to_numpy(dtype=float)
        weighted = (v[keep] * mult[keep]).sum() / mult[keep].sum()
        assert weighted == pytest.approx(v.mean(), rel=0.02), task
    again, _ = L.sample_rows(labels, np.arange(n), np.array(["ads"] * n), cfg, {})
    assert (again == keep).all()  # deterministic: re-runs sample the same rows


def test_stratification_follows_the_mix_and_keeps_rates():
    counts = {"ads": 90_000, "search": 10_000}
    rates = L.stratify_rates(counts, {"ads": 0.5, "search": 0.5})
    assert rates == {"ads": pytest.approx(10_000 / 90_000), "search": 1.0}
    n = 100_000
    tt = np.array(["ads"] * 90_000 + ["search"] * 10_000)
    rng = np.random.default_rng(2)
    y = (rng.random(n) < 0.05).astype(float)
    labels = pd.DataFrame(
        {
            "add_to_cart": np.where(tt == "ads", y, np.nan),
            "checkout": np.nan,
            "click": rng.random(n) < 0.3,
        }
    )
    keep, mult = L.sample_rows(labels, np.arange(n), tt, PrepareConfig(negative_rate=1.0), rates)
    ads = keep & (tt == "ads")
    assert keep[(tt == "ads") & (y == 1)].all()  # positives survive stratification too
    assert mult[ads].sum() == pytest.approx(mult[keep & (tt == "search")].sum(), rel=0.1)
    weighted = (y[ads] * mult[ads]).sum() / mult[ads].sum()
    assert weighted == pytest.approx(y[tt == "ads"].mean(), rel=0.1)
