"""Write monitoring/grafana/unirank-serving.json (run after changing the panels):

    python -m serve_apps.dashboard

Every panel is per ``task_type`` (a dashboard variable) and reads the metrics defined in
serve_apps/metrics.py (exported with Ray's ``ray_`` prefix).
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "monitoring" / "grafana" / "unirank-serving.json"
SEL = 'task_type=~"$task_type"'
RANK = SEL + ', route="/rank"'  # ranking requests (requests and errors are counted per route)
# client mistakes (4xx) are not failures of the service; the ranker's own errors (route
# "ranker") are counted again by the ingress on /rank when they cause a fallback
SERVER_ERRORS = RANK + ', kind!~"validation|body_too_large|bad_request|disconnected|http_4.."'

PANELS = [
    (
        "Requests/s by route and status",
        f"sum by (task_type, route, status) (rate(ray_unirank_requests_total{{{SEL}}}[1m]))",
        "reqps",
    ),
    (
        "p50 / p99 latency (ms)",
        f"histogram_quantile(0.99, sum by (le, task_type) (rate(ray_unirank_request_latency_ms_bucket{{{SEL}}}[5m])))",
        "ms",
    ),
    (
        "Error rate (ranking, server side)",
        f"sum by (task_type) (rate(ray_unirank_errors_total{{{SERVER_ERRORS}}}[5m])) / clamp_min(sum by (task_type) (rate(ray_unirank_requests_total{{{RANK}}}[5m])), 1e-9)",
        "percentunit",
    ),
    (
        "Errors/s by route and kind",
        f"sum by (task_type, route, kind) (rate(ray_unirank_errors_total{{{SEL}}}[5m]))",
        "reqps",
    ),
    (
        "Fallback rate",
        f"sum by (task_type, reason) (rate(ray_unirank_fallbacks_total{{{SEL}}}[5m])) / ignoring(reason) group_left sum by (task_type) (rate(ray_unirank_requests_total{{{RANK}}}[5m]))",
        "percentunit",
    ),
    (
        "Cache hit ratio",
        f"sum by (task_type) (rate(ray_unirank_cache_hits_total{{{SEL}}}[5m])) / clamp_min(sum by (task_type) (rate(ray_unirank_cache_hits_total{{{SEL}}}[5m])) + sum by (task_type) (rate(ray_unirank_cache_misses_total{{{SEL}}}[5m])), 1e-9)",
        "percentunit",
    ),
    (
        "Mean ranking score (drift)",
        f"sum by (task_type) (rate(ray_unirank_scores_sum{{{SEL}}}[15m])) / sum by (task_type) (rate(ray_unirank_scores_count{{{SEL}}}[15m]))",
        "none",
    ),
    ("Score distribution", f"sum by (le) (rate(ray_unirank_scores_bucket{{{SEL}}}[5m]))", "none"),
    (
        "Feature-store repairs/s",
        f"sum by (task_type, reason) (rate(ray_unirank_feature_store_repairs_total{{{SEL}}}[5m]))",
        "reqps",
    ),
    (
        "Model batch rows (p50)",
        f"histogram_quantile(0.5, sum by (le, task_type) (rate(ray_unirank_model_batch_rows_bucket{{{SEL}}}[5m])))",
        "none",
    ),
    (
        "Model latency p99 (ms)",
        f"histogram_quantile(0.99, sum by (le, task_type) (rate(ray_unirank_model_latency_ms_bucket{{{SEL}}}[5m])))",
        "ms",
    ),
    (
        "Replicas per deployment",
        'sum by (application, deployment) (ray_serve_deployment_replica_healthy{application=~"$task_type"})',
        "none",
    ),
]


# One row per running experiment (the row repeats over the ``experiment`` variable).
EXP = 'experiment=~"$experiment"'
EXPERIMENT_PANELS = [
    (
        "Exposures/s by arm",
        f"sum by (experiment, arm) (rate(ray_unirank_experiment_exposures_total{{{EXP}}}[5m]))",
        "reqps",
    ),
    (
        "p99 latency by arm (ms)",
        f"histogram_quantile(0.99, sum by (le, experiment, arm) (rate(ray_unirank_experiment_latency_ms_bucket{{{EXP}}}[5m])))",
        "ms",
    ),
]


def _panel(i: int, title: str, expr: str, unit: str, y: int, legend: str) -> dict:
    return {
        "id": i,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * ((i - 1) % 2), "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": "A", "expr": expr, "legendFormat": legend}],
    }


def _label_variable(label: str, metric: str) -> dict:
    """A multi-select dashboard variable over the values of ``label`` on ``metric``."""
    return {
        "name": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": f"label_values({metric}, {label})",
        "includeAll": True,
        "multi": True,
        "current": {"text": "All", "value": "$__all"},
    }


def dashboard() -> dict:
    panels = [
        _panel(i + 1, title, expr, unit, 8 * (i // 2), "{{task_type}}")
        for i, (title, expr, unit) in enumerate(PANELS)
    ]
    y = 8 * ((len(PANELS) + 1) // 2)
    panels.append(
        {
            "id": len(panels) + 1,
            "type": "row",
            "title": "Experiment $experiment",
            "repeat": "experiment",
            "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            "panels": [],
        }
    )
    for title, expr, unit in EXPERIMENT_PANELS:
        panels.append(_panel(len(panels) + 1, title, expr, unit, y + 1, "{{arm}}"))
    return {
        "uid": "unirank-serving",
        "title": "unirank serving",
        "tags": ["unirank", "ray-serve"],
        "timezone": "utc",
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                _label_variable("task_type", "ray_unirank_requests_total"),
                _label_variable("experiment", "ray_unirank_experiment_exposures_total"),
            ]
        },
        "panels": panels,
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(dashboard(), indent=1) + "\n")
    print(f"wrote {OUT}")
