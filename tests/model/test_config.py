"""The config tree: every shipped YAML loads; overrides; errors name the file and field path."""

from pathlib import Path

import pytest
import yaml

from model.config import ConfigError, UnirankConfig, UseCaseConfig, load_config

pytestmark = pytest.mark.unit
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# configs/k8s/ holds overlay settings validated by tests/k8s.
ALL_YAML = sorted([*CONFIGS.glob("*.yaml"), *CONFIGS.glob("use_cases/*.yaml")])


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads(path):
    if path.parent.name == "use_cases":
        UseCaseConfig.model_validate(yaml.safe_load(path.read_text()))
    else:
        cfg = load_config(path)
        assert isinstance(cfg, UnirankConfig)
        # The resolved config round-trips through YAML unchanged.
        again = UnirankConfig.model_validate(yaml.safe_load(cfg.to_yaml()))
        assert again == cfg


def test_shipped_configs_exist():
    names = {p.name for p in ALL_YAML}
    assert {"synthetic_ads.yaml", "movielens.yaml", "byo_example.yaml", "smoke.yaml"} <= names


def test_overrides_set_nested_fields_and_list_items():
    cfg = load_config(
        CONFIGS / "movielens.yaml",
        ["train.lr=0.01", "dataset.tasks.1.weight=3", "model.backbones=[cross]", "serve.port=9001"],
    )
    assert cfg.train.lr == 0.01
    assert cfg.task("engage").weight == 3.0
    assert cfg.model.backbones == ["cross"]
    assert cfg.serve.port == 9001


def test_base_file_is_merged_and_overridden():
    smoke = load_config(CONFIGS / "smoke.yaml")
    full = load_config(CONFIGS / "synthetic_ads.yaml")
    assert smoke.generate.num_impressions < full.generate.num_impressions
    assert smoke.generate.noisy_advertiser_fraction == full.generate.noisy_advertiser_fraction


def _write(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_file_and_path(tmp_path):
    p = _write(tmp_path, "train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(p) in str(err.value)
    assert "train.learning_rate: unknown key" in str(err.value)


def test_wrong_type_names_path_and_value(tmp_path):
    p = _write(tmp_path, "train:\n  epochs: many\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert "train.epochs" in str(err.value) and "'many'" in str(err.value)


def test_missing_required_field(tmp_path):
    p = _write(tmp_path, "dataset:\n  tasks:\n    - {loss: bce}\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert "dataset.tasks.0.name: required field missing" in str(err.value)


def test_bad_override_is_an_error():
    with pytest.raises(ConfigError, match="train.nope: unknown key"):
        load_config(None, ["train.nope=1"])
    with pytest.raises(ConfigError, match="expected section.field=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="list index"):
        load_config(None, ["dataset.tasks.7.weight=1"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="share_with 'nope' is not a feature"):
        load_config(None, ["dataset.features.categorical.2.share_with=nope"])
    with pytest.raises(ConfigError, match="train.objective: 'revenue' is not in dataset.tasks"):
        load_config(None, ["train.objective={revenue: 1.0}"])
    with pytest.raises(ConfigError, match="objective_task_types: 'sports' is not in dataset"):
        load_config(None, ["train.objective_task_types={sports: 1.0}"])
    with pytest.raises(ConfigError, match="objective.click: expected a finite weight >= 0"):
        load_config(None, ["train.objective={click: .nan}"])
    with pytest.raises(ConfigError, match="train.objective: at least one weight must be > 0"):
        load_config(None, ["train.objective={click: 0.0}"])
    with pytest.raises(ConfigError, match="objective_metric"):
        load_config(None, ["train.objective_metric=pooled_auc"])
    ok = load_config(None, ["train.objective_task_types={ads: 2.0, unknown: 1.0}"]).train
    assert ok.objective_task_types == {"ads": 2.0, "unknown": 1.0}
    with pytest.raises(ConfigError, match="exactly one of vocab_size, hash_buckets"):
        load_config(None, ["dataset.features.categorical.0.vocab_size=10"])


def test_flat_view_for_mlflow():
    flat = load_config(None).flat()
    assert flat["train.lr"] == load_config(None).train.lr
    assert flat["dataset.tasks.0.name"] == "click"


def test_base_chain_is_resolved_recursively():
    tune = load_config(CONFIGS / "tune_smoke.yaml")
    smoke = load_config(CONFIGS / "smoke.yaml")
    assert tune.dataset.train == smoke.dataset.train  # from the grandparent
    assert tune.model.embedding_dim == load_config(CONFIGS / "train_smoke.yaml").model.embedding_dim
    assert tune.train.epochs == 2 and tune.tune.num_samples == 4


def test_circular_base_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")
