"""Offline metrics in numpy: AUC, logloss, normalized entropy, ECE, predicted/observed.

No sklearn here (it is a test-time reference only). Every metric takes optional sample
weights. ``evaluate`` gives them per task and per task_type as a nested dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

EPS = 1e-7


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


def binary_metrics(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> dict:
    y = np.asarray(y, dtype=np.float64)
    w_ = _w(y, w)
    return {
        "count": int(len(y)),
        "weight": float(w_.sum()),
        "positive_rate": float((w_ * y).sum() / w_.sum()) if w_.sum() > 0 else float("nan"),
        "auc": auc(y, p, w),
        "logloss": logloss(y, p, w),
        "ne": normalized_entropy(y, p, w),
        "ece": expected_calibration_error(y, p, w),
        "pred_obs": pred_obs_ratio(y, p, w),
    }


def evaluate(
    preds: Mapping[str, np.ndarray],  # task -> (n,) probabilities
    labels: np.ndarray,  # (n, T), task order = task_names
    masks: np.ndarray,  # (n, T) bool
    task_names: Sequence[str],
    task_type: np.ndarray | None = None,  # (n,) int ids, 0 = unknown
    task_type_names: Sequence[str] | None = None,  # id -> name (FeatureLayout.task_types)
    weight: np.ndarray | None = None,  # (n,)
) -> dict[str, dict[str, dict]]:
    """{task: {"all": metrics, <task_type>: metrics, ...}} over rows where the label exists.

    Task types with no observed label for a task are omitted for that task.
    """
    labels, masks = np.asarray(labels), np.asarray(masks, dtype=bool)
    out: dict[str, dict[str, dict]] = {}
    for j, task in enumerate(task_names):
        m = masks[:, j]
        p = np.asarray(preds[task], dtype=np.float64)
        y = labels[:, j]
        w = None if weight is None else np.asarray(weight)
        res = {"all": binary_metrics(y[m], p[m], None if w is None else w[m])}
        if task_type is not None:
            tt = np.asarray(task_type)
            names = task_type_names or [str(i) for i in range(int(tt.max()) + 1)]
            for k in np.unique(tt[m]):
                sel = m & (tt == k)
                res[str(names[k])] = binary_metrics(y[sel], p[sel], None if w is None else w[sel])
        out[task] = res
    return out
