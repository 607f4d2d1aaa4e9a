"""Experiment arms in the ingress: every response names its experiment and arm, users keep
their arm, the holdout is served the popularity order (not a fallback), arms never share
cached answers, and the exposure log carries arm and propensity."""

from __future__ import annotations

import asyncio
import dataclasses
import warnings

import pytest

from model.config import ExperimentConfig
from serve_apps.api import build_api
from serve_apps.experiments import assign_arm
from serve_apps.exposures import MemoryExposureLog
from serve_apps.ingress import HOLDOUT_VERSION, IngressCore
from serve_apps.ranker import InProcessRanker, ModelScorer
from tests.serve_apps.ingress_helpers import settings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

pytestmark = pytest.mark.unit
EXPERIMENT = ExperimentConfig.model_validate(
    {
        "id": "notif-holdout",
        "salt": "s",
        "arms": [
            {"name": "champion", "share": 0.7},
            {"name": "holdout", "share": 0.3, "policy": "popularity"},
        ],
    }
)


@pytest.fixture(scope="module")
def client(exported):
    model_dir, cfg = exported
    s = settings(model_dir, cfg, "notifications")
    uc = s.use_case.model_copy(update={"experiment": EXPERIMENT, "cache_ttl_s": 60.0})
    s = dataclasses.replace(s, use_case=uc)
    core = IngressCore(s, InProcessRanker(ModelScorer(s)))
    core.log = MemoryExposureLog()
    with TestClient(build_api(core), raise_server_exceptions=False) as c:
        yield core, c


def test_responses_name_their_arm_and_the_holdout_is_not_personalized(client):
    core, c = client
    cands = [{"item_id": i} for i in range(1, 30)]
    seen = {}
    for user in range(1, 41):
        body = {"user_id": user, "candidates": cands, "request_id": f"u{user}"}
        r = c.post("/rank", json=body).json()
        assert r["experiment"] == "notif-holdout" and r["fallback"] is None
        assert r["arm"] == assign_arm(user, EXPERIMENT).name
        if r["arm"] == "holdout":
            assert r["model_version"] == HOLDOUT_VERSION
            assert all(i["score"] is None for i in r["items"])
        else:
            assert all(i["score"] is not None for i in r["items"])
        seen[user] = [i["item_id"] for i in r["items"]]
        again = c.post("/rank", json={**body, "request_id": f"again{user}"}).json()
        assert again["arm"] == r["arm"] and again["cached"]  # same user, same arm, cached
    holdout = [u for u in seen if assign_arm(u, EXPERIMENT).name == "holdout"]
    assert 5 <= len(holdout) <= 20
    # every holdout user sees the same (popularity) order, whoever they are
    assert len({tuple(seen[u]) for u in holdout}) == 1
    # per-arm metrics (Prometheus, a Grafana row per experiment): every answer, cached too
    count = core.metrics.count
    assert count("unirank_experiment_exposures", arm="holdout") == 2 * len(holdout)
    assert count("unirank_experiment_exposures", experiment="notif-holdout") == 80
    records = asyncio.run(core.log.read("notifications"))
    exposures = [r for _, r in records if r.kind == "exposure"]
    assert len(exposures) == 80
    for e in exposures:
        arm = assign_arm(e.user_id, EXPERIMENT)
        assert (e.experiment, e.arm, e.propensity) == ("notif-holdout", arm.name, arm.share)
        assert (e.scores is None) == (arm.name == "holdout")
