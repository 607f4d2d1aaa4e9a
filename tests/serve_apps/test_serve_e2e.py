"""All five use-cases served on the session Ray cluster, over HTTP on 127.0.0.1.

Deployed once for the module (feature store: a real Redis), shut down at the end so other
test modules keep the cluster.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
import ray
import redis
from ray import serve

from model.config import UnirankConfig, UseCaseConfig
from model.export import load_predictor
from serve_apps.deploy_config import RANKER_DEPLOYMENT, build_serve_config, load_use_cases
from serve_apps.feature_store import encoding_from, write_encodings
from serve_apps.retrieval import INDEX_FILE, RetrievalIndex
from serve_apps.run import deploy, example_request

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
REPO = Path(__file__).resolve().parents[2]
USE_CASES = REPO / "configs" / "use_cases"
HOMEFEED = """\
name: homefeed
route_prefix: /homefeed
retrieval: request
score_weights: {click: 1.0, engage: 2.0}
rules: [only_even_items, blocked_items]
rules_module: tests.serve_apps.homefeed_rules
top_k: 5
num_cpus: 0.1
request_timeout_s: 5
"""


def fit(uc: UseCaseConfig) -> UseCaseConfig:
    """2 CPUs for the whole suite: a tenth of a CPU per replica, one replica each. Deadlines
    are generous except related_items, whose short one the timeout test trips."""
    return uc.model_copy(
        update={
            "num_cpus": 0.1,
            "max_replicas": min(uc.max_replicas, 2),
            "request_timeout_s": 1.5 if uc.name == "related_items" else 5.0,
        }
    )


@dataclass
class Served:
    cfg: UnirankConfig
    use_cases: dict[str, UseCaseConfig]
    urls: dict[str, str]
    index: RetrievalIndex
    model_dir: Path
    redis_url: str
    client: httpx.Client

    def rank(self, name: str, body: dict) -> httpx.Response:
        return self.client.post(self.urls[name] + "/rank", json=body)


@pytest.fixture(scope="module")
def served(ray_cluster, exported, redis_url, serving_cfg):
    serving_config, free_port = serving_cfg
    model_dir, _ = exported
    cfg = serving_config(
        f"serve.port={free_port()}", "serve.feature_store=redis", f"serve.redis_url={redis_url}"
    )
    use_cases = [fit(uc) for uc in load_use_cases(USE_CASES)]
    config = build_serve_config(cfg, use_cases, model_uri=str(model_dir))
    urls = deploy(config)
    with httpx.Client(timeout=30.0) as client:
        yield Served(
            cfg,
            {uc.name: uc for uc in use_cases},
            urls,
            RetrievalIndex.load(model_dir / INDEX_FILE),
            model_dir,
            redis_url,
            client,
        )
    serve.shutdown()


def replica_actors() -> set[str]:
    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::")
    }


def new_user() -> int:
    return 10**6 + uuid.uuid4().int % 10**9  # Redis may be shared: fresh ids per test


def ranker(name: str):
    return serve.get_deployment_handle(RANKER_DEPLOYMENT, app_name=name)


def assert_ranked(items: list[dict], diversified: bool) -> None:
    scores = [it["score"] for it in items]
    assert all(s is not None for s in scores)
    if not diversified:
        assert scores == sorted(scores, reverse=True)
    else:  # the top item is the best; within a category the model's order holds
        assert scores[0] == max(scores)
        by_cat: dict[int, list[float]] = {}
        for it in items:
            by_cat.setdefault(it["category_id"], []).append(it["score"])
        assert all(v == sorted(v, reverse=True) for v in by_cat.values())


# --------------------------------------------------------------------------- every use-case


@pytest.mark.parametrize("name", ["ads", "notifications", "related_items", "search", "category"])
def test_use_case_answers_ranked_rule_respecting_results(served, name):
    uc, idx = served.use_cases[name], served.index
    body = example_request(uc, idx, user_id=new_user())
    r = served.rank(name, body)
    assert r.status_code == 200, r.text
    out = r.json()
    items = out["items"]
    assert out["use_case"] == name and out["fallback"] is None and out["request_id"]
    assert 0 < len(items) <= uc.top_k
    assert_ranked(items, diversified="diversify_category" in uc.rules)
    ids = np.array([it["item_id"] for it in items])
    assert len(set(ids.tolist())) == len(ids)
    for it in items:
        assert set(it["probs"]) == {"click", "add_to_cart", "checkout", "engage"}
        expected = sum(w * it["probs"][t] for t, w in uc.score_weights.items())
        assert it["score"] == pytest.approx(expected, rel=1e-6)
    if name == "ads":
        assert (ids % 3 == 0).all()  # eligible ads only (bootstrap catalogue: every 3rd item)
        advs = [it["advertiser_id"] for it in items]
        assert max(advs.count(a) for a in set(advs)) <= 2  # cap_per_advertiser=2
    if name == "category":
        assert {it["category_id"] for it in items} == {body["category_id"]}
    if name == "related_items":
        assert set(ids) <= set(idx.neighbours(body["source_item_id"], 1000).tolist())
    if name == "search":
        assert set(ids) <= set(idx.search(body["query_tokens"], 1000).tolist())
    if name == "notifications":
        assert set(ids) <= {c["item_id"] for c in body["candidates"]}


def test_events_feed_filter_seen_through_redis(served):
    user = new_user()
    body = example_request(served.use_cases["notifications"], served.index, user_id=user)
    first = served.rank("notifications", body).json()["items"]
    top = first[0]["item_id"]
    r = served.client.post(
        served.urls["notifications"] + "/events", json={"user_id": user, "item_id": top}
    )
    assert r.status_code == 200 and r.json()["stored_events"] == 1
    raw = redis.Redis.from_url(served.redis_url).lrange(f"unirank:ev:{user}", 0, -1)
    assert len(raw) == 1 and raw[0].split(b":")[0] == str(top).encode()
    again = served.rank("notifications", body).json()["items"]
    assert top not in [it["item_id"] for it in again]  # filter_seen
    # the store is shared: another application sees the same event
    cat_body = {"user_id": user, "category_id": first[0]["category_id"]}
    cat_items = served.rank("category", cat_body).json()["items"]
    assert top not in [it["item_id"] for it in cat_items]


def test_blocked_items_and_top_k(served):
    body = example_request(served.use_cases["search"], served.index, user_id=new_user())
    full = served.rank("search", body).json()["items"]
    blocked = [full[0]["item_id"], full[1]["item_id"]]
    out = served.rank("search", {**body, "exclude_item_ids": blocked, "top_k": 3}).json()
    assert len(out["items"]) == 3 and not {it["item_id"] for it in out["items"]} & set(blocked)


def test_result_cache_hits_until_the_user_has_a_new_event(served):
    user = new_user()
    body = example_request(served.use_cases["category"], served.index, user_id=user)
    a = served.rank("category", body).json()
    b = served.rank("category", {**body, "request_id": "again"}).json()
    assert not a["cached"] and b["cached"] and b["request_id"] == "again"
    assert b["items"] == a["items"]
    served.client.post(served.urls["category"] + "/events", json={"user_id": user, "item_id": 1})
    assert not served.rank("category", body).json()["cached"]
    # notifications has cache_ttl_s 0: never cached
    nb = example_request(served.use_cases["notifications"], served.index, user_id=user)
    served.rank("notifications", nb)
    assert not served.rank("notifications", nb).json()["cached"]


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "name, body, status, field",
    [
        ("ads", {}, 422, "user_id"),
        ("ads", {"user_id": "seven"}, 422, "user_id"),
        ("ads", {"user_id": 1, "top_k": 0}, 422, "top_k"),
        ("ads", {"user_id": 1, "colour": "red"}, 422, "colour"),
        ("ads", {"user_id": 1, "task_type": "weather"}, 422, "task_type"),
        ("ads", {"user_id": 1, "task_type": "search"}, 422, "task_type"),
        ("notifications", {"user_id": 1}, 422, "candidates"),
        (
            "notifications",
            {"user_id": 1, "candidates": [{"item_id": "x"}]},
            422,
            "candidates.0.item_id",
        ),
        (
            "notifications",
            {"user_id": 1, "candidates": [{"item_id": i} for i in range(201)]},
            422,
            "candidates",
        ),
        ("search", {"user_id": 1}, 422, "query_tokens"),
        ("related_items", {"user_id": 1}, 422, "source_item_id"),
    ],
)
def test_bad_requests_get_4xx_naming_the_field(served, name, body, status, field):
    r = served.rank(name, body)
    assert r.status_code == status, r.text
    assert field in [f["field"] for f in r.json()["fields"]], r.json()


def test_oversized_and_non_json_bodies(served):
    url = served.urls["notifications"] + "/rank"
    big = b'{"user_id": 1, "candidates": [' + b'{"item_id": 1},' * 40_000 + b'{"item_id": 2}]}'
    r = served.client.post(url, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["fields"][0]["field"] == "body"
    assert r.json()["request_id"] == r.headers["x-request-id"]

    def chunked():  # no Content-Length: the limit applies while the chunks arrive
        yield big[:1000]
        for i in range(1000, len(big), 4096):
            yield big[i : i + 4096]

    r = served.client.post(url, content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"], r.text
    r = served.client.post(url, content=b"not json", headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and r.json()["fields"]
    r = served.client.post(served.urls["ads"] + "/events", json={"user_id": 1})
    assert r.status_code == 422 and r.json()["fields"][0]["field"] == "item_id"


def test_poisoned_and_good_requests_concurrently(served):
    """Requests with out-of-range values (over HTTP, and straight to the ranker deployment as
    a buggy client would send them) run at the same time as good ones: each bad one fails
    alone with its field named, and every good one is scored exactly as when sent alone."""
    from serve_apps.ranker import ERROR_KEY, warmup_input

    url = served.urls["notifications"] + "/rank"  # fallback none: any failure is a 503
    goods = [
        {
            "user_id": new_user(),
            "candidates": [{"item_id": i + k} for i in (3, 6, 9, 12)],
            "context": {"hour": 9},
        }
        for k in range(8)
    ]
    reference = [served.client.post(url, json=b).json() for b in goods]
    big = 2**63
    poisoned = [
        (f'{{"user_id": 1, "candidates": [{{"item_id": 5, "category_id": {big}}}]}}', "candidates.0.category_id"),
        ('{"user_id": 1, "candidates": [{"item_id": 5, "price": Infinity}]}', "candidates.0.price"),
        ('{"user_id": 1, "candidates": [{"item_id": 5, "price": 1e39}]}', "candidates.0.price"),
        ('{"user_id": 1, "candidates": [{"item_id": 5, "advertiser_reliability": NaN}]}', "candidates.0.advertiser_reliability"),
        (f'{{"user_id": 1, "candidates": [{{"item_id": 5}}], "context": {{"device": {2**64}}}}}', "context.device"),
        (f'{{"user_id": 1, "candidates": [{{"item_id": 5}}], "exclude_item_ids": [{big}]}}', "exclude_item_ids.0"),
    ]  # fmt: skip
    inf = warmup_input("notifications", 4)
    inf.candidates["price"][0] = np.inf
    overflow = warmup_input("notifications", 4)
    overflow.device = 2**64

    def good(b):
        return httpx.post(url, json=b, timeout=30)

    def bad(text):
        return httpx.post(url, content=text, headers={"content-type": "application/json"})

    handle = ranker("notifications")
    with ThreadPoolExecutor(16) as pool:
        for _ in range(3):
            direct = [handle.rank.remote(x) for x in (inf, overflow)]
            good_f = [pool.submit(good, b) for b in goods]
            bad_f = [pool.submit(bad, text) for text, _ in poisoned]
            for (_, field), f in zip(poisoned, bad_f, strict=True):
                r = f.result()
                assert r.status_code == 422, r.text
                assert field in [e["field"] for e in r.json()["fields"]], r.text
            for ref, f in zip(reference, good_f, strict=True):
                r = f.result()
                assert r.status_code == 200, r.text
                out = r.json()
                assert out["fallback"] is None
                got = {i["item_id"]: i["score"] for i in out["items"]}
                assert got == pytest.approx({i["item_id"]: i["score"] for i in ref["items"]})
            for d in direct:
                assert str(d.result()[ERROR_KEY]).startswith("invalid_input")


# --------------------------------------------------------------------------- fallback


def test_model_failure_falls_back_to_popularity(served):
    ranker("ads").set_fault.remote("error").result()
    try:
        r = served.rank("ads", {"user_id": new_user()})
    finally:
        ranker("ads").set_fault.remote(None).result()
    assert r.status_code == 200
    out = r.json()
    assert out["fallback"] == {"policy": "popularity", "reason": "model_error"}
    pop = served.index.features(np.array([it["item_id"] for it in out["items"]]))["popularity"]
    assert out["items"] and all(it["score"] is None for it in out["items"])
    advs = [it["advertiser_id"] for it in out["items"]]
    assert max(advs.count(a) for a in set(advs)) <= 2  # rules still apply
    assert pop[0] == pop.max()
    assert served.rank("ads", {"user_id": new_user()}).json()["fallback"] is None  # recovered


def test_timeout_falls_back_and_fallback_none_is_a_503(served):
    body = example_request(served.use_cases["related_items"], served.index, user_id=new_user())
    ranker("related_items").set_fault.remote("slow", 4.0).result()
    try:
        t0 = time.perf_counter()
        r = served.rank("related_items", body)
        took = time.perf_counter() - t0
    finally:
        ranker("related_items").set_fault.remote(None).result()
    assert r.status_code == 200 and r.json()["fallback"]["reason"] == "timeout"
    assert took < 3.5  # the 1.5 s deadline, not the 4 s model
    body = example_request(served.use_cases["notifications"], served.index, user_id=new_user())
    ranker("notifications").set_fault.remote("error").result()
    try:
        r = served.rank("notifications", body)  # fallback: none
    finally:
        ranker("notifications").set_fault.remote(None).result()
    assert r.status_code == 503 and "no fallback" in r.json()["error"]


# --------------------------------------------------------------------------- parity, ops


def test_served_scores_equal_the_offline_predictor(served):
    user, now = new_user(), int(time.time())
    history = [(41, 1, now - 9 * 86400), (42, 2, now - 8 * 86400), (43, 1, now - 7 * 86400)]
    for item, etype, ts in history:
        served.client.post(
            served.urls["notifications"] + "/events",
            json={"user_id": user, "item_id": item, "event_type": etype, "timestamp": ts},
        )
    cands = [{"item_id": 7, "category_id": 3, "price": 12.5}, {"item_id": 8}, {"item_id": 10}]
    body = {"user_id": user, "candidates": cands, "context": {"device": 1, "hour": 9}}
    out = served.rank("notifications", body).json()
    assert out["fallback"] is None
    feats = served.index.features(np.array([7, 8, 10]), task_type="notifications")
    lists = served.index.lists(np.array([7, 8, 10]))  # the items' content, as trained on
    table = pa.table(
        {
            "task_type": ["notifications"] * 3,
            "event_time": pa.array([now * 10**6] * 3, pa.timestamp("us", tz="UTC")),
            "user_id": [user] * 3,
            "item_id": [7, 8, 10],
            "category_id": [3, *feats["category_id"][1:].tolist()],
            "advertiser_id": feats["advertiser_id"].tolist(),
            "campaign_id": feats["campaign_id"].tolist(),
            "device": [1] * 3,
            "hour": [9] * 3,
            "price": pa.array([12.5, *feats["price"][1:].tolist()], pa.float32(), from_pandas=True),
            "advertiser_reliability": pa.array(feats["advertiser_reliability"], from_pandas=True),
            **{c: feats[c].tolist() for c in ("brand_id", "price_tier", "release_year_bucket")},
            **{c: lists[c].to_arrow() for c in ("title_tokens", "item_categories")},
            "seq_item_ids": [[41, 42, 43]] * 3,
            "seq_event_types": [[1, 2, 1]] * 3,
            "seq_timestamps": [[ts for _, _, ts in history]] * 3,
        }
    )
    probs = load_predictor(served.model_dir).predict(table)
    uc = served.use_cases["notifications"]
    expected = sum(w * probs[t] for t, w in uc.score_weights.items())
    got = {it["item_id"]: it["score"] for it in out["items"]}
    for i, item in enumerate([7, 8, 10]):
        assert got[item] == pytest.approx(float(expected[i]), abs=1e-5)


def bucket_middle_ages(cfg: UnirankConfig, buckets: list[int]) -> list[int]:
    """Event ages (s) in the geometric middle of time buckets: a minute of test time cannot
    move them to another bucket, so encodings computed a little earlier are exact."""
    from model.modules.sequence import TimeBuckets

    edges = TimeBuckets(cfg.model.sequence.time_buckets).edges.double().numpy()
    return [int(np.sqrt(edges[b - 1] * edges[b])) for b in buckets]


def test_precomputed_user_encoding_used_only_when_fresh(served):
    """Fresh encoding (written by the batch job's encoder) -> used, same scores as on the fly;
    stale, outdated by a newer event, or from another model -> encoded on the fly."""
    from ray_jobs.user_embeddings import UserEncoder

    user, now = new_user(), int(time.time())
    ages = bucket_middle_ages(served.cfg, [9, 7, 5])
    history = [(41, 1, now - ages[0]), (42, 2, now - ages[1]), (43, 1, now - ages[2])]
    url = served.urls["notifications"]  # cache_ttl_s 0: every request is scored
    for item, etype, ts in history:
        served.client.post(
            url + "/events",
            json={"user_id": user, "item_id": item, "event_type": etype, "timestamp": ts},
        )
    body = {"user_id": user, "candidates": [{"item_id": i} for i in (7, 8, 10, 12)]}

    def scores() -> tuple[bool, dict[int, float]]:
        out = served.rank("notifications", body).json()
        assert out["fallback"] is None, out
        return out["used_precomputed_encoding"], {i["item_id"]: i["score"] for i in out["items"]}

    def job_writes(computed_at: float) -> None:
        seq = pa.table(
            {
                "user_id": [user],
                "seq_item_ids": [[h[0] for h in history]],
                "seq_event_types": [[h[1] for h in history]],
                "seq_timestamps": [[h[2] for h in history]],
            }
        )
        cfg = served.cfg.model_dump(mode="json")
        UserEncoder(cfg, str(served.model_dir), computed_at, served.redis_url)(seq)

    used, on_the_fly = scores()
    assert not used
    job_writes(time.time())
    used, pre = scores()
    assert used and pre.keys() == on_the_fly.keys()
    for item, score in pre.items():
        assert score == pytest.approx(on_the_fly[item], abs=1e-5)

    freshness = served.use_cases["notifications"].feature_freshness_s
    job_writes(time.time() - freshness - 60)  # stale
    assert scores() == (False, pytest.approx(on_the_fly, abs=1e-6))

    job_writes(time.time())
    stored = redis.Redis.from_url(served.redis_url).hgetall(f"unirank:enc:{user}")
    other = encoding_from(stored)
    write_encodings(served.redis_url, [(user, dataclasses.replace(other, model="0123456789ab"))])
    assert not scores()[0]  # computed by another model version
    write_encodings(served.redis_url, [(user, other)])
    assert scores()[0]
    served.client.post(url + "/events", json={"user_id": user, "item_id": 44})  # newer event
    used, after = scores()
    assert not used and after.keys() == on_the_fly.keys()


def test_autoscaling_and_replica_config_reach_serve(served):
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    for name, uc in served.use_cases.items():
        deps = details["applications"][name]["deployments"]
        cfg = deps[RANKER_DEPLOYMENT]["deployment_config"]
        auto = cfg["autoscaling_config"]
        assert (auto["min_replicas"], auto["max_replicas"]) == (uc.min_replicas, uc.max_replicas)
        assert auto["target_ongoing_requests"] == uc.target_ongoing_requests
        assert cfg["max_ongoing_requests"] == uc.max_ongoing_requests
        assert cfg["ray_actor_options"]["num_cpus"] == uc.num_cpus
        assert details["applications"][name]["route_prefix"] == uc.route_prefix
    apps = serve.status().applications
    assert all(str(apps[n].status).endswith("RUNNING") for n in served.use_cases)


def test_health_version_and_openapi(served):
    h = served.client.get(served.urls["ads"] + "/healthz").json()
    assert h["status"] == "ok" and h["feature_store"] == {"backend": "redis", "ok": True}
    v = served.client.get(served.urls["ads"] + "/version").json()
    assert v["model_uri"] == str(served.model_dir) and len(v["sha256"]) == 12
    assert v["precision"] == "fp32" and v["device"] == "cpu"
    spec = served.client.get(served.urls["search"] + "/openapi.json").json()
    assert {"/rank", "/events", "/healthz", "/version"} <= set(spec["paths"])
    assert "RankRequest" in spec["components"]["schemas"]


# --------------------------------------------------------------------------- a new use-case


def test_new_use_case_by_config_only(served, tmp_path):
    """A config file + its rules module + a task_type the model knows: deploying it leaves
    the running use-cases untouched."""
    for f in USE_CASES.glob("*.yaml"):
        (tmp_path / f.name).write_text(f.read_text())
    (tmp_path / "homefeed.yaml").write_text(HOMEFEED)
    use_cases = [fit(uc) if uc.name != "homefeed" else uc for uc in load_use_cases(tmp_path)]
    before = replica_actors()
    config = build_serve_config(served.cfg, use_cases, model_uri=str(served.model_dir))
    config["applications"] = [a for a in config["applications"] if a["name"] == "homefeed"]
    config["http_options"]["port"] = served.cfg.serve.port
    urls = deploy(config)
    assert before < replica_actors()  # the running replicas stay; homefeed's are added
    cands = [{"item_id": i} for i in range(1, 30)]
    r = served.client.post(urls["homefeed"] + "/rank", json={"user_id": 5, "candidates": cands})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert len(items) == 5 and all(it["item_id"] % 2 == 0 for it in items)
    assert_ranked(items, diversified=False)
    serve.delete("homefeed")
