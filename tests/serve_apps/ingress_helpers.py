"""Helpers for tests that run a use-case's real ingress app without Ray: its settings, an
IngressCore over the ranker's in-process path, and posting to its FastAPI app (imported as
``tests.serve_apps.ingress_helpers``; conftest.py modules are not importable by name)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from serve_apps.api import build_api
from serve_apps.deploy_config import load_use_cases
from serve_apps.ingress import IngressCore
from serve_apps.ranker import InProcessRanker, ModelScorer
from serve_apps.settings import AppSettings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

REPO = Path(__file__).resolve().parents[2]


def settings(model_dir: Path, cfg, name: str, *, store: str = "memory", redis_url: str = ""):
    use_cases = [uc.model_dump(mode="json") for uc in load_use_cases(REPO / "configs/use_cases")]
    conf = cfg.model_dump(mode="json")
    conf["use_cases"] = use_cases
    conf["serve"] = {**conf["serve"], "feature_store": store}
    if redis_url:
        conf["serve"]["redis_url"] = redis_url
    args = {"use_case": name, "model_uri": str(model_dir), "config": conf}
    # a generous deadline: these tests are about values, not latency on a busy machine
    return AppSettings.from_args({**args, "request_timeout_s": 30})


def core_for(model_dir: Path, cfg, name: str, **kw) -> IngressCore:
    s = settings(model_dir, cfg, name, **kw)
    return IngressCore(s, InProcessRanker(ModelScorer(s)))


def make_apps(model_dir: Path, cfg, names) -> dict[str, tuple[IngressCore, TestClient]]:
    """{use-case: (core, client)} over an exported model, memory store."""
    out = {}
    for name in names:
        core = core_for(model_dir, cfg, name)
        out[name] = (core, TestClient(build_api(core), raise_server_exceptions=False))
    return out


def post(apps, name: str, body: str | dict, route: str = "/rank", headers: dict | None = None):
    _, client = apps[name]
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {"content-type": "application/json", **(headers or {})}
    return client.post(route, content=content, headers=headers)


def fields(r) -> list[str]:
    return [f["field"] for f in r.json()["fields"]]
