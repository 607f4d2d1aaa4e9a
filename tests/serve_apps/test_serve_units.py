"""Serving pieces without Serve: rules, retrieval, feature stores, request rows, model URIs."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from model.config import ConfigError, UseCaseConfig
from model.export import load_predictor
from serve_apps.bounds import EventTimes
from serve_apps.feature_store import (
    Encoding,
    Events,
    MemoryFeatureStore,
    RedisFeatureStore,
)
from serve_apps.model_store import resolve_model_dir
from serve_apps.ranker import ModelScorer, ranking_score, warmup_input
from serve_apps.retrieval import INDEX_FILE, RetrievalError, RetrievalIndex, build_index, main
from serve_apps.rows import RankInput, to_columns
from serve_apps.rules import RuleContext, Slate, load_rules, sort_by_score, with_scores
from serve_apps.settings import AppSettings

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def uc(**kw) -> UseCaseConfig:
    return UseCaseConfig(name=kw.pop("name", "ads"), route_prefix="/x", **kw)


def slate(items, cats, advs, scores=None) -> Slate:
    s = Slate(np.asarray(items), np.asarray(cats), np.asarray(advs))
    return sort_by_score(with_scores(s, np.asarray(scores, float), None)) if scores else s


# --------------------------------------------------------------------------- rules


def test_pre_rules_drop_seen_and_blocked():
    rules = load_rules(uc(rules=["filter_seen", "blocked_items"]))
    ctx = RuleContext(uc(), seen_item_ids=frozenset({2}), blocked_item_ids=frozenset({4}))
    out = rules.apply_pre(ctx, slate([1, 2, 3, 4], [0] * 4, [0] * 4))
    assert out.item_id.tolist() == [1, 3]


def test_cap_per_advertiser_keeps_the_best_and_organic_items():
    rules = load_rules(uc(rules=["cap_per_advertiser=2"], top_k=10))
    s = slate([1, 2, 3, 4, 5, 6], [0] * 6, [7, 7, 7, 0, 0, 8], scores=[6, 5, 4, 3, 2, 1])
    out = rules.apply_post(RuleContext(uc(), top_k=10), s)
    assert out.item_id.tolist() == [1, 2, 4, 5, 6]  # item 3: advertiser 7's third


def test_diversify_interleaves_categories_and_keeps_the_top_item():
    rules = load_rules(uc(rules=["diversify_category"]))
    s = slate([1, 2, 3, 4, 5], [1, 1, 1, 2, 3], [0] * 5, scores=[5, 4, 3, 2, 1])
    out = rules.apply_post(RuleContext(uc(), top_k=4), s)
    assert out.item_id.tolist() == [1, 4, 5, 2]  # one per category, then the next round


def test_unknown_rule_and_bad_argument_name_the_rule():
    with pytest.raises(ConfigError, match="unknown rule 'nope'"):
        load_rules(uc(rules=["nope"]))
    with pytest.raises(ConfigError, match="cap_per_advertiser=x"):
        load_rules(uc(rules=["cap_per_advertiser=x"]))
    with pytest.raises(ConfigError, match="rules_module 'no.such.module'"):
        load_rules(uc(rules_module="no.such.module"))


def test_rules_module_registers_rules_for_its_use_case_only(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # replicas get the repo on PYTHONPATH
    mod = "tests.serve_apps.homefeed_rules"
    rs = load_rules(uc(name="homefeed", rules=["only_even_items"], rules_module=mod))
    out = rs.apply_pre(RuleContext(uc()), slate([1, 2, 3, 4], [0] * 4, [0] * 4))
    assert out.item_id.tolist() == [2, 4]


# --------------------------------------------------------------------------- retrieval


def test_index_from_parquet_serves_every_retrieval_rule(exported, tmp_path):
    model_dir, _ = exported
    idx = RetrievalIndex.load(model_dir / INDEX_FILE)
    assert len(idx) > 100
    pop = idx.features(idx.popular(20))["popularity"]
    assert np.all(np.diff(pop) <= 0)
    cat = int(idx.features(idx.popular(1))["category_id"][0])
    in_cat = idx.popular_in_category(cat, 50)
    assert len(in_cat) and np.all(idx.features(in_cat)["category_id"] == cat)
    ads = idx.eligible_ads(None, 500)
    assert len(ads) and np.all(idx.features(ads)["campaign_id"] > 0)
    campaign = int(idx.features(ads[:1])["campaign_id"][0])
    assert np.all(idx.features(idx.eligible_ads([campaign], 50))["campaign_id"] == campaign)
    key = int(idx.a["co_keys"][np.argmax(np.diff(idx.a["co_indptr"]))])
    nb = idx.neighbours(key, 10)
    assert len(nb) and key not in nb.tolist()
    tok = int(idx.a["tok_keys"][0])
    assert len(idx.search([tok], 10)) > 0 and len(idx.search([10**9], 10)) == 0
    assert idx.popular_in_category(10**6, 5).size == 0
    feats = idx.features(np.array([10**9]))
    assert feats["category_id"][0] == 0 and np.isnan(feats["price"][0])


def test_search_ranks_items_matching_more_tokens_first():
    t = pa.table(
        {
            "task_type": ["search"] * 3,
            "item_id": [1, 2, 3],
            "category_id": [1, 1, 1],
            "advertiser_id": [0, 0, 0],
            "campaign_id": [0, 0, 0],
            "source_item_id": [0, 0, 0],
            "price": [1.0, 1.0, 1.0],
            "advertiser_reliability": [None, None, None],
            "query_tokens": [[5], [5, 6], [6]],
            "seq_item_ids": [[], [], []],
            "click": [1.0, 0.0, 1.0],
        }
    )
    idx = build_index(t)
    assert idx.search([5, 6], 3).tolist()[0] == 2


def test_index_cli_and_errors(tmp_path, rows):
    from serve_apps.bootstrap import write_rows

    data = write_rows(rows.slice(0, 500), tmp_path / "data")
    assert main([str(data), "-o", str(tmp_path / "ri.npz")]) == 0
    assert len(RetrievalIndex.load(tmp_path / "ri.npz")) > 0
    with pytest.raises(RetrievalError, match="does not exist"):
        RetrievalIndex.load(tmp_path / "missing.npz")
    # only the item column is indispensable: the error names it and the config field
    with pytest.raises(RetrievalError, match=r"no item column 'item_id' \(dataset.catalogue"):
        build_index([str(_one_col(tmp_path))])


def _one_col(tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"user_id": [1]}), path)
    return path


# --------------------------------------------------------------------------- feature stores


def _store_contract(store, user: int) -> None:
    async def go():
        assert len(await store.recent(user, 5)) == 0
        for i in range(10):
            await store.append(user, 100 + i, 1, 1000 + i)
        ev = await store.recent(user, 4)
        assert ev.item_ids.tolist() == [106, 107, 108, 109]  # newest 4, oldest first
        assert ev.timestamps.tolist() == [1006, 1007, 1008, 1009] and ev.last_ts == 1009
        assert len(await store.recent(user, 100)) == 8  # keep=8 trims the oldest
        enc = Encoding(np.arange(6, dtype=np.float32).reshape(2, 3), time.time(), 1009)
        await store.put_encoding(user, enc)
        got = await store.get_encoding(user)
        np.testing.assert_array_equal(got.vector, enc.vector)
        assert got.last_event_ts == 1009 and await store.get_encoding(user + 1) is None
        # online profile: fields are set one by one, the others kept
        assert await store.get_profile(user) is None
        await store.put_profile(user, {"region": 3, "declared_interests": [4, 5]})
        await store.put_profile(user, {"region": 6, "age_band": 2})
        got = await store.get_profile(user)
        assert got == {"region": 6, "age_band": 2, "declared_interests": [4, 5]}
        assert await store.ping()
        await store.close()

    asyncio.run(go())


def test_memory_feature_store():
    _store_contract(MemoryFeatureStore(keep=8), 1)


@pytest.mark.integration
def test_redis_feature_store(redis_url):
    _store_contract(RedisFeatureStore(redis_url, keep=8, prefix=f"t{uuid.uuid4().hex[:8]}"), 7)


def _ordering_and_repair(store, user: int, inject) -> list[tuple[int, str, int]]:
    """Backfills go into place; an unreadable or out-of-order stored history is repaired
    (good events kept in order, bad entries quarantined) and reported, never dropped whole.
    ``inject(user, raw_entries)`` writes entries as another writer / an older version would."""
    now = int(time.time())

    async def go():
        for item, ts in [(1, now - 500), (3, now - 300), (2, now - 400), (0, now - 900)]:
            await store.append(user, item, 1, ts)
        await store.append(user, 4, 2, now - 300)  # same time as item 3: after it
        ev = await store.recent(user, 10)
        assert ev.item_ids.tolist() == [0, 1, 2, 3, 4]
        assert ev.timestamps.tolist() == sorted(ev.timestamps.tolist())
        assert ev.last_ts == now - 300 and ev.event_types.tolist() == [1, 1, 1, 1, 2]
        assert len(await store.recent(user, 2)) == 2
        # keep=8: three more events in between and a backfill older than all of them
        for i in range(3):
            await store.append(user, 10 + i, 1, now - 350 + i)
        assert await store.append(user, 99, 1, now - 10_000) == 8  # trimmed at once
        ev = await store.recent(user, 10)
        assert 99 not in ev.item_ids.tolist() and len(ev) == 8
        assert ev.timestamps.tolist() == sorted(ev.timestamps.tolist())

        # a corrupted history: garbage, an id past int64, the year 5000, and disorder
        bad_user = user + 1
        inject(
            bad_user,
            [
                (7, 1, now - 50),
                (5, 1, now - 100),  # out of order
                "garbage",
                (2**64, 1, now - 40),
                (6, 1, 95_649_033_600),
                (8, 1, now - 20),
            ],
        )
        ev = await store.recent(bad_user, 10)
        assert ev.item_ids.tolist() == [5, 7, 8] and ev.last_ts == now - 20
        again = await store.recent(bad_user, 10)  # repaired in the store: read clean
        assert again.item_ids.tolist() == [5, 7, 8]
        assert len(await store.quarantined(bad_user)) == 3
        await store.append(bad_user, 9, 1, now - 60)
        assert (await store.recent(bad_user, 10)).item_ids.tolist() == [5, 9, 7, 8]
        await store.close()

    reports: list = []
    store.on_repair = lambda u, reason, n: reports.append((u, reason, n))
    asyncio.run(go())
    return reports


def test_memory_store_keeps_time_order_and_repairs_histories():
    store = MemoryFeatureStore(keep=8, times=EventTimes(0))

    def inject(user, rows):
        store._events[user] = list(rows)  # the in-process store's own list of entries

    reports = _ordering_and_repair(store, 1, inject)
    assert sorted(r[1:] for r in reports) == [
        ("bad_timestamp", 1),
        ("out_of_order", 1),
        ("unreadable", 2),
    ]


@pytest.mark.integration
def test_redis_store_keeps_time_order_and_repairs_histories(redis_url):
    import redis

    prefix = f"t{uuid.uuid4().hex[:8]}"
    store = RedisFeatureStore(redis_url, keep=8, prefix=prefix, times=EventTimes(0))
    client = redis.Redis.from_url(redis_url)

    def inject(user, rows):
        raw = [":".join(map(str, r)) if isinstance(r, tuple) else r for r in rows]
        client.rpush(f"{prefix}:ev:{user}", *raw)

    reports = _ordering_and_repair(store, 11, inject)
    assert sorted(r[1:] for r in reports) == [
        ("bad_timestamp", 1),
        ("out_of_order", 1),
        ("unreadable", 2),
    ]
    bad = client.lrange(f"{prefix}:bad:12", 0, -1)  # quarantined, not lost
    assert len(bad) == 3 and {b"garbage", b"6:1:95649033600"} <= set(bad)

    def read_once(method: str, user: int):
        """One read through a fresh store (its own event loop), reports collected."""
        reports.clear()
        store = RedisFeatureStore(
            redis_url, keep=8, prefix=prefix, on_repair=lambda *a: reports.append(a)
        )

        async def go():
            got = await getattr(store, method)(user)
            await store.close()
            return got

        return asyncio.run(go())

    # an unreadable encoding: reported, deleted (the batch job writes a new one), not fatal
    client.hset(f"{prefix}:enc:13", mapping={"shape": "not json", "vector": b"xx"})
    assert read_once("get_encoding", 13) is None
    assert reports == [(13, "encoding_unreadable", 1)] and not client.exists(f"{prefix}:enc:13")

    # unreadable online-profile fields: reported and deleted, the readable ones kept
    client.hset(f"{prefix}:profile:14", mapping={"region": "5", "age_band": "-1", "x": "{"})
    assert read_once("get_profile", 14) == {"region": 5}
    assert reports == [(14, "profile_unreadable", 2)]
    assert client.hkeys(f"{prefix}:profile:14") == [b"region"]
    client.close()


def test_cache_key_changes_when_a_backfill_changes_the_history():
    from serve_apps.ingress import cache_key
    from serve_apps.schemas import RankRequest

    req = RankRequest(user_id=1, category_id=2)
    a = Events.from_rows([(1, 1, 100), (2, 1, 300)])
    b = Events.from_rows([(3, 1, 200), (2, 1, 300)])  # same length, same newest event
    assert a.last_ts == b.last_ts and cache_key(req, a) != cache_key(req, b)


def test_encoding_freshness():
    ev = Events.from_rows([(1, 1, 100)])
    enc = Encoding(np.zeros(2, np.float32), computed_at=1000.0, last_event_ts=100)
    assert enc.usable(now=1500, freshness_s=600, events=ev)
    assert not enc.usable(now=2000, freshness_s=600, events=ev)  # too old
    assert not enc.usable(now=1500, freshness_s=600, events=Events.from_rows([(1, 1, 200)]))
    assert enc.status(1500, 600, ev) == "fresh" and enc.status(2000, 600, ev) == "stale"
    assert enc.status(1500, 600, Events.from_rows([(1, 1, 200)])) == "outdated"


# --------------------------------------------------------------------------- rows and model


def test_request_rows_match_the_offline_predictor(exported, rows):
    """RankInput -> to_columns -> predictor equals the same rows as a unified-schema table."""
    model_dir, cfg = exported
    pred = load_predictor(model_dir)
    ev = Events.from_rows([(5, 1, 1_767_000_000), (9, 2, 1_767_100_000)])
    inp = RankInput(
        task_type="search",
        now=1_767_200_000,
        user_id=3,
        candidates={
            "item_id": np.array([3, 6, 9]),
            "category_id": np.array([1, 2, 3]),
            "advertiser_id": np.array([0, 1, 0]),
            "campaign_id": np.array([0, 11, 0]),
            "price": np.array([1.0, np.nan, 3.0], np.float32),
            "advertiser_reliability": np.array([np.nan, 0.5, np.nan], np.float32),
        },
        events=ev,
        query_tokens=np.array([4, 5]),
        device=1,
        hour=7,
        surface=2,
    )
    got = pred.predict(to_columns([inp, inp]))
    table = pa.table(
        {
            "task_type": ["search"] * 3,
            "event_time": pa.array([1_767_200_000 * 10**6] * 3, pa.timestamp("us", tz="UTC")),
            "user_id": [3] * 3,
            "item_id": [3, 6, 9],
            "category_id": [1, 2, 3],
            "advertiser_id": [0, 1, 0],
            "campaign_id": [0, 11, 0],
            "source_item_id": [0] * 3,
            "query_tokens": [[4, 5]] * 3,
            "device": [1] * 3,
            "hour": [7] * 3,
            "surface": [2] * 3,
            "price": pa.array([1.0, None, 3.0], pa.float32()),
            "advertiser_reliability": pa.array([None, 0.5, None], pa.float32()),
            "seq_item_ids": [[5, 9]] * 3,
            "seq_event_types": [[1, 2]] * 3,
            "seq_timestamps": [[1_767_000_000, 1_767_100_000]] * 3,
        }
    )
    ref = pred.predict(table)
    for task in ref:
        np.testing.assert_allclose(got[task][:3], ref[task], atol=1e-6)
        np.testing.assert_allclose(got[task][3:], ref[task], atol=1e-6)


def test_scorer_checks_task_types_and_weights(exported):
    model_dir, cfg = exported
    base = cfg.model_dump(mode="json")
    ok = {"name": "ads", "route_prefix": "/ads", "score_weights": {"click": 1, "checkout": 2}}
    args = {"use_case": "ads", "model_uri": str(model_dir), "config": {**base, "use_cases": [ok]}}
    scorer = ModelScorer(AppSettings.from_args(args))
    (out,) = scorer.score([warmup_input("ads", 5)])
    probs = {k: v for k, v in out.items() if not k.startswith("__")}
    np.testing.assert_allclose(out["__score__"], probs["click"] + 2 * probs["checkout"])
    assert (str(out["__encoding__"]), str(out["__encoding_reason__"])) == ("on_the_fly", "missing")
    np.testing.assert_allclose(ranking_score(probs, {"click": 1.0}), probs["click"])
    assert "CUDA Graphs skipped" in scorer.version["cuda_graphs"]

    bad = {**ok, "name": "email", "route_prefix": "/email"}
    args = {
        "use_case": "email",
        "model_uri": str(model_dir),
        "config": {**base, "use_cases": [bad]},
    }
    with pytest.raises(ConfigError, match="not trained on task_type 'email'"):
        ModelScorer(AppSettings.from_args(args))
    bad = {**ok, "score_weights": {"dwell": 1.0}}
    args = {"use_case": "ads", "model_uri": str(model_dir), "config": {**base, "use_cases": [bad]}}
    with pytest.raises(ConfigError, match="dwell"):
        ModelScorer(AppSettings.from_args(args))


def test_app_args_and_model_uris_fail_with_the_field_named(exported, tmp_path):
    model_dir, cfg = exported
    with pytest.raises(ConfigError, match="unknown keys"):
        AppSettings.from_args({"use_case": "ads", "config": {}, "colour": 1})
    with pytest.raises(ConfigError, match="not in config.use_cases"):
        AppSettings.from_args({"use_case": "ads", "config": {}})
    with pytest.raises(ConfigError, match="not an exported model directory"):
        resolve_model_dir(str(tmp_path), cfg)
    with pytest.raises(ConfigError, match="model_uri is not set"):
        resolve_model_dir(None, cfg)
    assert resolve_model_dir(f"file://{model_dir}", cfg) == model_dir
    assert json.loads((model_dir / "manifest.json").read_text())["format"]
