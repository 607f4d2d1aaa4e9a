"""``python -m ray_jobs.registry promote|rollback`` against a real MLflow server: the champion
alias moves, the previous one is remembered with who / when / why, errors name what is
missing. No Ray."""

from __future__ import annotations

import json
import uuid

import pytest

from model.config import load_config
from model.model_dir import pin_model_uri
from ray_jobs.registry import RegistryError, client, main, promote, rollback

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("refuse_ray")]


@pytest.fixture
def registered(mlflow_server):
    """A fresh registered model with three versions (no artifacts: the registry only)."""
    name = f"unirank-registry-{uuid.uuid4().hex[:8]}"
    cfg = load_config(
        None, [f"mlflow.tracking_uri={mlflow_server}", f"mlflow.registered_model={name}"]
    )
    c = client(cfg)
    c.create_registered_model(name)
    for _ in range(3):
        c.create_model_version(name, source="s3://mlflow/artifacts/none")
    return cfg, c, name


def champion(c, name: str, alias: str = "champion") -> str:
    return str(c.get_model_version_by_alias(name, alias).version)


def test_promote_then_rollback_and_undo(registered, capsys):
    cfg, c, name = registered
    first = promote(cfg, 1, reason="first")
    assert (first["champion"], first["previous"], first["changed"]) == ("1", None, True)
    assert (
        main(["promote", "--version", "3", "--reason", "better auc", "--by", "ci", *_cfg(cfg)]) == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["champion"], out["previous"]) == ("3", "1")
    assert champion(c, name) == "3" and champion(c, name, "previous_champion") == "1"
    tags = c.get_model_version(name, "3").tags
    assert tags["unirank.champion.by"] == "ci" and tags["unirank.champion.reason"] == "better auc"
    assert tags["unirank.champion.action"] == "promote" and tags["unirank.champion.replaced"] == "1"
    assert tags["unirank.champion.at"].startswith("20")
    # serving pins the alias to the version it points at now
    assert pin_model_uri(f"models:/{name}@champion", cfg) == (f"models:/{name}/3", f"{name}/3")

    back = rollback(cfg, reason="latency regression")
    assert (back["champion"], back["previous"]) == ("1", "3")
    assert champion(c, name) == "1" and champion(c, name, "previous_champion") == "3"
    assert c.get_model_version(name, "1").tags["unirank.champion.action"] == "rollback"
    assert rollback(cfg)["champion"] == "3"  # a second rollback undoes the first


def test_errors_name_the_version_or_the_missing_previous(registered, capsys):
    cfg, c, name = registered
    with pytest.raises(RegistryError, match=rf"{name}.*no version 9 \(versions: \[3, 2, 1\]\)"):
        promote(cfg, 9)
    with pytest.raises(RegistryError, match="no previous champion.*previous_champion"):
        rollback(cfg)
    promote(cfg, 2)
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(cfg)  # a first champion has nothing before it
    with pytest.raises(SystemExit) as e:
        main(["promote", "--version", "7", *_cfg(cfg)])
    assert e.value.code == 2 and "no version 7" in capsys.readouterr().err
    assert champion(c, name) == "2"  # a failed command moved nothing


def test_dry_run_prints_the_aliases_without_touching_them(registered, capsys):
    cfg, c, name = registered
    with pytest.raises(SystemExit) as e:
        main(["rollback", *_cfg(cfg), "--dry-run"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dry_run"]
    assert e.value.code == 0 and report["job"] == "rollback"
    assert report["inputs"] == {"champion source": f"models:/{name}@previous_champion"}
    assert report["outputs"]["mlflow.champion_alias"] == f"models:/{name}@champion"
    assert not c.get_registered_model(name).aliases


def _cfg(cfg) -> list[str]:
    m = cfg.mlflow
    return [
        f"mlflow.tracking_uri={m.tracking_uri}",
        f"mlflow.registered_model={m.registered_model}",
    ]
