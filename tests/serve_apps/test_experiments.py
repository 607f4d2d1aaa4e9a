"""Experiment config and arm assignment: deterministic per (user, salt), shares respected,
a new salt reshuffles, bad configs are refused naming the field."""

import os
import subprocess
import sys

import numpy as np
import pytest

from model.config import ConfigError, ExperimentConfig, UseCaseConfig, config_from_dict
from serve_apps.experiments import assign_arm, user_position

pytestmark = pytest.mark.unit


def experiment(**kw) -> ExperimentConfig:
    base = {
        "id": "ads-2026-12",
        "salt": "s1",
        "arms": [
            {"name": "champion", "share": 0.8},
            {"name": "challenger", "share": 0.1, "model_uri": "models:/unirank/7"},
            {"name": "holdout", "share": 0.1, "policy": "popularity"},
        ],
    }
    return ExperimentConfig.model_validate({**base, **kw})


def test_users_get_their_arm_in_proportion_and_always_the_same_one():
    exp = experiment()
    users = np.arange(1, 40_001)
    arms = [assign_arm(int(u), exp).name for u in users]
    shares = {n: arms.count(n) / len(arms) for n in ("champion", "challenger", "holdout")}
    # 40k users: the binomial sd of a 10% share is 0.15 points
    assert shares["champion"] == pytest.approx(0.8, abs=0.01)
    assert shares["challenger"] == pytest.approx(0.1, abs=0.006)
    assert shares["holdout"] == pytest.approx(0.1, abs=0.006)
    assert [assign_arm(int(u), exp).name for u in users[:500]] == arms[:500]  # stable


def test_a_new_salt_reshuffles_and_a_zero_share_gets_nobody():
    a, b = experiment(), experiment(salt="s2")
    users = range(1, 5001)
    same = np.mean([assign_arm(u, a).name == assign_arm(u, b).name for u in users])
    assert same < 0.75  # independent assignments agree with prob 0.8^2 + 2 * 0.1^2 = 0.66
    off = experiment(
        arms=[
            {"name": "champion", "share": 1.0},
            {"name": "challenger", "share": 0.0, "model_uri": "models:/unirank/7"},
        ]
    )
    assert {assign_arm(u, off).name for u in users} == {"champion"}


def test_positions_are_uniform_and_independent_of_the_process():
    pos = np.asarray([user_position(u, "s1") for u in range(20_000)])
    assert ((pos >= 0) & (pos < 1)).all()
    counts, _ = np.histogram(pos, bins=10, range=(0, 1))
    assert counts.min() > 1800 and counts.max() < 2200
    assert user_position(42, "s1") == user_position(42, "s1")
    assert user_position(42, "s1") != user_position(42, "s2")
    # another process with another hash seed puts the user in the same place
    code = "from serve_apps.experiments import user_position as p; print(repr(p(42, 's1')))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert float(out.stdout) == user_position(42, "s1"), out.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        ({"arms": [{"name": "champion", "share": 0.5}, {"name": "b", "share": 0.4}]}, "sum to"),
        ({"control": "nope"}, "control 'nope' is not an arm"),
        (
            {"arms": [{"name": "champion", "share": 0.5}, {"name": "champion", "share": 0.5}]},
            "repeat",
        ),
        (
            {
                "arms": [
                    {"name": "champion", "share": 0.5},
                    {"name": "h", "share": 0.5, "policy": "popularity", "model_uri": "x"},
                ]
            },
            "popularity arm takes no model_uri",
        ),
        ({"alpha": 0.0}, "alpha"),
        ({"guardrails": [{"metric": "revenue"}]}, "metric"),
    ],
)
def test_bad_experiments_are_refused_naming_the_problem(change, message):
    uc = {"name": "ads", "route_prefix": "/ads", "experiment": {
        "id": "e", "salt": "s", "arms": [{"name": "champion", "share": 0.5},
                                         {"name": "challenger", "share": 0.5}], **change}}  # fmt: skip
    with pytest.raises(ConfigError, match=message) as err:
        config_from_dict({"use_cases": [uc]}, "test")
    assert "use_cases.0.experiment" in str(err.value)
    UseCaseConfig.model_validate({"name": "ads", "route_prefix": "/ads"})  # none: fine
