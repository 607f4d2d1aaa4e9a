"""Offline metrics in numpy: AUC, grouped AUC, logloss, normalized entropy, ECE, pred/obs.

No sklearn here (it is a test-time reference only). Every metric takes optional sample
weights. ``evaluate`` gives them per task and per task_type as a nested dict.

A ranker is used within one surface and one request, so quality is read within each
task_type (use-case). The AUC over all rows mixes use-cases whose base rates differ (search
click rate 0.5, ads 0.14) and mostly measures those rates: it is kept under the key
``pooled`` and is never an objective (see ``within_use_case_objective``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

EPS = 1e-7
POOLED = "pooled"  # the key of the all-rows (across use-cases) metrics
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. ]")


def group_name(name: str) -> str:
    """A task_type name as a valid MLflow metric path segment: ``<unknown>`` -> ``unknown``.

    MLflow accepts letters, digits, ``_ - . /`` and spaces; anything else becomes ``_``.
    """
    name = str(name).strip("<>") or "unknown"
    return _UNSAFE.sub("_", name)


def _w(y: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    return np.ones(len(y)) if w is None else np.asarray(w, dtype=np.float64)


def auc(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    """ROC AUC, tie-aware (a tied pos/neg pair counts 1/2), optionally weighted.

    = P(score_pos > score_neg) + 1/2 P(tie), over weighted pos x neg pairs; NaN if one class
    is absent. O(n log n): sort once, aggregate weights per distinct score.
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    w = _w(y, w)
    pos_w, neg_w = w * (y > 0.5), w * (y <= 0.5)
    total_pos, total_neg = pos_w.sum(), neg_w.sum()
    if total_pos <= 0 or total_neg <= 0:
        return float("nan")
    uniq, inv = np.unique(p, return_inverse=True)  # sorted distinct scores
    pos_u = np.bincount(inv, weights=pos_w, minlength=len(uniq))
    neg_u = np.bincount(inv, weights=neg_w, minlength=len(uniq))
    neg_below = np.cumsum(neg_u) - neg_u  # negative weight with a strictly lower score
    return float((pos_u * (neg_below + 0.5 * neg_u)).sum() / (total_pos * total_neg))


def grouped_auc(
    y: np.ndarray, p: np.ndarray, group: np.ndarray, w: np.ndarray | None = None
) -> tuple[float, int]:
    """Impression-weighted mean of per-group AUC over groups that have both classes.

    The group is usually the user: it asks whether the model orders one user's items, which
    is what a ranker does for a request. Each group's AUC is weighted by its (weighted)
    impressions. Returns (GAUC, groups used); (NaN, 0) when no group has both classes.
    Vectorized: one lexsort by (group, score), then tie-aware pair counts per group.
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    g = np.asarray(group)
    w = _w(y, w)
    if not len(y):
        return float("nan"), 0
    order = np.lexsort((p, g))
    y, p, g, w = y[order], p[order], g[order], w[order]
    # one run per distinct (group, score): ties share a run
    new_run = np.ones(len(y), dtype=bool)
    new_run[1:] = (g[1:] != g[:-1]) | (p[1:] != p[:-1])
    run = np.cumsum(new_run) - 1
    pos_r = np.bincount(run, weights=w * (y > 0.5))
    neg_r = np.bincount(run, weights=w * (y <= 0.5))
    run_group = g[new_run]
    new_group = np.ones(len(run_group), dtype=bool)
    new_group[1:] = run_group[1:] != run_group[:-1]
    gid = np.cumsum(new_group) - 1  # group index of every run
    neg_cum = np.cumsum(neg_r)
    group_start = np.flatnonzero(new_group)
    neg_before_group = (neg_cum - neg_r)[group_start][gid]  # negatives of earlier groups
    neg_below = neg_cum - neg_r - neg_before_group  # negatives of this group scored lower
    pairs = np.bincount(gid, weights=pos_r * (neg_below + 0.5 * neg_r))
    pos_g, neg_g = np.bincount(gid, weights=pos_r), np.bincount(gid, weights=neg_r)
    ok = (pos_g > 0) & (neg_g > 0)
    if not ok.any():
        return float("nan"), 0
    per_group = pairs[ok] / (pos_g[ok] * neg_g[ok])
    impressions = (pos_g + neg_g)[ok]
    return float((impressions * per_group).sum() / impressions.sum()), int(ok.sum())


def logloss(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    w = _w(y, w)
    if w.sum() <= 0:
        return float("nan")
    ll = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float((w * ll).sum() / w.sum())


def normalized_entropy(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    """Logloss / logloss of always predicting the (weighted) base rate; < 1 beats the prior."""
    y = np.asarray(y, dtype=np.float64)
    w = _w(y, w)
    if w.sum() <= 0:
        return float("nan")
    rate = (w * y).sum() / w.sum()
    if rate <= 0 or rate >= 1:
        return float("nan")
    base = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    return logloss(y, p, w) / base


def expected_calibration_error(
    y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None, bins: int = 10
) -> float:
    """sum_b W_b / W * |mean prediction_b - mean label_b| over equal-width probability bins."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    w = _w(y, w)
    if w.sum() <= 0:
        return float("nan")
    b = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    pb = np.bincount(b, weights=w * p, minlength=bins)
    yb = np.bincount(b, weights=w * y, minlength=bins)
    return float(np.abs(pb - yb).sum() / w.sum())


