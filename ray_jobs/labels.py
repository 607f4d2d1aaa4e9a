"""The label pipeline's rules as pure functions over columnar batches (pandas / numpy).

``ray_jobs.prepare`` wires them into Ray Data; tests call them directly too. Times are int64
seconds since the epoch throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from model.config import PrepareConfig

DAY = 86_400
HOUR = 3_600
CONVERSIONS = ("add_to_cart", "checkout")
FIRST_PARTY = ("click", "engage")
ID_COLUMNS = ("user_id", "item_id")
# Delay histogram bins (hours), log-spaced from one minute to 60 days.
DELAY_BINS_H = np.concatenate([[0.0], np.geomspace(1 / 60, 60 * 24, 95)])


# --------------------------------------------------------------------------- bad input


def bad_reasons(df: pd.DataFrame, task_types: list[str], cutoff: int, min_time: int) -> np.ndarray:
    """Per row: '' when fine, else why the row is quarantined (first reason wins)."""
    reason = np.full(len(df), "", dtype=object)
    t = df["event_time_s"]
    checks = [
        (df["task_type"].isna() | ~df["task_type"].isin(task_types), "unknown_task_type"),
        (t.isna() | (t < min_time), "timestamp_too_old"),
        (t > cutoff, "timestamp_after_cutoff"),
    ]
    checks = [(df[c].isna(), f"missing_{c}") for c in ID_COLUMNS if c in df] + checks
    for mask, why in reversed(checks):  # the first listed reason is written last and wins
        reason[np.asarray(mask, dtype=bool)] = why
    return reason


# --------------------------------------------------------------------------- events -> per impression


def aggregate_events(ev: pd.DataFrame, cfg: PrepareConfig) -> pd.DataFrame:
    """Per impression: first time of each event type, conversion match confidence, counts.

    Duplicates (same event_id) count once. Conversions below min_match_confidence are dropped,
    or kept and flagged for down-weighting, as cfg says.
    """
    n_raw = ev.groupby("impression_id").size()
    ev = ev.drop_duplicates("event_id")
    dups = (n_raw - ev.groupby("impression_id").size()).rename("n_duplicates")
    conv = ev["event_type"].isin(CONVERSIONS)
    low = conv & (ev["match_confidence"] < cfg.min_match_confidence)
    lowconf = low.groupby(ev["impression_id"]).sum().rename("n_low_confidence")
    if cfg.low_confidence_action == "drop":
        ev = ev[~low]
    ev = ev.assign(low=low.reindex(ev.index))
    ev = ev.sort_values(["impression_id", "event_time_s"], kind="stable")
    first = ev.drop_duplicates(["impression_id", "event_type"])  # earliest per type
    times = first.pivot(index="impression_id", columns="event_type", values="event_time_s")
    out = pd.DataFrame(index=n_raw.index)
    for et in (*FIRST_PARTY, *CONVERSIONS):
        out[f"{et}_ts"] = times.get(et, np.nan)
    conv_first = first[first["event_type"].isin(CONVERSIONS)]
    for et in CONVERSIONS:
        sel = conv_first[conv_first["event_type"] == et].set_index("impression_id")
        out[f"{et}_conf"] = sel["match_confidence"]
        out[f"{et}_low"] = sel["low"].astype(float)
    out["n_duplicates"] = dups
    out["n_low_confidence"] = lowconf
    out = out.fillna({"n_duplicates": 0, "n_low_confidence": 0})
    return out.reset_index()


# --------------------------------------------------------------------------- attribution


def attribute(
    df: pd.DataFrame, cfg: PrepareConfig, cutoff: int, ads_task_types: set[str]
) -> pd.DataFrame:
    """Labels with a trailing attribution window per conversion task.

    click / engage: observed right away. A conversion counts only within W_t after the click.
    A clicked impression whose window is still open at the cut-off and has not converted yet
    gets a null label (masked from the loss, never a false negative); it keeps its click label.
    Conversions exist only for ads; engage only for the other use-cases (null otherwise).
    """
    clicked = df["click_ts"].notna().to_numpy()
    is_ads = df["task_type"].isin(ads_task_types).to_numpy()
    out = {"click": clicked.astype(np.float32)}
    engaged = df["engage_ts"].notna().to_numpy()
    out["engage"] = np.where(is_ads, np.nan, engaged).astype(np.float32)
    weight = np.ones(len(df), dtype=np.float32)
    for task in CONVERSIONS:
        w_s = cfg.attribution_window_hours[task] * HOUR
        delay = (df[f"{task}_ts"] - df["click_ts"]).to_numpy(dtype=float)
        converted = clicked & (delay >= 0) & (delay <= w_s)
        closed = df["click_ts"].to_numpy(dtype=float) + w_s <= cutoff
        label = np.where(converted, 1.0, np.where(~clicked | closed, 0.0, np.nan))
        out[task] = np.where(is_ads, label, np.nan).astype(np.float32)
        if cfg.low_confidence_action == "downweight":
            low = converted & (df[f"{task}_low"].to_numpy(dtype=float) == 1.0)
            weight = np.where(low, weight * cfg.low_confidence_weight, weight)
    return pd.DataFrame(out, index=df.index).assign(sample_weight=weight)


def conversion_delays(df: pd.DataFrame, cfg: PrepareConfig) -> dict[str, dict[str, np.ndarray]]:
    """Histograms of click -> conversion delay per task and click date (for the delay report)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    day = (df["click_ts"] // DAY).to_numpy()
    for task in CONVERSIONS:
        delay_h = ((df[f"{task}_ts"] - df["click_ts"]) / HOUR).to_numpy(dtype=float)
        ok = np.isfinite(delay_h) & (delay_h >= 0)
        bins = np.clip(
            np.searchsorted(DELAY_BINS_H, delay_h[ok], side="right") - 1, 0, len(DELAY_BINS_H) - 1
        )
        for d in np.unique(day[ok]):
            sel = day[ok] == d
            hist = np.bincount(bins[sel], minlength=len(DELAY_BINS_H))
            out.setdefault(task, {})[str(int(d))] = hist
    return out


# --------------------------------------------------------------------------- noisy advertisers


@dataclass
class AdvertiserVerdict:
    table: pd.DataFrame  # one row per advertiser: stats, z-scores, flagged, action, reliability


def _robust_z(x: np.ndarray, min_scale: float) -> np.ndarray:
    """Median/MAD z-score; min_scale keeps a near-identical population from flagging noise."""
    med = np.median(x)
    scale = max(1.4826 * np.median(np.abs(x - med)), min_scale)
    return (x - med) / scale


def detect_noisy_advertisers(stats: pd.DataFrame, cfg: PrepareConfig) -> AdvertiserVerdict:
    """Flag advertisers whose reported conversions are out of line with the population.

    stats: advertiser_id, clicks, conversions (attributed add_to_cart, all confidences),
    conf_sum (sum of match confidence over their conversions).
    Two robust signals: the conversion rate per click, shrunk toward the global rate so that
    small advertisers are not flagged on noise, as log-odds; and the mean match confidence of
    their conversions (fabricated conversions match users badly), also shrunk. Each becomes a
    median/MAD robust z-score; an advertiser is flagged when z_cvr - z_conf exceeds the
    threshold.
    """
    s = stats.copy()
    k = cfg.outlier_prior_strength
    p0 = s["conversions"].sum() / max(s["clicks"].sum(), 1)
    shrunk = (s["conversions"] + k * p0) / (s["clicks"] + k)
    s["cvr"] = s["conversions"] / s["clicks"].clip(lower=1)
    s["cvr_shrunk"] = shrunk
    s["cvr_logit"] = np.log(shrunk / (1 - shrunk))
    c0 = s["conf_sum"].sum() / max(s["conversions"].sum(), 1)
    kc = 20.0  # pseudo-conversions of prior for the match-confidence mean
    s["match_quality"] = (s["conf_sum"] + kc * c0) / (s["conversions"] + kc)
    s["z_cvr"] = _robust_z(s["cvr_logit"].to_numpy(), min_scale=0.05)
    s["z_match"] = _robust_z(s["match_quality"].to_numpy(), min_scale=0.01)
    s["score"] = s["z_cvr"] - s["z_match"]
    s["flagged"] = s["score"] > cfg.outlier_z_threshold
    s["action"] = np.where(s["flagged"], cfg.outlier_action, "none")
    # Reliability in [0, 1]: 1 = in line with the population, 0 = twice the flag threshold out.
    s["reliability"] = np.clip(
        1.0 - np.maximum(s["score"], 0) / (2 * cfg.outlier_z_threshold), 0, 1
    )
    return AdvertiserVerdict(s)


# --------------------------------------------------------------------------- sampling


def uniform_hash(ids: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """Deterministic U[0, 1) per id (splitmix64), so re-runs sample the same rows."""
    x = ids.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + salt) % 2**64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)


