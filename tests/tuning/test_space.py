"""The search space comes from config; sampled points become plain config overrides."""

import pytest
from ray import tune

from model.config import load_config
from tuning.space import SpaceError, param_space, trial_config, trial_overrides

pytestmark = pytest.mark.unit

SPACE = (
    "tune.space={"
    "model.fusion: {choice: [average, gating, blend]},"
    "model.backbones: {choice: [[cross], [cross, attention]]},"
    "loss_weight.checkout: {loguniform: [0.3, 3.0]},"
    "train.lr: {loguniform: [0.0003, 0.01]},"
    "model.dropout: {uniform: [0.0, 0.3]},"
    "model.embedding_dim: {grid: [8, 16]}}"
)


def test_space_maps_to_tune_domains():
    space = param_space(load_config(None, [SPACE]))
    assert isinstance(space["model.fusion"], tune.search.sample.Categorical)
    assert isinstance(space["train.lr"], tune.search.sample.Float)
    assert space["model.embedding_dim"] == {"grid_search": [8, 16]}
    assert set(space["model.backbones"].categories) == {'["cross"]', '["cross", "attention"]'}


def test_point_becomes_a_trial_config():
    cfg = load_config(None, [SPACE])
    point = {
        "model.fusion": "blend",
        "model.backbones": '["cross", "attention"]',
        "loss_weight.checkout": 2.5,
        "train.lr": 0.001,
        "model.dropout": 0.05,
        "model.embedding_dim": 8,
    }
    trial = trial_config(cfg, point)
    assert trial.model.fusion == "blend"
    assert trial.model.backbones == ["cross", "attention"]
    assert trial.task("checkout").weight == 2.5
    assert trial.task("click").weight == cfg.task("click").weight
    assert trial.train.lr == 0.001 and trial.model.embedding_dim == 8
    assert "dataset.tasks.2.weight=2.5" in trial_overrides(cfg, point)


def test_samples_are_valid_configs():
    cfg = load_config(None, [SPACE])
    space = param_space(cfg)
    for _ in range(20):
        point = {
            k: (v.sample() if hasattr(v, "sample") else v["grid_search"][0])
            for k, v in space.items()
        }
        trial_config(cfg, point)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            "{loss_weight.revenue: {uniform: [0, 1]}}",
            "tune.space.loss_weight.revenue: task 'revenue'",
        ),
        ("{train.lr: {normal: [0, 1]}}", "tune.space.train.lr: expected one of"),
        ("{train.lr: {loguniform: [0, 1]}}", "tune.space.train.lr.loguniform: need 0 < low"),
        (
            "{model.fusion: {choice: []}}",
            "tune.space.model.fusion.choice: expected a non-empty list",
        ),
    ],
)
def test_bad_space_names_the_key(space, message):
    with pytest.raises(SpaceError, match=message.replace(".", r"\.").replace("(", r"\(")):
        param_space(load_config(None, [f"tune.space={space}"]))


def test_bad_value_fails_with_field_path():
    cfg = load_config(None, ["tune.space={model.fusion: {choice: [average, mystery]}}"])
    with pytest.raises(Exception, match="model.fusion"):
        trial_config(cfg, {"model.fusion": "mystery"})
