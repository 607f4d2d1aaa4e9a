"""monitoring/: the Grafana dashboard and the Prometheus rules parse and use our metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from serve_apps.dashboard import dashboard
from serve_apps.metrics import METRICS

pytestmark = pytest.mark.unit
MON = Path(__file__).resolve().parents[2] / "monitoring"
SUFFIX = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
KNOWN = {f"ray_{n}{s}" for n, (kind, _, _) in METRICS.items() for s in SUFFIX[kind]}


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bray_unirank_[a-z_]+", expr))


def test_dashboard_json_parses_is_current_and_uses_our_metrics():
    data = json.loads((MON / "grafana" / "unirank-serving.json").read_text())
    assert data == json.loads(json.dumps(dashboard()))  # regenerate: python -m serve_apps.dashboard
    exprs = [t["expr"] for p in data["panels"] for t in p.get("targets", [])]
    (row,) = [p for p in data["panels"] if p["type"] == "row"]  # one row per experiment
    assert row["repeat"] == "experiment"
    assert any(v["name"] == "experiment" for v in data["templating"]["list"])
    used = set().union(*(metric_names(e) for e in exprs))
    assert used and used <= KNOWN, used - KNOWN
    assert any("task_type" in v["name"] for v in data["templating"]["list"])
    for name in (
        "requests",
        "request_latency_ms",
        "fallbacks",
        "cache_hits",
        "errors",
        "scores",
        "experiment_exposures",
        "experiment_latency_ms",
    ):
        assert any(f"ray_unirank_{name}_" in e for e in exprs), name


def test_alert_rules_parse_with_expected_groups():
    data = yaml.safe_load((MON / "prometheus" / "unirank-serving-rules.yaml").read_text())
    groups = {g["name"]: g["rules"] for g in data["groups"]}
    assert set(groups) == {
        "unirank-serving-errors",
        "unirank-serving-latency",
        "unirank-serving-fallbacks",
        "unirank-serving-drift",
    }
    for rules in groups.values():
        for r in rules:
            assert r["alert"].startswith("Unirank") and r["expr"] and r["for"]
            assert "by (task_type)" in r["expr"] or "task_type)" in r["expr"]
            assert metric_names(r["expr"]) <= KNOWN
            assert r["expr"].count("(") == r["expr"].count(")")


def test_checked_in_serve_config_is_current():
    """configs/serve/serve_config.yaml is generated from configs/use_cases (no drift)."""
    from ray.serve.schema import ServeDeploySchema

    from model.config import load_config
    from serve_apps.deploy_config import build_serve_config, load_use_cases

    root = MON.parent
    cfg = load_config(root / "configs" / "synthetic_ads.yaml")
    expected = build_serve_config(
        cfg, load_use_cases(root / "configs" / "use_cases"), model_uri="models:/unirank@champion"
    )
    got = yaml.safe_load((root / "configs" / "serve" / "serve_config.yaml").read_text())
    assert got == json.loads(json.dumps(expected))
    ServeDeploySchema.model_validate(got)