def stratify_rates(counts: dict[str, int], mix: dict[str, float] | None) -> dict[str, float]:
    """Keep rate per task_type so that the kept rows follow the target mix.

    The task_type that is scarcest relative to its target share is kept whole; the others are
    sampled down. Uniform within a task_type, so its label rates are unchanged.
    """
    if not mix:
        return {tt: 1.0 for tt in counts}
    total_share = sum(mix.get(tt, 0.0) for tt in counts)
    ratios = {tt: counts[tt] / (mix[tt] / total_share) for tt in counts if mix.get(tt, 0) > 0}
    if not ratios:
        return {tt: 1.0 for tt in counts}
    budget = min(ratios.values())
    return {
        tt: (min(1.0, budget * mix[tt] / total_share / counts[tt]) if mix.get(tt, 0) > 0 else 0.0)
        for tt in counts
    }


def sample_rows(
    labels: pd.DataFrame,
    ids: np.ndarray,
    task_type: np.ndarray,
    cfg: PrepareConfig,
    strat: dict[str, float],
) -> tuple[np.ndarray, np.ndarray]:
    """(keep mask, weight multiplier) per row.

    Every positive of a sparse task is kept. Negatives of the sparse tasks are kept at
    negative_rate r with weight 1/r. Other rows (e.g. other use-cases, where the sparse tasks
    are unobserved) are kept with weight 1. Stratification keeps a share s of each task_type's
    non-positive rows and gives its positives weight s instead of dropping them, so that within
    a task_type weighted label rates equal the unsampled ones while the task_types' total
    weights follow the target mix.
    """
    sparse = [t for t in cfg.sparse_tasks if t in labels]
    lab = labels[sparse].to_numpy(dtype=float) if sparse else np.zeros((len(labels), 0))
    positive = (lab == 1.0).any(axis=1)
    negative = (~np.isnan(lab)).any(axis=1) & ~positive
    s = np.array([strat.get(tt, 1.0) for tt in task_type]) if strat else np.ones(len(ids))
    keep_strat = uniform_hash(ids, cfg.seed, 2) < s
    keep_neg = uniform_hash(ids, cfg.seed, 1) < cfg.negative_rate
    keep = positive | (keep_strat & (~negative | keep_neg))
    mult = np.where(positive, s, np.where(negative, 1.0 / cfg.negative_rate, 1.0))
    return keep, mult.astype(np.float32)
