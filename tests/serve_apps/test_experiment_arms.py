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
from serve_apps.experiments import assign_arm, stop_arms, to_stop
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


def test_stopping_an_arm_gives_its_users_to_the_control():
    exp = ExperimentConfig.model_validate(
        {
            "id": "e",
            "salt": "s",
            "arms": [
                {"name": "champion", "share": 0.5},
                {"name": "challenger", "share": 0.3, "model_uri": "models:/m/2"},
                {"name": "holdout", "share": 0.2, "policy": "popularity"},
            ],
        }
    )
    stopped = stop_arms(exp, ["challenger", "champion"])  # the control is never stopped
    assert {a.name: a.share for a in stopped.arms} == pytest.approx(
        {"champion": 0.8, "challenger": 0.0, "holdout": 0.2}
    )
    moved = [u for u in range(1, 3000) if assign_arm(u, exp).name == "challenger"]
    assert {assign_arm(u, stopped).name for u in moved} == {"champion"}
    # holdout users keep their arm: the slices of the other arms do not move
    held = [u for u in range(1, 3000) if assign_arm(u, exp).name == "holdout"]
    assert {assign_arm(u, stopped).name for u in held} == {"holdout"}
    report = {"arms": {"challenger": {"decision": {"action": "stop"}}, "holdout": {}}}
    assert to_stop(exp, report) == ["challenger"] and to_stop(stopped, report) == []


def test_model_arms_are_scored_by_their_own_model(exported, tmp_path):
    """A challenger arm scores with its own model (its version in the response); an arm the
    ranker has no model for gets a marked fallback, never another arm's scores."""
    model_dir, cfg = exported
    exp = ExperimentConfig.model_validate(
        {
            "id": "two-models",
            "salt": "s",
            "arms": [
                {"name": "champion", "share": 0.5},
                {"name": "challenger", "share": 0.5, "model_uri": str(model_dir)},
            ],
        }
    )
    s = settings(model_dir, cfg, "notifications")
    uc = s.use_case.model_copy(update={"experiment": exp, "fallback": "popularity"})
    s = dataclasses.replace(s, use_case=uc)
    live, other = ModelScorer(s, "live-v1"), ModelScorer(s, "challenger-v2")
    cands = [{"item_id": i} for i in range(1, 30)]
    for arms, challenger_version in (({"challenger": other}, "challenger-v2"), ({}, None)):
        core = IngressCore(s, InProcessRanker(live, arms))
        core.log = None
        with TestClient(build_api(core), raise_server_exceptions=False) as c:
            for user in range(1, 21):
                r = c.post("/rank", json={"user_id": user, "candidates": cands})
                assert r.status_code == 200, r.text
                r = r.json()
                if r["arm"] == "champion":
                    assert r["model_version"] == "live-v1" and r["fallback"] is None
                elif challenger_version:
                    assert r["model_version"] == challenger_version and r["fallback"] is None
                else:  # no model for the arm on this ranker: marked, not silently the live one
                    assert r["fallback"]["reason"] == "model_error"
