"""The exposure log through the real ingress app: every ranked response becomes an exposure
(the slate and scores the client saw), every posted event an outcome that names its
request_id; the in-process log and a real Redis stream; a log that is down never fails a
request; stored records are checked on read."""

from __future__ import annotations

import asyncio
import json
import warnings

import pytest

from model.exposure_log import (
    RECORD_FIELD,
    BadRecord,
    Exposure,
    decode,
    encode,
    stream_key,
    to_tables,
)
from serve_apps.api import build_api
from serve_apps.exposures import MemoryExposureLog, make_exposure_log
from serve_apps.ingress import IngressCore
from serve_apps.ranker import InProcessRanker, ModelScorer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from tests.serve_apps.ingress_helpers import settings  # noqa: E402

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def core(exported):
    model_dir, cfg = exported
    s = settings(model_dir, cfg, "notifications")
    return IngressCore(s, InProcessRanker(ModelScorer(s)))


def rank_and_click(core) -> dict:
    """One /rank and one /events naming its request id, through the FastAPI app."""
    with TestClient(build_api(core), raise_server_exceptions=False) as client:
        body = {
            "user_id": 7,
            "request_id": "req-1",
            "candidates": [{"item_id": i} for i in (3, 5, 8)],
        }
        resp = client.post("/rank", json=body)
        assert resp.status_code == 200, resp.text
        first = resp.json()["items"][0]["item_id"]
        ev = {"user_id": 7, "item_id": first, "event_type": 1, "request_id": "req-1"}
        assert client.post("/events", json=ev).status_code == 200
        bad = client.post("/events", json={**ev, "request_id": "x" * 200})
        assert bad.status_code == 422 and bad.json()["fields"][0]["field"] == "request_id"
    return resp.json()


def check_records(resp: dict, records: list) -> None:
    exposures = [r for _, r in records if r.kind == "exposure"]
    outcomes = [r for _, r in records if r.kind == "outcome"]
    (e,) = [x for x in exposures if x.request_id == "req-1"]
    assert e.items == [i["item_id"] for i in resp["items"]]  # the slate in the order shown
    assert e.scores == pytest.approx([i["score"] for i in resp["items"]])
    assert e.model_version == resp["model_version"] and e.user_id == 7
    assert e.fallback is None and e.arm is None and e.propensity == 1.0
    (o,) = [x for x in outcomes if x.request_id == "req-1"]
    assert (o.user_id, o.item_id, o.event_type) == (7, resp["items"][0]["item_id"], 1)
    exp_t, out_t = to_tables(records)
    assert exp_t.num_rows == len(exposures) and out_t.num_rows == len(outcomes)
    assert exp_t.column("items").to_pylist()[-1] == e.items


def test_exposures_and_outcomes_in_memory(core):
    core.log = MemoryExposureLog()
    resp = rank_and_click(core)
    check_records(resp, asyncio.run(core.log.read("notifications")))


def test_exposures_and_outcomes_in_a_redis_stream(core, redis_url):
    import redis

    redis.Redis.from_url(redis_url).delete(stream_key("notifications"))
    core.log = make_exposure_log("redis", redis_url)
    resp = rank_and_click(core)
    # read back by another client: the stream outlives the replica that wrote it
    raw = redis.Redis.from_url(redis_url).xrange(stream_key("notifications"))
    check_records(resp, [(sid.decode(), decode(f[RECORD_FIELD.encode()])) for sid, f in raw])


def test_a_log_that_is_down_fails_no_request(core):
    core.log = make_exposure_log("redis", "redis://127.0.0.1:1/0")  # nothing listens there
    before = core.metrics.count("unirank_errors", kind="exposure_log", route="/exposure")
    with TestClient(build_api(core), raise_server_exceptions=False) as client:
        r = client.post("/rank", json={"user_id": 1, "candidates": [{"item_id": 3}]})
        assert r.status_code == 200 and r.json()["fallback"] is None
        ev = client.post("/events", json={"user_id": 1, "item_id": 3})
        assert ev.status_code == 200
    after = core.metrics.count("unirank_errors", kind="exposure_log", route="/exposure")
    assert after == before + 1  # counted, not raised
    assert core.metrics.count("unirank_errors", kind="exposure_log", route="/outcome") >= 1


def test_stored_records_are_checked_on_read():
    good = Exposure("r", 1.7e9, "ads", 1, "v", [1, 2], [0.5, 0.25])
    assert decode(encode(good)) == good
    d = json.loads(encode(good))
    for change, message in [
        ({"user_id": -1}, "user_id"),
        ({"user_id": 2**63}, "user_id"),
        ({"ts": 1e12}, "ts"),
        ({"items": [1, "x"]}, "items"),
        ({"scores": [0.5]}, "scores"),
        ({"propensity": 0}, "propensity"),
        ({"kind": "click"}, "kind"),
    ]:
        with pytest.raises(BadRecord, match=message):
            decode(json.dumps({**d, **change}))
    with pytest.raises(BadRecord, match="not JSON"):
        decode("{")
    with pytest.raises(ValueError):
        encode(Exposure("r", float("nan"), "ads", 1, "v", [], None))  # never written
