"""The ingress's HTTP app without Ray: bounds on every field, bounded JSON errors on every
route, body limits before parsing, non-finite scores, and the ranker's batch isolation.

Each use-case's real FastAPI app (serve_apps.api.build_api) runs over a real IngressCore and
the ranker's in-process path (serve_apps.ranker.InProcessRanker: the same pre-batch check and
scoring as the Ranker deployment) on an exported model, through Starlette's TestClient.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from model.config import load_config
from serve_apps.api import build_api
from serve_apps.bounds import EventTimes, InvalidRankInput, check_rank_input
from serve_apps.feature_store import Events
from serve_apps.ingress import IngressCore
from serve_apps.ranker import ERROR_KEY, refuse, warmup_input
from tests.serve_apps.ingress_helpers import core_for, fields, make_apps, post, settings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
BIG = 2**63  # one past int64
MIN_TS = EventTimes.from_config(load_config(None)).min_ts  # prepare.min_event_time


@pytest.fixture(scope="module")
def apps(exported):
    """{use-case: (core, client)} over the session's exported model, memory store."""
    out = make_apps(*exported, ("ads", "notifications", "related_items", "search", "category"))
    yield out
    for _, client in out.values():
        client.close()


# --------------------------------------------------------------------------- bounds


@pytest.mark.parametrize(
    "name, body, field",
    [
        # ids past int64: a 500 OverflowError before (issue 16)
        ("notifications", f'{{"user_id": 1, "candidates": [{{"item_id": 5, "category_id": {BIG}}}]}}', "candidates.0.category_id"),
        ("ads", f'{{"user_id": 1, "candidates": [{{"item_id": 6, "advertiser_id": {BIG}}}]}}', "candidates.0.advertiser_id"),
        ("ads", f'{{"user_id": 1, "candidates": [{{"item_id": 6, "campaign_id": {BIG}}}]}}', "candidates.0.campaign_id"),
        ("ads", f'{{"user_id": 1, "query_tokens": [3, {BIG}]}}', "query_tokens.1"),
        ("ads", f'{{"user_id": 1, "exclude_item_ids": [{BIG}]}}', "exclude_item_ids.0"),
        ("ads", f'{{"user_id": 1, "campaign_ids": [{2**64}]}}', "campaign_ids.0"),
        ("search", f'{{"user_id": 1, "query_tokens": [{BIG}]}}', "query_tokens.0"),
        ("category", f'{{"user_id": 1, "category_id": {BIG}}}', "category_id"),
        ("ads", f'{{"user_id": {BIG}}}', "user_id"),
        ("ads", '{"user_id": -1}', "user_id"),
        # absurd context: a 200 before
        ("ads", f'{{"user_id": 1, "context": {{"device": {2**64}}}}}', "context.device"),
        ("ads", f'{{"user_id": 1, "context": {{"surface": {2**64}}}}}', "context.surface"),
        ("related_items", f'{{"user_id": 1, "source_item_id": {2**64}}}', "source_item_id"),
        # non-finite / float32-overflowing floats: a 200 with null scores before
        ("notifications", '{"user_id": 1, "candidates": [{"item_id": 5, "price": Infinity}]}', "candidates.0.price"),
        ("notifications", '{"user_id": 1, "candidates": [{"item_id": 5, "price": -Infinity}]}', "candidates.0.price"),
        ("notifications", '{"user_id": 1, "candidates": [{"item_id": 5, "price": 1e309}]}', "candidates.0.price"),
        ("notifications", '{"user_id": 1, "candidates": [{"item_id": 5, "price": 1e39}]}', "candidates.0.price"),
        ("notifications", '{"user_id": 1, "candidates": [{"item_id": 5, "advertiser_reliability": NaN}]}', "candidates.0.advertiser_reliability"),
        ("notifications", '{"user_id": 1, "candidates": [{"item_id": 5, "advertiser_reliability": 1.5}]}', "candidates.0.advertiser_reliability"),
        # item content and user profile: int64 ids >= 0, lists of at most MAX_LIST_IDS
        ("notifications", f'{{"user_id": 1, "candidates": [{{"item_id": 5, "brand_id": {BIG}}}]}}', "candidates.0.brand_id"),
        ("notifications", '{"user_id": 1, "candidates": [{"item_id": 5, "price_tier": -1}]}', "candidates.0.price_tier"),
        ("notifications", f'{{"user_id": 1, "candidates": [{{"item_id": 5, "release_year_bucket": {BIG}}}]}}', "candidates.0.release_year_bucket"),
        ("notifications", f'{{"user_id": 1, "candidates": [{{"item_id": 5, "title_tokens": [1, {BIG}]}}]}}', "candidates.0.title_tokens.1"),
        ("notifications", f'{{"user_id": 1, "candidates": [{{"item_id": 5, "title_tokens": {list(range(33))}}}]}}', "candidates.0.title_tokens"),
        ("notifications", '{"user_id": 1, "candidates": [{"item_id": 5, "item_categories": [-3]}]}', "candidates.0.item_categories.0"),
        ("ads", f'{{"user_id": 1, "profile": {{"region": {BIG}}}}}', "profile.region"),
        ("ads", '{"user_id": 1, "profile": {"age_band": -1}}', "profile.age_band"),
        ("ads", f'{{"user_id": 1, "profile": {{"declared_interests": {list(range(33))}}}}}', "profile.declared_interests"),
        ("ads", '{"user_id": 1, "profile": {"gender": 1}}', "profile.gender"),
    ],
)  # fmt: skip
def test_out_of_range_values_are_422s_naming_the_field(apps, name, body, field):
    core, _ = apps[name]
    before = core.metrics.count("unirank_errors", kind="validation", route="/rank")
    r = post(apps, name, body)
    assert r.status_code == 422, r.text
    out = r.json()
    assert field in fields(r), out
    assert out["request_id"] and out["error_count"] == len(out["fields"]) >= 1
    assert core.metrics.count("unirank_errors", kind="validation", route="/rank") == before + 1


