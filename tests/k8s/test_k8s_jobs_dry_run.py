"""Every rendered RayJob can start: its entrypoint, run with --dry-run against the rendered
ConfigMap config and the pod environment of the rendered env ConfigMap, resolves every input
and output (no job starts without data) -- and an empty location fails before Ray starts."""

from __future__ import annotations

import importlib
import json
import shlex
from pathlib import Path

import pytest
import yaml

from k8s.jobs import CONFIG_PATH, JOBS
from k8s.render import render
from k8s.settings import SETTINGS_DIR

# Any attempt to start or join Ray during a test fails it (tests/conftest.py: refuse_ray).
pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("refuse_ray")]


def _docs(directory: Path) -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in sorted(directory.rglob("*.yaml"))]


def _pod(directory: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The mounted config file and the environment every Ray pod of the overlay gets."""
    maps = {d["metadata"]["name"]: d["data"] for d in _docs(directory) if d["kind"] == "ConfigMap"}
    config = tmp_path / "unirank.yaml"
    config.write_text(maps["unirank-config"]["unirank.yaml"])
    return config, maps["unirank-env"]


def _dry_run(entrypoint: str, config: Path, env: dict, monkeypatch, capsys):
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"] and argv[3] == CONFIG_PATH, entrypoint
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(argv[2]).main([str(config), *argv[4:], "--dry-run"])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return exit_.value.code or 0, json.loads(lines[-1])["dry_run"] if lines else None, err


def _locations(report: dict) -> list[str]:
    out = []
    for value in [*report["inputs"].values(), *report["outputs"].values()]:
        out += value if isinstance(value, list) else [value]
    return out


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_rendered_rayjob_resolves_its_data(rendered, overlay, tmp_path, monkeypatch, capsys):
    config, env = _pod(rendered[overlay], tmp_path)
    jobs = [d for d in _docs(rendered[overlay] / "jobs") if d["kind"] == "RayJob"]
    assert {d["metadata"]["name"] for d in jobs} >= {"unirank-train", "unirank-user-embeddings"}
    for doc in jobs:
        name = doc["metadata"]["name"]
        code, report, err = _dry_run(doc["spec"]["entrypoint"], config, env, monkeypatch, capsys)
        assert code == 0, (name, err)
        for loc in _locations(report):
            assert loc.startswith(("s3://", "models:/")), (name, loc)
        # the storage endpoint comes from the pod environment, the tracking URI from config
        assert report["endpoints"]["storage.endpoint_url"] == env["AWS_ENDPOINT_URL_S3"], name
        uri = report["endpoints"].get("mlflow.tracking_uri")
        assert uri is None or uri == env["MLFLOW_TRACKING_URI"], (name, uri)
        if report["job"] in ("train", "evaluate", "export", "tune"):
            assert uri is not None and uri.startswith("http"), name
    assert len(jobs) == sum(1 for j in JOBS.values() if importlib.util.find_spec(j.module))


def test_a_cluster_without_dataset_locations_fails_naming_the_field(tmp_path, monkeypatch, capsys):
    """What configs/k8s/base.yaml rendered before it set dataset.*: train cannot start."""
    settings = tmp_path / "settings"
    settings.mkdir()
    base = yaml.safe_load((SETTINGS_DIR / "base.yaml").read_text())
    base["config_overrides"] = [o for o in base["config_overrides"] if not o.startswith("dataset.")]
    (settings / "base.yaml").write_text(yaml.safe_dump(base))
    (settings / "dev.yaml").write_text("namespace: x\n")
    monkeypatch.setattr("k8s.kustomize.load_settings", _loader(settings))
    out = tmp_path / "render"
    render("dev", out)
    config, env = _pod(out, tmp_path)
    train = yaml.safe_load((out / "jobs" / "rayjob-unirank-train.yaml").read_text())
    code, report, err = _dry_run(train["spec"]["entrypoint"], config, env, monkeypatch, capsys)
    assert code == 2 and report is None
    assert "error: --dry-run: train: input dataset.train is empty ([])" in err


def _loader(directory: Path):
    from k8s.settings import load_settings

    return lambda layer: load_settings(layer, directory)
