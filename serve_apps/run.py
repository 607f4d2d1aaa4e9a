"""Start every use-case locally: ``python -m serve_apps.run [CONFIG] [section.field=value ...]``.

Generates the multi-application Serve config (serve_apps.deploy_config — the same config
``serve deploy`` and the KubeRay RayService use), starts Serve on ``serve.host:serve.port``,
deploys one application per use-case, prints their URLs and blocks until Ctrl-C or SIGTERM.
A local Ray it starts has its dashboard on (127.0.0.1:``--dashboard-port``, default 8265):
the Serve tab and ``serve status`` (docs/serving.md) need it.

Without ``serve.model_uri`` (no trained model yet) an untrained model is exported under
``--workdir`` from synthetic rows, with its retrieval index next to it, so everything runs on a
fresh checkout.

``demo(cfg)`` does the same non-interactively: start, answer a sample request per use-case,
shut down (what ``make demo`` ends with).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve

from model.config import ConfigError, UnirankConfig, UseCaseConfig, config_args, load_config
from model.model_dir import pin_model_uri
from serve_apps.deploy_config import (
    build_serve_config,
    experiment_user_config,
    load_use_cases,
    with_rollout,
)
from serve_apps.model_store import resolve_model_dir
from serve_apps.retrieval import INDEX_FILE, RetrievalIndex

USE_CASES_DIR = "configs/use_cases"


def bootstrap_model(cfg: UnirankConfig, workdir: str | Path, data: list[str] | None = None) -> Path:
    """Export an untrained model + its retrieval index and user-profile table under
    ``workdir``/model.

    ``data``: prepared unified-schema parquet to fit the processor and build the index from;
    default: synthetic rows (serve_apps.bootstrap.sample_rows).
    """
    from model.user_profiles import PROFILE_FILE, ProfileColumns, build_profiles
    from serve_apps.bootstrap import export_untrained, sample_rows
    from serve_apps.retrieval import _read, build_index

    out = Path(workdir) / "model"
    rows = _read(data) if data else sample_rows(2000, task_types=tuple(cfg.dataset.task_types))
    export_untrained(out, cfg, rows.slice(0, 5000))
    build_index(rows, out / INDEX_FILE)
    columns = ProfileColumns.from_config(cfg.dataset)
    build_profiles(data or rows, out / PROFILE_FILE, columns)
    return out


def deploy(serve_config: dict[str, Any], timeout_s: float = 180.0) -> dict[str, str]:
    """Deploy a generated multi-application Serve config on the connected Ray cluster.

    Starts Serve with the config's ``http_options`` (a running Serve keeps its own) and
    applies the config declaratively, as ``serve deploy`` does (so a later ``user_config``
    change is a lightweight update: serve_apps.rollout). Applications already deployed this
    way and absent from ``serve_config`` keep running. Waits until all are RUNNING. Returns
    {application: base URL}.
    """
    http = serve_config["http_options"]
    serve.start(
        http_options={"host": http["host"], "port": http["port"]},
        proxy_location=serve_config.get("proxy_location", "EveryNode"),
    )
    apply_apps(serve_config["applications"])
    wait_running([a["name"] for a in serve_config["applications"]], timeout_s)
    base = f"http://{http['host']}:{http['port']}"
    return {a["name"]: base + a["route_prefix"] for a in serve_config["applications"]}


def deployed_apps() -> dict[str, dict[str, Any]]:
    """The applications deployed declaratively on the connected Serve, as their configs."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    out = {}
    for name, app in details.get("applications", {}).items():
        source = getattr(app.get("source"), "value", app.get("source"))  # APIType or str
        if source == "declarative" and app.get("deployed_app_config"):
            out[name] = app["deployed_app_config"]
    return out


