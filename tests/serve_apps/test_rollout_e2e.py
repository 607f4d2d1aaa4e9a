"""Live rollout and rollback on the session Ray cluster: two registered versions of the same
export (tests/serve_apps/conftest.py ``exported``) in the real MLflow registry, two use-cases
served with the champion pinned; ``ray_jobs.registry promote`` + ``serve_apps.rollout`` under
concurrent load, then ``rollback``, then a rollout to a broken model directory."""

from __future__ import annotations

import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import ray
from mlflow.tracking import MlflowClient
from ray import serve

from model.model_dir import pin_model_uri
from ray_jobs.registry import promote, rollback
from serve_apps.deploy_config import (
    RANKER_DEPLOYMENT,
    build_serve_config,
    load_use_cases,
    with_rollout,
)
from serve_apps.rollout import RolloutError, rollout
from serve_apps.run import deploy

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
REPO = Path(__file__).resolve().parents[2]
APPS = {"notifications": 2, "ads": 1}  # use-case -> its fixed number of ranker replicas
LOAD_THREADS, MAX_LOAD_REQUESTS = 3, 600


def register_twice(tracking_uri: str, model_dir: Path, name: str) -> tuple[str, str]:
    """Two registered versions of one exported directory (uploaded once)."""
    c = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    run = c.create_run(c.create_experiment(name))
    c.log_artifacts(run.info.run_id, str(model_dir), "model/serving")
    c.set_terminated(run.info.run_id)
    c.create_registered_model(name)
    src = f"{run.info.artifact_uri}/model"
    a, b = (c.create_model_version(name, src, run.info.run_id).version for _ in range(2))
    return str(a), str(b)


def registered(serving_cfg, mlflow_server: str, model_dir: Path, prefix: str):
    """(config serving ``models:/<name>@champion``, name, version a, version b): two
    registered versions of ``model_dir`` in a fresh registered model, ``a`` the champion."""
    serving_config, free_port = serving_cfg
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cfg = serving_config(
        f"serve.port={free_port()}",
        f"mlflow.tracking_uri={mlflow_server}",
        f"mlflow.registered_model={name}",
        f"serve.model_uri=models:/{name}@champion",
    )
    a, b = register_twice(mlflow_server, model_dir, name)
    promote(cfg, a, reason="first")
    return cfg, name, a, b


def with_registry_env(config: dict, mlflow_server: str) -> dict:
    """Replicas download from the registry: they need its address and the S3 endpoint."""
    env = {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "AWS_"))}
    env |= {"PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": mlflow_server}
    for spec in config["applications"]:
        spec["runtime_env"] = {"env_vars": env}
    return config


@pytest.fixture(scope="module")
def app(ray_cluster, exported, mlflow_server, serving_cfg):
    cfg, name, a, b = registered(serving_cfg, mlflow_server, exported[0], "unirank-rollout")
    use_cases = [
        uc.model_copy(
            update={
                "num_cpus": 0.1,
                "min_replicas": n,
                "max_replicas": n,
                "request_timeout_s": 5.0,
                "cache_ttl_s": 300.0,
            }
        )  # fmt: skip
        for uc in load_use_cases(REPO / "configs" / "use_cases")
        if (n := APPS.get(uc.name))
    ]
    config = with_registry_env(build_serve_config(cfg, use_cases), mlflow_server)
    urls = deploy(with_rollout(config, *pin_model_uri(cfg.serve.model_uri, cfg)))
    with httpx.Client(timeout=30.0) as client:
        yield cfg, urls, client, (f"{name}/{a}", f"{name}/{b}")
    serve.shutdown()


def replicas() -> dict[str, int]:
    """Ranker replica actor name -> PID: the same after a rollout means nothing restarted."""
    from ray.serve.context import _get_global_client

    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    details = _get_global_client().get_serve_details()["applications"]
    out = {}
    for app in APPS:
        for r in details[app]["deployments"][RANKER_DEPLOYMENT]["replicas"]:
            assert r["actor_name"] in names
            out[r["actor_name"]] = r["pid"]
    assert len(out) == sum(APPS.values())
    return out


def notify(client: httpx.Client, url: str, user: int) -> httpx.Response:
    cands = [{"item_id": i} for i in range(1, 40)]
    return client.post(url + "/rank", json={"user_id": user, "candidates": cands})


