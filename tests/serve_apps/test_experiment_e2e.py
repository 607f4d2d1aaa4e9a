"""An online experiment on the session Ray cluster: two registered versions as champion and
challenger arms, every response scored by its arm's version; then the challenger is stopped
live (``serve_apps.experiments.push_experiment``, what ``apply`` does) and its users move to
the champion without a replica restarting or a request failing."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from ray import serve

from model.config import ExperimentConfig
from model.model_dir import pin_model_uri
from serve_apps.deploy_config import (
    build_serve_config,
    experiment_user_config,
    load_use_cases,
    with_rollout,
)
from serve_apps.experiments import assign_arm, live_experiment, push_experiment, stop_arms
from serve_apps.run import deploy
from tests.serve_apps.test_rollout_e2e import registered, with_registry_env

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
REPO = Path(__file__).resolve().parents[2]
USERS = range(1, 41)


@pytest.fixture(scope="module")
def app(ray_cluster, exported, mlflow_server, serving_cfg):
    cfg, name, a, b = registered(serving_cfg, mlflow_server, exported[0], "unirank-exp")
    exp = ExperimentConfig.model_validate(
        {
            "id": "e2e",
            "salt": "s",
            "arms": [
                {"name": "champion", "share": 0.5},
                {"name": "challenger", "share": 0.5, "model_uri": f"models:/{name}/{b}"},
            ],
        }
    )
    (uc,) = [
        uc.model_copy(
            update={
                "num_cpus": 0.1,
                "min_replicas": 1,
                "max_replicas": 1,
                "request_timeout_s": 5.0,
                "experiment": exp,
            }
        )
        for uc in load_use_cases(REPO / "configs" / "use_cases")
        if uc.name == "notifications"
    ]
    config = with_registry_env(build_serve_config(cfg, [uc]), mlflow_server)
    arms = {uc.name: experiment_user_config(uc, lambda u: pin_model_uri(u, cfg))}
    urls = deploy(with_rollout(config, *pin_model_uri(cfg.serve.model_uri, cfg), arms))
    with httpx.Client(timeout=30.0) as client:
        yield urls["notifications"], client, exp, (f"{name}/{a}", f"{name}/{b}")
    serve.shutdown()


def rank_all(client, url) -> dict[int, dict]:
    cands = [{"item_id": i} for i in range(1, 30)]
    out = {}
    for user in USERS:
        r = client.post(url + "/rank", json={"user_id": user, "candidates": cands})
        assert r.status_code == 200, r.text
        out[user] = r.json()
    return out


def test_arms_are_served_by_their_versions_and_a_stop_applies_live(app):
    url, client, exp, (v_champion, v_challenger) = app
    before = replicas_of("notifications")
    answers = rank_all(client, url)
    for user, r in answers.items():
        arm = assign_arm(user, exp).name
        assert r["experiment"] == "e2e" and r["arm"] == arm and r["fallback"] is None
        assert r["model_version"] == (v_champion if arm == "champion" else v_challenger)
    moved = [u for u in USERS if assign_arm(u, exp).name == "challenger"]
    assert 8 <= len(moved) <= 32

    push_experiment("notifications", stop_arms(exp, ["challenger"]))
    assert {a.name: a.share for a in live_experiment("notifications").arms} == {
        "champion": 1.0,
        "challenger": 0.0,
    }
    # Serve applies the update asynchronously: wait (bounded) until a moved user sees it
    cands = [{"item_id": i} for i in range(1, 30)]
    deadline = time.monotonic() + 60
    while True:
        r = client.post(url + "/rank", json={"user_id": moved[0], "candidates": cands})
        assert r.status_code == 200, r.text  # no request fails while the ingress reconfigures
        if r.json()["arm"] == "champion":
            break
        assert time.monotonic() < deadline, "the experiment change did not reach the ingress"
        time.sleep(0.2)
    after = rank_all(client, url)
    assert all(r["arm"] == "champion" and r["model_version"] == v_champion for r in after.values())
    assert replicas_of("notifications") == before  # reconfigured, not restarted


def replicas_of(app: str) -> dict[str, int]:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()["applications"][app]["deployments"]
    return {r["actor_name"]: r["pid"] for d in details.values() for r in d["replicas"]}
