"""Serving latency and overhead: HTTP through Ray Serve vs the same model in process.

    python benchmarks/serve_latency.py [--quick]

Deploys two use-cases (ads: eligible ads; notifications: a streaming use-case) with the
default-size model (an untrained bootstrap export: speed does not depend on the weights) on
a local 2-CPU Ray, then drives a bounded load over 127.0.0.1: a fixed number of
100-candidate requests at several concurrency levels. Prints ONE JSON line with, per
use-case and level, p50/p95/p99 latency, requests/s and candidates/s per ranker replica; the
same model's in-process batched forward throughput on identical inputs; their ratio (the
serving overhead); and the autoscaling observed (ranker replicas up under load, down after),
bounded in time.

Identical on both sides of ``serving_vs_in_process_ratio``: the exported model directory, the
requests' candidates and users (no feature-store events), the predictor's whole path
(features, padding, TorchScript, calibration) at the use-case's ``max_batch_size``, one
torch thread (a 0.4-CPU replica's share). Not identical: Serve adds HTTP, JSON, the ingress
deployment's business rules and retrieval look-ups, request batching by time and the hops
between replicas; the in-process side calls the predictor on ready-made batches.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE  # noqa: E402

from benchmarks._util import emit, start_ray  # noqa: E402
from model.config import load_config  # noqa: E402
from model.export import load_predictor  # noqa: E402
from serve_apps.deploy_config import RANKER_DEPLOYMENT, build_serve_config, load_use_cases  # noqa: E402
from serve_apps.feature_store import Events  # noqa: E402
from serve_apps.request_features import catalogue_features  # noqa: E402
from serve_apps.retrieval import INDEX_FILE, RetrievalIndex  # noqa: E402
from serve_apps.rows import RankInput, to_columns  # noqa: E402
from serve_apps.run import bootstrap_model, deploy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = 100
USE_CASES = ("ads", "notifications")


def serve_running() -> bool:
    """Whether the connected cluster already runs Serve (its controller actor exists)."""
    return any(
        a["name"] == SERVE_CONTROLLER_NAME and a["namespace"] == SERVE_NAMESPACE
        for a in ray.util.list_named_actors(all_namespaces=True)
    )


def ranker_replicas(app: str) -> int:
    dep = serve.status().applications[app].deployments[RANKER_DEPLOYMENT]
    return sum(n for state, n in dep.replica_states.items() if str(state).endswith("RUNNING"))


def bodies(name: str, index: RetrievalIndex, n: int, rng) -> list[dict]:
    pool = index.eligible_ads(None, 10_000) if name == "ads" else index.items
    out = []
    for i in range(n):
        cands = rng.choice(pool, size=CANDIDATES, replace=len(pool) < CANDIDATES)
        out.append(
            {
                "user_id": 10_000 + i,  # distinct users: no cache hits
                "candidates": [{"item_id": int(c)} for c in cands],
                "context": {"hour": 12},
            }
        )
    return out


async def drive(url: str, reqs: list[dict], concurrency: int, app: str) -> dict:
    lat: list[float] = []
    fallbacks = 0
    replicas: list[int] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, body: dict) -> None:
        nonlocal fallbacks
        async with sem:
            t0 = time.perf_counter()
            r = await client.post(url, json=body)
            lat.append(time.perf_counter() - t0)
            r.raise_for_status()
            fallbacks += r.json()["fallback"] is not None

    async def watch() -> None:
        while True:
            replicas.append(ranker_replicas(app))
            await asyncio.sleep(0.5)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:
        watcher = asyncio.create_task(watch())
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, b) for b in reqs))
        wall = time.perf_counter() - t0
        watcher.cancel()
    ms = np.asarray(lat) * 1e3
    mean_replicas = float(np.mean(replicas)) if replicas else 1.0
    rps = len(reqs) / wall
    return {
        "concurrency": concurrency,
        "requests": len(reqs),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "requests_per_s": round(rps, 1),
        "mean_ranker_replicas": round(mean_replicas, 2),
        "max_ranker_replicas": max(replicas, default=1),
        "requests_per_s_per_replica": round(rps / mean_replicas, 1),
        "candidates_per_s_per_replica": round(rps * CANDIDATES / mean_replicas, 0),
        "fallbacks": fallbacks,
    }


def in_process(model_dir: Path, name: str, reqs: list[dict], index, batch: int, rounds: int):
    """The model alone, one thread (a replica's share), the same inputs batched like Serve."""
    torch.set_num_threads(1)
    pred = load_predictor(model_dir)
    inputs = []
    for b in reqs[:batch]:
        ids = np.array([c["item_id"] for c in b["candidates"]], dtype=np.int64)
        # the catalogue's features and content lists, as the ingress fills them
        feats, lists = catalogue_features(index, ids, name)
        feats.pop("popularity")
        inputs.append(
            RankInput(
                name,
                int(time.time()),
                b["user_id"],
                feats,
                Events.empty(),
                hour=12,
                candidate_lists=lists,
            )
        )
    pred.predict(to_columns(inputs))  # warm-up
    t0 = time.perf_counter()
    for _ in range(rounds):
        pred.predict(to_columns(inputs))  # features + padding + TorchScript + calibration
    dt = time.perf_counter() - t0
    return rounds * len(inputs) * CANDIDATES / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--quick",
        action="store_true",
        help="16 requests at concurrency 1 and 4 (300 at 1, 4, 16), 10 s scale-down wait (60)",
    )
    a = p.parse_args()
    n_req = 16 if a.quick else 300
    levels = [1, 4] if a.quick else [1, 4, 16]
    down_wait = 10 if a.quick else 60
    rng = np.random.default_rng(0)

    work = Path(tempfile.mkdtemp(prefix="unirank-bench-"))
    cfg = load_config(None)
    model_dir = bootstrap_model(cfg, work)
    index = RetrievalIndex.load(model_dir / INDEX_FILE)
    ucs = []
    for uc in load_use_cases(REPO / "configs" / "use_cases"):
        if uc.name in USE_CASES:
            ucs.append(
                uc.model_copy(
                    update={
                        "num_cpus": 0.4,
                        "min_replicas": 1,
                        "max_replicas": 2,
                        "target_ongoing_requests": 2,
                        "request_timeout_s": 30.0,
                        "cache_ttl_s": 0,
                        "max_batch_size": 8,
                    }
                )
            )
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"port": port})})
    config = build_serve_config(cfg, ucs, model_uri=str(model_dir))
    for app in config["applications"]:  # react within seconds, not minutes (bounded run)
        for d in app["deployments"]:
            if d["name"] == RANKER_DEPLOYMENT:
                d["autoscaling_config"].update(
                    {
                        "upscale_delay_s": 1.0,
                        "downscale_delay_s": 5.0,
                        "look_back_period_s": 2.0,
                        "metrics_interval_s": 0.5,
                    }
                )

    own = start_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    if not own and serve_running():
        ray.shutdown()
        raise SystemExit(
            "serve_latency: Serve already runs on the cluster at RAY_ADDRESS; this benchmark "
            "starts (and shuts down) its own Serve: stop that one or unset RAY_ADDRESS"
        )
    try:
        t0 = time.perf_counter()
        urls = deploy(config)
        startup_s = time.perf_counter() - t0
        out: dict = {
            "benchmark": "serve_latency",
            "quick": a.quick,
            "ray_cluster": "own" if own else "joined",
            "candidates": CANDIDATES,
        }
        out["deploy_s"] = round(startup_s, 1)
        for name in USE_CASES:
            reqs = bodies(name, index, n_req, rng)
            url = urls[name] + "/rank"
            asyncio.run(drive(url, reqs[:8], 2, name))  # warm-up connections and batches
            runs = [asyncio.run(drive(url, reqs, c, name)) for c in levels]
            # scale-down after the load, bounded
            t_end, down_after = time.perf_counter(), None
            while time.perf_counter() - t_end < down_wait:
                if ranker_replicas(name) <= 1:
                    down_after = round(time.perf_counter() - t_end, 1)
                    break
                time.sleep(0.5)
            max_batch = next(u.max_batch_size for u in ucs if u.name == name)
            cps = in_process(model_dir, name, reqs, index, max_batch, 5 if a.quick else 20)
            best = max(r["candidates_per_s_per_replica"] for r in runs)
            out[name] = {
                "levels": runs,
                "in_process_candidates_per_s": round(cps, 0),
                "serving_vs_in_process_ratio": round(best / cps, 3),
                "autoscaling": {
                    "max_replicas_under_load": max(r["max_ranker_replicas"] for r in runs),
                    "replicas_back_to_1_after_s": down_after,
                    "bounded_wait_s": down_wait,
                },
            }
        emit(out)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