def roll_under_load(cfg, urls) -> tuple[dict, float, list[tuple[float, int, str, object]]]:
    """``serve_apps.rollout`` of the current champion while LOAD_THREADS clients keep
    ranking; returns (its result, when it returned, [(sent at, status, version, fallback)])."""
    stop, log, lock = threading.Event(), [], threading.Lock()

    def load(k: int) -> None:
        with httpx.Client(timeout=30.0) as c:
            while not stop.is_set() and len(log) < MAX_LOAD_REQUESTS:
                sent = time.monotonic()
                r = notify(c, urls["notifications"], 10**6 + k * 10**5 + len(log))
                body = r.json() if r.status_code == 200 else {}
                with lock:
                    log.append(
                        (sent, r.status_code, body.get("model_version"), body.get("fallback"))
                    )

    with ThreadPoolExecutor(LOAD_THREADS) as pool:
        for k in range(LOAD_THREADS):
            pool.submit(load, k)
        time.sleep(1.0)
        result = rollout(*pin_model_uri(cfg.serve.model_uri, cfg), timeout_s=120)
        done = time.monotonic()
        time.sleep(1.0)  # requests sent after the switch
        stop.set()
    return result, done, log


def check_switch(cfg, urls, client, want: str, other: str) -> float:
    before = replicas()
    result, done, log = roll_under_load(cfg, urls)
    assert result["model_version"] == want and result["replicas"] == APPS
    assert replicas() == before  # the same actors, the same processes: nothing restarted
    assert log and all(s == 200 and f is None for _, s, _, f in log), log  # 0 failed, 0 fallback
    assert {v for _, _, v, _ in log} <= {want, other}
    after = [v for sent, _, v, _ in log if sent > done]
    assert after and set(after) == {want}, "a response scored by a version no longer live"
    for url in urls.values():
        v = client.get(url + "/version").json()
        assert (v["model_version"], v["target_version"]) == (want, want), v
        assert v["rollout"]["serving"] == want and v["rollout"]["error"] is None
        assert v["sha256"] and v["model_uri"] == f"models:/{want}"
    return result["switch_s"]


def test_promote_rollout_rollback_without_restart_or_failed_requests(app):
    cfg, urls, client, (a, b) = app
    assert {notify(client, urls["notifications"], 1).json()["model_version"] for _ in range(6)} == {
        a
    }
    ads = {"user_id": 7}
    first = client.post(urls["ads"] + "/rank", json=ads).json()
    assert (
        first["model_version"],
        client.post(urls["ads"] + "/rank", json=ads).json()["cached"],
    ) == (a, True)

    promote(cfg, b.split("/")[1], reason="e2e")
    forward = check_switch(cfg, urls, client, b, a)
    # the result cache never answers with a score of the version that was rolled away
    again = client.post(urls["ads"] + "/rank", json=ads).json()
    assert (again["model_version"], again["cached"]) == (b, False)

    rollback(cfg, reason="e2e")
    back = check_switch(cfg, urls, client, a, b)
    hit = client.post(urls["ads"] + "/rank", json=ads).json()
    assert hit["model_version"] == a  # A's cached answer is valid again: A is live
    print(f"switch_s forward={forward} back={back}")


def test_broken_model_keeps_serving_the_old_version_and_reports(app, tmp_path):
    cfg, urls, client, _ = app
    serving = notify(client, urls["notifications"], 3).json()["model_version"]
    before = replicas()
    with pytest.raises(
        RolloutError, match=r"rollout to broken-1 failed on 3 replicas.*no manifest"
    ):
        rollout(str(tmp_path / "missing"), "broken-1", timeout_s=60)
    assert replicas() == before
    for _ in range(5):
        r = notify(client, urls["notifications"], 4)
        assert r.status_code == 200 and r.json()["model_version"] == serving
        assert r.json()["fallback"] is None
    v = client.get(urls["notifications"] + "/version").json()
    assert v["model_version"] == serving and v["target_version"] == "broken-1"
    assert v["rollout"]["target"] == "broken-1" and "manifest" in v["rollout"]["error"]
    # the next good rollout clears the error
    rollout(*pin_model_uri(cfg.serve.model_uri, cfg), timeout_s=120)
    assert client.get(urls["ads"] + "/version").json()["rollout"]["error"] is None
