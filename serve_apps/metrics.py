"""Prometheus metrics of the serving path, all tagged with ``task_type``.

Requests and errors also carry ``route`` (``/rank``, ``/events``, ``/version``, ``/healthz``,
``other`` for unknown paths; ``ranker`` for the ranker's own errors), set explicitly so that
the value is the same in and out of a Serve request context.

Exported by Ray's metrics agent with the ``ray_`` prefix (``ray_unirank_requests_total``);
Serve adds ``deployment``, ``replica``, ``application`` and ``route`` tags. The Grafana
dashboard (monitoring/grafana/unirank-serving.json) and the alerting rules
(monitoring/prometheus/unirank-serving-rules.yaml) query exactly these names.
"""

from __future__ import annotations

from collections import Counter

from ray.serve import metrics

LATENCY_MS_BUCKETS = [1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000]
SCORE_BUCKETS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]

# name -> (kind, description, extra tag keys); the monitoring test reads this table.
METRICS = {
    "unirank_requests": ("counter", "HTTP requests by route and status", ("status", "route")),
    "unirank_request_latency_ms": ("histogram", "Ingress latency of a ranking request", ()),
    "unirank_fallbacks": ("counter", "Responses served by the fallback policy", ("reason",)),
    "unirank_cache_hits": ("counter", "Ranking requests answered from the result cache", ()),
    "unirank_cache_misses": ("counter", "Ranking requests not in the result cache", ()),
    "unirank_errors": (
        "counter",
        "Errors by kind (validation, body_too_large, model_error, timeout, ...) and route",
        ("kind", "route"),
    ),
    "unirank_feature_store_repairs": (
        "counter",
        "Stored histories or encodings found unreadable or out of order, and repaired",
        ("reason",),
    ),
    "unirank_scores": ("histogram", "Ranking scores of returned items", ()),
    "unirank_candidates": ("histogram", "Candidates scored per request", ()),
    "unirank_model_batch_rows": ("histogram", "Rows per batched model call", ()),
    "unirank_model_latency_ms": ("histogram", "Batched model call latency", ()),
    "unirank_experiment_exposures": (
        "counter",
        "Ranked responses of a running experiment, by arm",
        ("experiment", "arm"),
    ),
    "unirank_experiment_latency_ms": (
        "histogram",
        "Ingress latency of a ranking request, by experiment arm (a guardrail)",
        ("experiment", "arm"),
    ),
    "unirank_user_encoding": (
        "counter",
        "User-sequence encodings: precomputed (feature store) or on_the_fly, and why",
        ("source", "reason"),
    ),
    "unirank_rollouts": (
        "counter",
        "Model rollouts (user_config reconfigure) on a ranker replica, by outcome (ok / failed)",
        ("outcome",),
    ),
}
_BOUNDARIES = {
    "unirank_request_latency_ms": LATENCY_MS_BUCKETS,
    "unirank_model_latency_ms": LATENCY_MS_BUCKETS,
    "unirank_experiment_latency_ms": LATENCY_MS_BUCKETS,
    "unirank_scores": SCORE_BUCKETS,
    "unirank_candidates": BATCH_BUCKETS,
    "unirank_model_batch_rows": BATCH_BUCKETS,
}


class ServingMetrics:
    """The metrics of one use-case's replica (default tag ``task_type``)."""

    def __init__(self, task_type: str):
        self.task_type = task_type
        # What this replica counted, by (name, sorted tags): readable in-process (tests,
        # drills), independent of whether a metrics agent exports it.
        self.counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        self._m = {}
        for name, (kind, desc, tags) in METRICS.items():
            keys = ("task_type", *tags)
            if kind == "counter":
                m = metrics.Counter(name, description=desc, tag_keys=keys)
            else:
                m = metrics.Histogram(
                    name, description=desc, boundaries=_BOUNDARIES[name], tag_keys=keys
                )
            m.set_default_tags({"task_type": task_type})
            self._m[name] = m

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        self._m[name].inc(value, tags=tags or None)
        self.counts[(name, tuple(sorted(tags.items())))] += value

    def count(self, name: str, **tags: str) -> float:
        """How much ``name`` was incremented with (at least) these tags."""
        want = set(tags.items())
        return sum(v for (n, t), v in self.counts.items() if n == name and want <= set(t))

    def observe(self, name: str, value: float, **tags: str) -> None:
        self._m[name].observe(value, tags=tags or None)

    def observe_many(self, name: str, values) -> None:
        m = self._m[name]
        for v in values:
            m.observe(float(v))
