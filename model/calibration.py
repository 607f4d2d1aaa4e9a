"""Post-hoc calibration per task (optionally per task_type), in numpy, serializable to JSON.

Fitted on validation predictions. Two methods:
* isotonic: pool-adjacent-violators (PAV) on (prediction, label), applied by linear
  interpolation between fitted block ends (as sklearn's IsotonicRegression, clip at ends);
* platt: p' = sigmoid(a * logit(p) + b), fitted by weighted Newton steps.

Then the negative down-sampling correction. If training (and validation) kept each negative
with probability r, the model learned odds inflated by 1/r; the true probability is

    p' = p / (p + (1 - p) / r)

r = 1 means no down-sampling (identity).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

EPS = 1e-7


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(s: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0, -s))  # no overflow for large |s|


def downsample_correction(p: np.ndarray, neg_keep_rate: float) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if not 0 < neg_keep_rate <= 1:
        raise ValueError(f"neg_keep_rate must be in (0, 1], got {neg_keep_rate}")
    return p / (p + (1 - p) / neg_keep_rate)


def pav(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted isotonic (non-decreasing) fit of y on x.

    Returns (knots_x, knots_y) for np.interp: two knots per pooled block (its lowest and
    highest x), so predictions are constant within a block and linear between blocks.
    """
    order = np.argsort(x, kind="mergesort")
    x, y, w = x[order], y[order], w[order]
    # Equal x must get one value: aggregate them first (also shrinks the loop below).
    ux, inv = np.unique(x, return_inverse=True)
    ws = np.bincount(inv, weights=w)
    ys = np.bincount(inv, weights=w * y) / np.maximum(ws, 1e-300)
    # Stack of blocks: (mean, weight, first index, last index); merge while decreasing.
    mean, weight, lo, hi = [], [], [], []
    for i in range(len(ux)):
        m, wt, a = ys[i], ws[i], i
        while mean and mean[-1] >= m:
            pw = weight.pop()
            m = (mean.pop() * pw + m * wt) / (pw + wt)
            wt += pw
            a = lo.pop()
            hi.pop()
        mean.append(m)
        weight.append(wt)
        lo.append(a)
        hi.append(i)
    kx = np.empty(2 * len(mean))
    ky = np.empty(2 * len(mean))
    kx[0::2], kx[1::2] = ux[lo], ux[hi]
    ky[0::2] = ky[1::2] = mean
    return kx, ky


class IsotonicCalibrator:
    kind = "isotonic"

    def __init__(
        self, knots_x: Sequence[float] = (0.0, 1.0), knots_y: Sequence[float] = (0.0, 1.0)
    ):
        self.knots_x = np.asarray(knots_x, dtype=np.float64)
        self.knots_y = np.asarray(knots_y, dtype=np.float64)

    def fit(self, p: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> IsotonicCalibrator:
        w = np.ones(len(p)) if w is None else np.asarray(w, dtype=np.float64)
        self.knots_x, self.knots_y = pav(np.asarray(p, np.float64), np.asarray(y, np.float64), w)
        return self

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return np.interp(np.asarray(p, dtype=np.float64), self.knots_x, self.knots_y)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "x": self.knots_x.tolist(), "y": self.knots_y.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping) -> IsotonicCalibrator:
        return cls(d["x"], d["y"])


class PlattCalibrator:
    kind = "platt"

    def __init__(self, a: float = 1.0, b: float = 0.0):
        self.a, self.b = float(a), float(b)

    def fit(
        self, p: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, iters: int = 50
    ) -> PlattCalibrator:
        z = _logit(np.asarray(p, dtype=np.float64))
        y = np.asarray(y, dtype=np.float64)
        w = np.ones(len(z)) if w is None else np.asarray(w, dtype=np.float64)
        x = np.stack([z, np.ones_like(z)], 1)  # (n, 2)
        ridge = 1e-6 * np.eye(2)  # keeps the Hessian invertible on separable data

        def nll(t: np.ndarray) -> float:
            s = x @ t
            return float((w * (np.logaddexp(0, s) - y * s)).sum())

        theta = np.array([1.0, 0.0])
        current = nll(theta)
        for _ in range(iters):
            q = _sigmoid(x @ theta)
            grad = x.T @ (w * (q - y))
            hess = (x * (w * q * (1 - q))[:, None]).T @ x + ridge
            step = np.linalg.solve(hess, grad)
            # Damped Newton: halve the step until the loss does not increase.
            for _ in range(30):
                cand = nll(theta - step)
                if cand <= current:
                    break
                step = step / 2
            theta, current = theta - step, min(cand, current)
            if np.abs(step).max() < 1e-10:
                break
        self.a, self.b = float(theta[0]), float(theta[1])
        return self

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return _sigmoid(self.a * _logit(np.asarray(p, dtype=np.float64)) + self.b)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "a": self.a, "b": self.b}

    @classmethod
    def from_dict(cls, d: Mapping) -> PlattCalibrator:
        return cls(d["a"], d["b"])


