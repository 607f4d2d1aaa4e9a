"""Pure pieces of the training job: objective, LR schedule, state, report helpers."""

import math

import numpy as np
import pytest

from model.config import TrainConfig
from ray_jobs.evaluate import bootstrap_delta, label_correlation
from ray_jobs.train import _abs_sqlite
from ray_jobs.train_loop import TrainState, flat_metrics, lr_lambda, objective_value

pytestmark = pytest.mark.unit


def test_objective_is_weighted_within_use_case_auc_and_skips_nan_cells():
    m = {
        "click": {"pooled": {"auc": 0.99}, "ads": {"auc": 0.7}, "unknown": {"auc": 0.6}},
        "checkout": {"pooled": {"auc": 0.1}, "ads": {"auc": 0.9}},
    }
    t = TrainConfig(objective={"click": 1.0, "checkout": 3.0})
    assert objective_value(m, t) == pytest.approx((1 * (0.7 + 0.6) / 2 + 3 * 0.9) / 4)
    # task_type weights as configured (rows without a task_type form the "unknown" group)
    t2 = TrainConfig(objective={"click": 1.0}, objective_task_types={"unknown": 1.0})
    assert objective_value(m, t2) == pytest.approx(0.6)
    m["checkout"]["ads"]["auc"] = float("nan")
    assert objective_value(m, t) == pytest.approx(0.65)  # checkout has no finite cell left
    assert objective_value({}, TrainConfig()) == float("-inf")


def test_lr_schedules():
    warm = lr_lambda(TrainConfig(lr_schedule="cosine", warmup_steps=10), 110)
    assert warm(0) == pytest.approx(0.1) and warm(9) == pytest.approx(1.0)
    assert warm(60) == pytest.approx(0.5) and warm(110) == pytest.approx(0.0, abs=1e-9)
    const = lr_lambda(TrainConfig(lr_schedule="linear_warmup", warmup_steps=4), 100)
    assert const(1) == pytest.approx(0.5) and const(50) == 1.0


def test_state_round_trips_with_no_best_yet():
    s = TrainState(history=[{"epoch": 1}], starts=[0])
    back = TrainState.from_json(s.to_json())
    assert back.best_objective == float("-inf") and back.history == [{"epoch": 1}]


def test_flat_metrics_names():
    flat = flat_metrics(
        "val",
        {"click": {"pooled": {"auc": 0.6, "ne": math.nan}, "ads": {"auc": 0.5, "gauc": 0.55}}},
    )
    assert flat == {
        "val/click/pooled/auc": 0.6,
        "val/click/ads/auc": 0.5,
        "val/click/ads/gauc": 0.55,
    }


def test_label_correlation_and_bootstrap():
    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.3).astype(float)
    labels = np.stack([y, y, 1 - y], 1)
    masks = np.ones_like(labels, dtype=bool)
    masks[:1000, 2] = False
    c = label_correlation({"labels": labels, "masks": masks}, ["a", "b", "c"])
    assert c["corr"][0][1] == 1.0 and c["corr"][0][2] == -1.0 and c["rows"][0][2] == 1000
    good = y + rng.normal(0, 0.5, len(y))
    bad = y + rng.normal(0, 2.0, len(y))
    d = bootstrap_delta(y, good, bad, np.ones(len(y)), 100, seed=1)
    lo, hi = d["ci95"]
    assert 0 < lo <= d["delta"] <= hi


def test_relative_sqlite_uri_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _abs_sqlite("sqlite:///out/mlflow.db") == f"sqlite:///{tmp_path}/out/mlflow.db"
    assert _abs_sqlite("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_a_recorded_objective_counts_only_if_measured_the_same_way():
    """An old champion that cannot be rescored keeps its recorded objective only when it was
    measured on validation with today's definition; a test-split or pooled figure is not
    comparable (the champion is then kept)."""
    import json

    from model.config import load_config
    from ray_jobs.evaluate import objective_definition
    from ray_jobs.export import recorded_objective

    cfg = load_config(None)
    same = {"objective": "0.61", "objective_split": "validation",
            "objective_definition": json.dumps(objective_definition(cfg))}  # fmt: skip
    assert recorded_objective(same, cfg, "validation") == pytest.approx(0.61)
    assert recorded_objective({**same, "objective_split": "test"}, cfg, "validation") is None
    assert recorded_objective({"objective": "0.9", "objective_split": "validation"}, cfg,
                              "validation") is None  # fmt: skip