def pred_obs_ratio(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    """Sum of predictions / sum of labels (1.0 = calibrated on average)."""
    w = _w(np.asarray(y), w)
    obs = (w * np.asarray(y, dtype=np.float64)).sum()
    return float((w * np.asarray(p, dtype=np.float64)).sum() / obs) if obs > 0 else float("nan")


def binary_metrics(
    y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None, group: np.ndarray | None = None
) -> dict:
    y = np.asarray(y, dtype=np.float64)
    w_ = _w(y, w)
    grouped = {}
    if group is not None:
        gauc, n_groups = grouped_auc(y, p, group, w)
        grouped = {"gauc": gauc, "gauc_groups": n_groups}
    return {
        "count": int(len(y)),
        "weight": float(w_.sum()),
        "positive_rate": float((w_ * y).sum() / w_.sum()) if w_.sum() > 0 else float("nan"),
        "auc": auc(y, p, w),
        "logloss": logloss(y, p, w),
        "ne": normalized_entropy(y, p, w),
        "ece": expected_calibration_error(y, p, w),
        "pred_obs": pred_obs_ratio(y, p, w),
        **grouped,
    }


def evaluate(
    preds: Mapping[str, np.ndarray],  # task -> (n,) probabilities
    labels: np.ndarray,  # (n, T), task order = task_names
    masks: np.ndarray,  # (n, T) bool
    task_names: Sequence[str],
    task_type: np.ndarray | None = None,  # (n,) int ids, 0 = unknown
    task_type_names: Sequence[str] | None = None,  # id -> name (FeatureLayout.task_types)
    weight: np.ndarray | None = None,  # (n,)
    group: np.ndarray | None = None,  # (n,) e.g. user ids: adds grouped AUC per task_type
) -> dict[str, dict[str, dict]]:
    """{task: {"pooled": metrics, <task_type>: metrics, ...}} over rows where the label exists.

    Task types with no observed label for a task are omitted for that task. Task-type keys
    are ``group_name``s (valid MLflow names); a dataset without a task_type column has one
    group, ``unknown``. Grouped AUC is computed within each task_type, not pooled.
    """
    labels, masks = np.asarray(labels), np.asarray(masks, dtype=bool)
    w = None if weight is None else np.asarray(weight)
    g = None if group is None else np.asarray(group)
    out: dict[str, dict[str, dict]] = {}
    for j, task in enumerate(task_names):
        m = masks[:, j]
        p = np.asarray(preds[task], dtype=np.float64)
        y = labels[:, j]
        res = {POOLED: binary_metrics(y[m], p[m], None if w is None else w[m])}
        if task_type is not None:
            tt = np.asarray(task_type)
            names = task_type_names or [str(i) for i in range(int(tt.max()) + 1)]
            for k in np.unique(tt[m]):
                sel = m & (tt == k)
                res[group_name(names[k])] = binary_metrics(
                    y[sel], p[sel], None if w is None else w[sel], None if g is None else g[sel]
                )
        out[task] = res
    return out


def within_use_case_objective(
    metrics: Mapping[str, Mapping[str, Mapping]],
    task_weights: Mapping[str, float],
    task_type_weights: Mapping[str, float] | None = None,
    metric: str = "auc",
) -> float:
    """Weighted mean over tasks of each task's weighted mean over its task_types of a ranking
    metric (``auc`` or ``gauc``) measured within that task_type.

    So ``{click: 0.5, checkout: 0.5}`` gives checkout half the objective even though it is
    observed on one use-case and click on five. Task types weigh 1.0 each unless
    ``task_type_weights`` is given (then a missing task_type weighs 0). Cells whose metric is
    not finite (one class only) are left out and the rest renormalized; -inf when no cell is
    left. The pooled AUC never enters: it would reward the base-rate gaps between use-cases.
    """
    num = den = 0.0
    for task, by_type in metrics.items():
        wt = task_weights.get(task, 0.0)
        t_num = t_den = 0.0
        for tt, m in by_type.items():
            wtt = 1.0 if task_type_weights is None else task_type_weights.get(tt, 0.0)
            v = m.get(metric)
            if tt != POOLED and wtt > 0 and v is not None and math.isfinite(v):
                t_num, t_den = t_num + wtt * v, t_den + wtt
        if wt > 0 and t_den > 0:
            num, den = num + wt * t_num / t_den, den + wt
    return num / den if den > 0 else float("-inf")
