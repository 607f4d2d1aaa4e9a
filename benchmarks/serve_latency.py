"""Serving latency and overhead: HTTP through Ray Serve vs the same path in process.

    python benchmarks/serve_latency.py [--quick]

Deploys two use-cases (ads: eligible ads; notifications: a streaming use-case) with the
default-size model (an untrained bootstrap export: speed does not depend on the weights) on
a local 2-CPU Ray, then drives a bounded load: a fixed number of 100-candidate requests at
several concurrency levels, once over HTTP through Serve and once through the same ingress
and ranker code called in this process. Prints ONE JSON line with, per use-case and level,
p50/p95/p99 latency, requests/s, candidates/s per ranker replica and the fallback rate for
both sides; their ratio at each level; the goals (p99 <= 50 ms at concurrency 4, ratio >=
0.7, no fallbacks) met or not; the autoscaling observed; and a drill that kills the ranker
replica under load (every answer must still be a 2xx, every degraded one a marked fallback).

Identical on both sides of ``served_vs_in_process``: the exported model directory and its
retrieval index, the request bodies (same users, candidates, context; no cache), the
concurrency, the ingress code (``IngressCore``: validation, feature store, catalogue
features, rules) and the ranker's served path (``ModelScorer.score_batch``: the user's
sequence encoded once, then ``forward_encoded`` over the candidates, padded to the same shape
buckets), batched by the same rule (up to the use-case's ``max_batch_size``, waiting at most
``batch_wait_timeout_s``, one batch at a time as in one replica), one torch thread. Not
identical: Serve adds HTTP and JSON, the proxy, the handle hops between the proxy, ingress and
ranker replicas (each its own process), and up to 2 ranker replicas when it scales out; the
in-process side runs in one process, its requests validated from the same JSON bodies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from serve_apps.api import RequestError, Unavailable  # noqa: E402
from serve_apps.deploy_config import RANKER_DEPLOYMENT, build_serve_config, load_use_cases  # noqa: E402
from serve_apps.ingress import IngressCore  # noqa: E402
from serve_apps.ranker import ModelScorer, refuse, warmup_input  # noqa: E402
from serve_apps.retrieval import INDEX_FILE, RetrievalIndex  # noqa: E402
from serve_apps.rows import RankInput  # noqa: E402
from serve_apps.run import bootstrap_model, deploy  # noqa: E402
from serve_apps.schemas import RankRequest  # noqa: E402
from serve_apps.settings import AppSettings  # noqa: E402

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


class BatchingInProcessRanker:
    """The Ranker deployment's request path in this process: the same pre-batch check, the
    same batching rule as ``@serve.batch`` (up to ``max_batch`` requests, waiting at most
    ``wait_s`` after the first; one batch at a time, like one replica) and the same isolated
    ``ModelScorer.score_batch``. Built inside the event loop that uses it."""

    def __init__(self, scorer: ModelScorer, max_batch: int, wait_s: float):
        self.scorer, self.max_batch, self.wait_s = scorer, max_batch, wait_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.worker = asyncio.get_running_loop().create_task(self._batches())

    async def rank(self, inp: RankInput, timeout_s: float) -> dict[str, np.ndarray]:
        refused = refuse(inp, self.scorer.times)
        if refused is not None:
            return refused
        done = asyncio.get_running_loop().create_future()
        await self.queue.put((inp, done))
        return await asyncio.wait_for(done, timeout_s)

    async def version(self) -> dict:
        return dict(self.scorer.version)

    async def _batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            outs = await asyncio.to_thread(self.scorer.score_batch, [i for i, _ in batch])
            for (_, done), out in zip(batch, outs, strict=True):
                if not done.done():  # its caller may have timed out
                    done.set_result(out)


async def drive(send, reqs: list[dict], concurrency: int, watch=None, after=None) -> dict:
    """``reqs`` through ``send(body) -> (status, json)`` at ``concurrency``. ``watch()``
    (optional) samples the ranker replicas every 0.5 s; ``after(k)`` runs after the k-th
    answer (the replica-kill drill)."""
    lat: list[float] = []
    statuses: list[int] = []
    fallbacks: dict[str, int] = {}
    unmarked = 0  # a 2xx without scores and without a fallback marker
    replicas: list[int] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(body: dict) -> None:
        nonlocal unmarked
        async with sem:
            t0 = time.perf_counter()
            status, out = await send(body)
            lat.append(time.perf_counter() - t0)
        statuses.append(status)
        if status < 300:
            if out["fallback"] is not None:
                reason = out["fallback"]["reason"]
                fallbacks[reason] = fallbacks.get(reason, 0) + 1
            elif any(i["score"] is None for i in out["items"]):
                unmarked += 1
        if after is not None:
            await after(len(statuses))

    async def sample() -> None:
        while True:
            replicas.append(watch())
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(sample()) if watch is not None else None
    t0 = time.perf_counter()
    await asyncio.gather(*(one(b) for b in reqs))
    wall = time.perf_counter() - t0
    if watcher is not None:
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
        "non_2xx": sum(st >= 300 for st in statuses),
        "fallbacks": sum(fallbacks.values()),
        "fallback_rate": round(sum(fallbacks.values()) / len(reqs), 4),
        "fallback_reasons": fallbacks,
        "unmarked_degraded": unmarked,
    }


def http_sender(client: httpx.AsyncClient, url: str):
    async def send(body: dict) -> tuple[int, dict]:
        r = await client.post(url, json=body)
        return r.status_code, r.json()

    return send


def core_sender(core: IngressCore):
    """The ingress path without HTTP: the JSON body validated as the API does, then
    ``IngressCore.rank``; its 4xx / 503 errors become statuses as the API maps them."""

    async def send(body: dict) -> tuple[int, dict]:
        try:
            req = RankRequest.model_validate_json(json.dumps(body))
            return 200, await core.rank(req, f"bench-{body['user_id']}")
        except RequestError as exc:
            return exc.status, {}
        except Unavailable:
            return 503, {}

    return send


async def served(url: str, reqs: list[dict], concurrency: int, app: str, after=None) -> dict:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:
        send = http_sender(client, url)
        return await drive(send, reqs, concurrency, lambda: ranker_replicas(app), after)


async def in_process(core: IngressCore, scorer: ModelScorer, reqs: list[dict], c: int) -> dict:
    uc = core.uc
    core.ranker = BatchingInProcessRanker(scorer, uc.max_batch_size, uc.batch_wait_timeout_s)
    try:
        return await drive(core_sender(core), reqs, c)
    finally:
        core.ranker.worker.cancel()


def in_process_core(args: dict) -> tuple[IngressCore, ModelScorer]:
    """The ingress and the ranker's scorer built from the application's own args, as the
    ingress and ranker replicas build them (the ranker is set per event loop)."""
    torch.set_num_threads(1)  # a ranker replica's share (Ranker sets max(1, int(num_cpus)))
    s = AppSettings.from_args(args)
    scorer = ModelScorer(s)
    scorer.warm_up(warmup_input(s.use_case.name))
    return IngressCore(s, None), scorer


async def kill_drill(url: str, reqs: list[dict], app: str, concurrency: int) -> dict:
    """Under load, kill the use-case's ranker replica(s) after a quarter of the answers:
    Serve's controller replaces them; meanwhile every answer must be a 2xx, and any degraded
    one a marked fallback."""
    killed: list[str] = []

    async def after(k: int) -> None:
        if k == max(1, len(reqs) // 4) and not killed:
            for a in ray.util.list_named_actors(all_namespaces=True):
                if a["name"].startswith(f"SERVE_REPLICA::{app}#{RANKER_DEPLOYMENT}#"):
                    ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]))
                    killed.append(a["name"])

    out = await served(url, reqs, concurrency, app, after)
    out["killed_replicas"] = len(killed)
    out["ok"] = bool(killed) and out["non_2xx"] == 0 and out["unmarked_degraded"] == 0
    return out


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
            asyncio.run(served(url, reqs[:8], 2, name))  # warm-up connections and batches
            runs = [asyncio.run(served(url, reqs, c, name)) for c in levels]
            # scale-down after the load, bounded
            t_end, down_after = time.perf_counter(), None
            while time.perf_counter() - t_end < down_wait:
                if ranker_replicas(name) <= 1:
                    down_after = round(time.perf_counter() - t_end, 1)
                    break
                time.sleep(0.5)
            args = next(a["args"] for a in config["applications"] if a["name"] == name)
            core, scorer = in_process_core(args)
            asyncio.run(in_process(core, scorer, reqs[:8], 2))  # warm-up
            local = [asyncio.run(in_process(core, scorer, reqs, c)) for c in levels]
            ratios = {
                str(s["concurrency"]): round(
                    s["candidates_per_s_per_replica"] / i["candidates_per_s_per_replica"], 3
                )
                for s, i in zip(runs, local, strict=True)
            }
            at4 = next(r for r in runs if r["concurrency"] == 4)
            out[name] = {
                "levels": runs,
                "in_process_levels": local,
                "served_vs_in_process": ratios,
                "goals": {
                    "p99_ms_at_concurrency_4_le_50": at4["p99_ms"] <= 50,
                    "ratio_at_concurrency_4_ge_0_7": ratios["4"] >= 0.7,
                    "no_fallbacks": all(r["fallbacks"] == 0 for r in runs),
                },
                "autoscaling": {
                    "max_replicas_under_load": max(r["max_ranker_replicas"] for r in runs),
                    "replicas_back_to_1_after_s": down_after,
                    "bounded_wait_s": down_wait,
                },
            }
        out["replica_kill"] = asyncio.run(
            kill_drill(urls["ads"] + "/rank", bodies("ads", index, n_req, rng), "ads", 4)
        )
        emit(out)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