class IdentityCalibrator:
    kind = "none"

    def fit(self, p, y, w=None) -> IdentityCalibrator:
        return self

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return np.asarray(p, dtype=np.float64)

    def to_dict(self) -> dict:
        return {"kind": self.kind}

    @classmethod
    def from_dict(cls, d: Mapping) -> IdentityCalibrator:
        return cls()


METHODS = {c.kind: c for c in (IsotonicCalibrator, PlattCalibrator, IdentityCalibrator)}


def _from_dict(d: Mapping):
    if d["kind"] not in METHODS:
        raise ValueError(f"unknown calibrator kind {d['kind']!r}, expected one of {list(METHODS)}")
    return METHODS[d["kind"]].from_dict(d)


class TaskCalibrator:
    """One task: a global calibrator, optional per-task_type ones, then the r-correction."""

    def __init__(
        self, default, by_task_type: Mapping[str, object] | None = None, neg_keep_rate: float = 1.0
    ):
        self.default = default
        self.by_task_type = dict(by_task_type or {})
        self.neg_keep_rate = float(neg_keep_rate)

    def __call__(
        self, p: np.ndarray, task_type: Sequence[str] | np.ndarray | None = None
    ) -> np.ndarray:
        p = np.asarray(p, dtype=np.float64)
        out = self.default(p)
        if task_type is not None and self.by_task_type:
            tt = np.asarray(task_type, dtype=object)
            for name, cal in self.by_task_type.items():
                sel = tt == name
                if sel.any():
                    out[sel] = cal(p[sel])
        return downsample_correction(out, self.neg_keep_rate)

    def to_dict(self) -> dict:
        return {
            "default": self.default.to_dict(),
            "by_task_type": {k: v.to_dict() for k, v in self.by_task_type.items()},
            "neg_keep_rate": self.neg_keep_rate,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> TaskCalibrator:
        return cls(
            _from_dict(d["default"]),
            {k: _from_dict(v) for k, v in d.get("by_task_type", {}).items()},
            d.get("neg_keep_rate", 1.0),
        )


class Calibrators:
    """Calibrators for every task; the JSON file that ships with an exported model."""

    def __init__(self, tasks: Mapping[str, TaskCalibrator] | None = None):
        self.tasks = dict(tasks or {})

    @classmethod
    def identity(cls, task_names: Sequence[str]) -> Calibrators:
        return cls({t: TaskCalibrator(IdentityCalibrator()) for t in task_names})

    @classmethod
    def fit(
        cls,
        preds: Mapping[str, np.ndarray],  # task -> (n,) validation probabilities
        labels: np.ndarray,  # (n, T)
        masks: np.ndarray,  # (n, T) bool
        task_names: Sequence[str],
        method: str = "isotonic",
        task_type: Sequence[str] | np.ndarray | None = None,  # (n,) task_type names
        per_task_type: bool = False,
        min_rows: int = 200,
        neg_keep_rate: float | Mapping[str, float] = 1.0,
        weight: np.ndarray | None = None,
    ) -> Calibrators:
        """Fit on validation rows where each task's label exists.

        Per-task_type calibrators are fitted only for task types with >= ``min_rows``
        labelled rows; the others fall back to the task's global calibrator.
        """
        if method not in METHODS:
            raise ValueError(f"calibration method must be one of {list(METHODS)}, got {method!r}")
        labels, masks = np.asarray(labels), np.asarray(masks, dtype=bool)
        tt = None if task_type is None else np.asarray(task_type, dtype=object)
        out = {}
        for j, task in enumerate(task_names):
            m = masks[:, j]
            p, y = np.asarray(preds[task], np.float64), labels[:, j].astype(np.float64)
            w = np.ones(len(p)) if weight is None else np.asarray(weight, np.float64)
            default = METHODS[method]().fit(p[m], y[m], w[m])
            by_type = {}
            if per_task_type and tt is not None:
                for name in np.unique(tt[m]):
                    sel = m & (tt == name)
                    if sel.sum() >= min_rows:
                        by_type[str(name)] = METHODS[method]().fit(p[sel], y[sel], w[sel])
            r = (
                neg_keep_rate.get(task, 1.0)
                if isinstance(neg_keep_rate, Mapping)
                else neg_keep_rate
            )
            out[task] = TaskCalibrator(default, by_type, r)
        return cls(out)

    def apply(
        self, preds: Mapping[str, np.ndarray], task_type: Sequence[str] | np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        return {
            t: (self.tasks[t](p, task_type) if t in self.tasks else np.asarray(p, np.float64))
            for t, p in preds.items()
        }

    def to_dict(self) -> dict:
        return {"version": 1, "tasks": {t: c.to_dict() for t, c in self.tasks.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> Calibrators:
        return cls({t: TaskCalibrator.from_dict(c) for t, c in d["tasks"].items()})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Calibrators:
        return cls.from_dict(json.loads(Path(path).read_text()))