def apply_apps(applications: list[dict[str, Any]]) -> None:
    """Apply these application configs over the deployed ones (the same apply as the
    dashboard's ``PUT /api/serve/applications/``); the others keep running unchanged."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    apps = {**deployed_apps(), **{a["name"]: a for a in applications}}
    schema = ServeDeploySchema.model_validate({"applications": list(apps.values())})
    _get_global_client().deploy_apps(schema)


def wait_running(names: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: str(apps[n].status) if n in apps else "MISSING" for n in names}
        if all(s.endswith("RUNNING") for s in states.values()):
            return
        failed = {n: apps[n].message for n, s in states.items() if s.endswith("DEPLOY_FAILED")}
        if failed:
            raise RuntimeError(f"Serve applications failed to deploy: {failed}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve applications not RUNNING after {timeout_s} s: {states}")
        time.sleep(0.5)


def fit_to_cluster(use_cases: list[UseCaseConfig], cpus: float) -> list[UseCaseConfig]:
    """Scale the use-cases' replica CPUs down when their minimum footprint (min replicas x
    (ranker + ingress)) exceeds ``cpus``, keeping 20% of the cluster free; a laptop demo of
    five use-cases then fits on 2 cores. Unchanged when they already fit."""
    from serve_apps.deploy_config import INGRESS_NUM_CPUS

    need = sum(max(1, uc.min_replicas) * (uc.num_cpus + INGRESS_NUM_CPUS) for uc in use_cases)
    budget = 0.8 * cpus - INGRESS_NUM_CPUS * len(use_cases)
    ranker_need = need - INGRESS_NUM_CPUS * len(use_cases)
    if need <= 0.8 * cpus or ranker_need <= 0:
        return use_cases
    scale = max(budget, 0.05 * len(use_cases)) / ranker_need
    return [
        uc.model_copy(update={"num_cpus": round(max(0.01, uc.num_cpus * scale), 3)})
        for uc in use_cases
    ]


def free_cpus() -> float:
    """CPUs not held by anything else on the connected cluster right now (a shared cluster, or
    the jobs that ran before in the same session)."""
    return ray.available_resources().get("CPU", 0.0) or ray.cluster_resources().get("CPU", 1.0)


def example_request(uc: UseCaseConfig, index: RetrievalIndex, user_id: int = 1) -> dict:
    """A valid request body for a use-case, built from the retrieval index."""
    body: dict[str, Any] = {"user_id": user_id, "request_id": f"example-{uc.name}"}
    if uc.retrieval == "request":
        body["candidates"] = [{"item_id": int(i)} for i in index.popular(20)]
    elif uc.retrieval == "popular_by_category":
        # the most popular item's category; 0 is the "no category" placeholder, not one
        cats = index.features(index.popular(1000))["category_id"]
        body["category_id"] = int(next((c for c in cats if c > 0), 1))
    elif uc.retrieval == "co_occurrence":
        keys = index.a["co_keys"]
        counts = np.diff(index.a["co_indptr"])
        body["source_item_id"] = int(keys[np.argmax(counts)])
    elif uc.retrieval == "inverted_index":
        keys = index.a["tok_keys"]
        counts = np.diff(index.a["tok_indptr"])
        body["query_tokens"] = [int(k) for k in keys[np.argsort(-counts)[:2]]]
    return body


def demo(
    cfg: UnirankConfig,
    model_dir: str | Path | None = None,
    use_cases_dir: str | Path = USE_CASES_DIR,
    workdir: str | Path = "out/serve",
    data: list[str] | None = None,
    deploy_timeout_s: float = 420.0,
) -> list[tuple[str, dict]]:
    """Start Serve with every use-case, answer one sample request each, shut Serve down.

    Uses the connected Ray cluster (or starts a local one and stops it). ``model_dir``:
    an exported model (default: ``serve.model_uri``, else an untrained bootstrap export).
    Every application first gets a warm-up request for another user (the first request
    through a fresh proxy and handle can exceed a use-case's timeout and be answered by the
    fallback). Returns [(use_case, response JSON)].
    """
    import httpx

    use_cases = load_use_cases(use_cases_dir)
    uri = str(model_dir) if model_dir else cfg.serve.model_uri
    if not uri:
        uri = str(bootstrap_model(cfg, workdir, data))
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        use_cases = fit_to_cluster(use_cases, free_cpus())
        serve_config = build_serve_config(cfg, use_cases, host=cfg.serve.host, model_uri=uri)
        urls = deploy(serve_config, deploy_timeout_s)
        index = RetrievalIndex.load(resolve_model_dir(uri, cfg) / INDEX_FILE)
        out = []
        with httpx.Client(timeout=30.0) as client:
            for uc in use_cases:
                client.post(urls[uc.name] + "/rank", json=example_request(uc, index, user_id=2))
            for uc in use_cases:
                r = client.post(urls[uc.name] + "/rank", json=example_request(uc, index))
                out.append((uc.name, r.json()))
        return out
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


def _stop(signum, frame):
    raise KeyboardInterrupt  # the same clean shutdown as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve_apps.run", description=__doc__)
    p.add_argument("config", nargs="?", help="project config YAML (default: embedded defaults)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.add_argument("--use-cases", default=USE_CASES_DIR, help="directory of use-case YAMLs")
    p.add_argument("--workdir", default="out/serve", help="where a bootstrap model is exported")
    p.add_argument("--data", nargs="*", help="prepared parquet for the bootstrap model/index")
    p.add_argument("--address", default=None, help="Ray address (default: start a local Ray)")
    p.add_argument("--dashboard-port", type=int, default=8265, help="dashboard port of a local Ray")
    p.add_argument("--demo", action="store_true", help="answer a sample request each and exit")
    a = p.parse_args(argv)
    a.config, a.overrides = config_args(a.config, a.overrides)
    try:
        cfg = load_config(a.config, a.overrides)
        if a.demo:
            for name, resp in demo(cfg, use_cases_dir=a.use_cases, workdir=a.workdir, data=a.data):
                print(name, json.dumps(resp)[:300])
            return 0
        use_cases = load_use_cases(a.use_cases)
        uri = cfg.serve.model_uri or str(bootstrap_model(cfg, a.workdir, a.data))
        if not cfg.serve.model_uri:
            print(f"serve.model_uri not set: serving an UNTRAINED bootstrap export at {uri}")
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop)  # a background process ignores SIGINT
    if a.address:
        ray.init(address=a.address)
    else:  # a local Ray, with the dashboard: the Serve tab, `serve status`
        ctx = ray.init(
            include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=a.dashboard_port
        )
        if ctx.dashboard_url:
            print(f"Ray dashboard: http://{ctx.dashboard_url} (Serve tab; `serve status`)")
    try:
        use_cases = fit_to_cluster(use_cases, free_cpus())
        serve_config = build_serve_config(cfg, use_cases, host=cfg.serve.host, model_uri=uri)
        pinned, label = pin_model_uri(uri, cfg)  # every replica serves this version
        arms = {
            uc.name: experiment_user_config(uc, lambda u: pin_model_uri(u, cfg)) for uc in use_cases
        }
        urls = deploy(with_rollout(serve_config, pinned, label, arms))
        print(f"serving {label} ({pinned}); move it with python -m serve_apps.rollout")
        for name, url in urls.items():
            print(f"{name:15s} POST {url}/rank   POST {url}/events   GET {url}/docs")
        print("Serving; Ctrl-C to stop.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