def test_values_at_the_bounds_are_scored(apps):
    """int64 max ids and float32 max prices reach the model and come back finite; a device
    the model has no row for is its placeholder 0 (same scores as device 0)."""
    top = 2**63 - 1
    cands = [
        {"item_id": 5, "category_id": top, "advertiser_id": top, "campaign_id": top},
        {"item_id": top, "price": 3.4e38, "advertiser_reliability": 1.0},
        {"item_id": 9, "price": -3.4e38, "advertiser_reliability": 0.0},
    ]
    body = {
        "user_id": top,
        "candidates": cands,
        "query_tokens": [top],
        "exclude_item_ids": [top - 1],
        "source_item_id": top,
        "context": {"hour": 3, "device": top, "surface": top},
    }
    r = post(apps, "notifications", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["fallback"] is None and out["items"]
    assert all(np.isfinite(it["score"]) for it in out["items"])
    zero = {**body, "context": {"hour": 3, "device": 0, "surface": 0}}
    again = post(apps, "notifications", zero).json()["items"]
    assert [(i["item_id"], i["score"]) for i in again] == [
        (i["item_id"], i["score"]) for i in out["items"]
    ]


def test_error_bodies_are_bounded(apps):
    body = {"user_id": 1, "candidates": [{"item_id": "x"} for _ in range(150)]}
    r = post(apps, "notifications", body)
    assert r.status_code == 422
    out = r.json()
    assert len(out["fields"]) == 20 and out["error_count"] == 150
    assert "150 field errors, the first 20 listed" in out["error"]
    assert fields(r)[0] == "candidates.0.item_id"


def test_body_limits_apply_before_parsing(apps):
    """200,000 malformed candidates: a 413 of a few hundred bytes, the body never parsed
    (no validation error counted), with Content-Length and chunked."""
    core, client = apps["notifications"]
    big = '{"user_id": 1, "candidates": [' + '{"item_id": "x"},' * 200_000 + '{"item_id": 1}]}'
    validations = core.metrics.count("unirank_errors", kind="validation")
    r = post(apps, "notifications", big)
    assert r.status_code == 413 and len(r.content) < 500, r.text[:300]
    assert fields(r) == ["body"] and r.json()["request_id"]

    def chunks():  # no Content-Length: Transfer-Encoding: chunked
        yield b'{"user_id": 1, "candidates": ['
        for _ in range(2000):
            yield b'{"item_id": "x"},' * 100
        yield b'{"item_id": 1}]}'

    r = client.post("/rank", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert core.metrics.count("unirank_errors", kind="body_too_large", route="/rank") == 2
    assert core.metrics.count("unirank_errors", kind="validation") == validations
    r = post(apps, "notifications", {"user_id": 1, "item_id": 2, "pad": "x" * 5000}, "/events")
    assert r.status_code == 413


def test_every_error_is_json_with_a_request_id_and_counted(apps, exported):
    core, client = apps["ads"]
    r = client.get("/no/such/route")
    assert r.status_code == 404 and r.json()["request_id"]
    assert core.metrics.count("unirank_errors", kind="http_404", route="other") >= 1
    r = client.get("/rank")
    assert r.status_code == 405 and r.json()["request_id"]
    # a pydantic 422 carries the body's request_id, else the X-Request-ID header's
    r = post(apps, "ads", {"request_id": "req-7", "user_id": "seven"})
    assert r.status_code == 422 and r.json()["request_id"] == "req-7"
    assert fields(r) == ["user_id"]
    r = post(apps, "ads", {"user_id": "seven"}, headers={"x-request-id": "hdr-9"})
    assert r.json()["request_id"] == "hdr-9"
    r = post(apps, "ads", {"request_id": "a\nb", "user_id": 1}, headers={"x-request-id": "h\tx"})
    assert r.status_code == 422 and fields(r) == ["request_id"]  # echoed in logs: printable
    assert r.json()["request_id"] not in ("a\nb", "h\tx")
    r = post(apps, "ads", "not json")
    assert r.status_code == 422 and fields(r) == ["body"] and r.json()["request_id"]
    assert core.metrics.count("unirank_requests", status="422", route="/rank") >= 3

    # /events with the store down (nothing listens on that port): a 503 naming it
    model_dir, cfg = exported
    down = core_for(model_dir, cfg, "ads", store="redis", redis_url="redis://127.0.0.1:9/0")
    with TestClient(build_api(down), raise_server_exceptions=False) as c:
        r = c.post("/events", json={"user_id": 1, "item_id": 2})
        assert r.status_code == 503 and "feature store" in r.json()["error"]
        assert r.json()["request_id"]
        assert down.metrics.count("unirank_errors", kind="feature_store", route="/events") == 1

    # /version with an unreachable ranker: a 503 as JSON, not a 500
    class Unreachable:
        async def rank(self, inp, timeout_s):
            raise ConnectionError("ranker replica gone")

        async def version(self):
            raise ConnectionError("ranker replica gone")

    broken = IngressCore(settings(model_dir, cfg, "notifications"), Unreachable())
    with TestClient(build_api(broken), raise_server_exceptions=False) as c:
        r = c.get("/version")
        assert r.status_code == 503 and r.json()["request_id"]
        assert broken.metrics.count("unirank_errors", kind="ranker_unavailable", route="/version")
        r = c.post("/rank", json={"user_id": 1, "candidates": [{"item_id": 3}]})
        assert r.status_code == 503 and "no fallback" in r.json()["error"]  # fallback: none

    # anything unforeseen (here a ranker of another version answering without a score) is a
    # JSON 500 with the request id, logged and counted, not Starlette's plain-text page
    class Garbled(Unreachable):
        async def rank(self, inp, timeout_s):
            return {"click": np.ones(len(inp))}

    odd = IngressCore(settings(model_dir, cfg, "notifications"), Garbled())
    with TestClient(build_api(odd), raise_server_exceptions=False) as c:
        r = c.post("/rank", json={"user_id": 1, "candidates": [{"item_id": 3}]})
        assert r.status_code == 500 and r.json()["error"] == "internal error: KeyError"
        assert r.json()["request_id"]
        assert odd.metrics.count("unirank_errors", kind="internal", route="/rank") == 1


@pytest.mark.parametrize(
    "ts, ok",
    [
        (BIG - 1, False),  # the year 292 billion
        (95_649_033_600, False),  # the year 5000
        (0, False),
        (MIN_TS - 1, False),
        (MIN_TS, True),
        (int(time.time()) + 3600, True),
        (int(time.time()) + 2 * 86400, False),
    ],
)
def test_event_timestamps_are_bounded(apps, ts, ok):
    r = post(apps, "ads", {"user_id": 77, "item_id": 3, "timestamp": ts}, "/events")
    assert r.status_code == (200 if ok else 422), r.text
    if not ok:
        assert fields(r) == ["timestamp"] and "min_event_time" in r.json()["error"]
    r = post(apps, "ads", {"user_id": 77, "item_id": 3, "timestamp": BIG}, "/events")
    assert r.status_code == 422 and fields(r) == ["timestamp"]


# --------------------------------------------------------------------------- non-finite scores


@pytest.fixture(scope="module")
def broken_export(exported, tmp_path_factory):
    """A copy of the export whose click calibrator is NaN (as a diverged fit would write):
    every click probability, hence every score, is NaN."""
    model_dir, cfg = exported
    out = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(model_dir, out)
    cal = json.loads((out / "calibrators.json").read_text())
    cal["tasks"]["click"]["default"] = {"kind": "platt", "a": float("nan"), "b": 0.0}
    (out / "calibrators.json").write_text(json.dumps(cal))
    return out, cfg


def test_non_finite_scores_are_a_marked_fallback_never_served_or_cached(broken_export):
    model_dir, cfg = broken_export
    core = core_for(model_dir, cfg, "category")  # cache_ttl_s > 0, fallback: popularity
    with TestClient(build_api(core), raise_server_exceptions=False) as c:
        body = {"user_id": 5, "category_id": 3}
        for _ in range(2):
            r = c.post("/rank", json=body)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["fallback"] == {"policy": "popularity", "reason": "model_error"}
            assert out["items"] and all(it["score"] is None for it in out["items"])
            assert not out["cached"]
    assert core.metrics.count("unirank_errors", kind="non_finite_score") == 2
    assert core.metrics.count("unirank_fallbacks", reason="model_error") == 2
    none = core_for(model_dir, cfg, "notifications")  # fallback: none -> 503
    with TestClient(build_api(none), raise_server_exceptions=False) as c:
        r = c.post("/rank", json={"user_id": 5, "candidates": [{"item_id": 3}]})
        assert r.status_code == 503 and "non_finite_score" in r.json()["error"]


# --------------------------------------------------------------------------- batch isolation


def test_a_poisoned_request_never_spoils_its_batch(apps):
    """What reaches the Ranker's batched call: inputs that slipped past the HTTP checks
    (infinite price; a device past int64, which overflows when the batch is built) fail
    alone, and the good ones of the same batch score exactly as when scored alone."""
    core, _ = apps["notifications"]
    scorer = core.ranker.scorer
    good = [warmup_input("notifications", 7), warmup_input("notifications", 3)]
    good[1].candidates["price"][:] = 12.5
    inf = warmup_input("notifications", 4)
    inf.candidates["price"][1] = np.inf
    overflow = warmup_input("notifications", 5)
    overflow.device = 2**64

    alone = [scorer.score_batch([g])[0] for g in good]
    out = scorer.score_batch([good[0], inf, good[1], overflow])
    assert str(out[1][ERROR_KEY]) == "non_finite_score"
    assert str(out[3][ERROR_KEY]).startswith("model_error")
    for got, ref in zip((out[0], out[2]), alone, strict=True):
        assert ERROR_KEY not in got
        np.testing.assert_array_equal(got["__score__"], ref["__score__"])

    # the Ranker refuses both before they could join a batch, naming the field
    assert "candidates.price" in str(refuse(inf, scorer.times)[ERROR_KEY])
    assert "device" in str(refuse(overflow, scorer.times)[ERROR_KEY])
    assert refuse(good[0], scorer.times) is None
    late = warmup_input("notifications", 2)
    late.events = Events.from_rows([(1, 1, int(time.time()) + 5 * 86400)])
    with pytest.raises(InvalidRankInput, match="events.timestamps"):
        check_rank_input(late, scorer.times)
