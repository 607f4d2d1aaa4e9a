"""The rollout's config side, without Ray: only ``user_config`` changes (so Serve's code
version, and with it every replica, stays), the user_config is checked, ``--dry-run``."""

from __future__ import annotations

import json

import pytest
from ray.serve._private.deploy_utils import get_app_code_version
from ray.serve.schema import ServeDeploySchema

from model.config import ConfigError
from serve_apps import rollout
from serve_apps.deploy_config import build_serve_config, load_use_cases, parse_rollout, with_rollout

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("refuse_ray")]


def test_a_rollout_changes_user_config_only(exported):
    model_dir, cfg = exported
    use_cases = load_use_cases("configs/use_cases")
    base = build_serve_config(cfg, use_cases, model_uri="models:/unirank@champion")
    one = with_rollout(base, "models:/unirank/1", "unirank/1")
    two = with_rollout(one, "models:/unirank/2", "unirank/2")
    apps = [ServeDeploySchema.model_validate(c).applications for c in (one, two)]
    for a, b in zip(*apps, strict=True):
        assert get_app_code_version(a) == get_app_code_version(b)  # Serve: lightweight update
        assert {d.user_config["model_version"] for d in b.deployments} == {"unirank/2"}
    assert [d.user_config for d in apps[0][0].deployments] == [
        {"model_uri": "models:/unirank/1", "model_version": "unirank/1"}
    ] * 2
    assert "user_config" not in base["applications"][0]["deployments"][0]  # input untouched


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (None, "must be {model_uri, model_version}"),
        ({"model_uri": "x"}, "must be {model_uri, model_version}"),
        ({"model_uri": "", "model_version": "v"}, "user_config.model_uri must be a non-empty"),
        ({"model_uri": "x", "model_version": 3}, "user_config.model_version must be a non-empty"),
    ],
)
def test_bad_user_config_names_the_key(config, match):
    with pytest.raises(ConfigError, match=match):
        parse_rollout(config)


def test_dry_run_pins_without_ray(exported, capsys):
    model_dir, _ = exported
    assert rollout.main(["--model-uri", str(model_dir), "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)["dry_run"]
    assert out["model_uri"] == str(model_dir) and len(out["model_version"]) == 12  # digest
    with pytest.raises(SystemExit) as e:
        rollout.main(["--model-uri", str(model_dir / "nope"), "--dry-run"])
    assert e.value.code == 2 and "not an exported model directory" in capsys.readouterr().err
