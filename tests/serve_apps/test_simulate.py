"""The closed-loop simulator against the real ingress app in process (FastAPI over httpx's
ASGI transport, the ranker's in-process path): the world's users rank, answer with events
that name the request, and the exposure log joins them."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from model.config import load_config
from serve_apps.api import build_api
from serve_apps.exposures import MemoryExposureLog
from serve_apps.ingress import IngressCore
from serve_apps.ranker import InProcessRanker, ModelScorer
from serve_apps.simulate import Users, examine_probability, run
from tests.serve_apps.ingress_helpers import settings

pytestmark = pytest.mark.unit


def test_users_answer_with_the_worlds_probabilities():
    users = Users.build(load_config(None), "ads", seed=0)
    assert examine_probability(np.arange(3)).tolist() == pytest.approx([1.0, 1 / np.log2(3), 0.5])
    user = users.draw_user()
    items = [int(i) for i in users.world.ad_items[:10]]
    p = users.truth(user, items)
    assert ((p["click"] > 0) & (p["click"] < 1)).all() and (p["engage"] == 0).all()
    # the empirical click rate over many draws matches the probabilities
    clicks = np.zeros(len(items))
    for _ in range(3000):
        for item, kind, _ in users.respond(user, items):
            clicks[items.index(item)] += kind == "click"
    np.testing.assert_allclose(clicks / 3000, p["click"], atol=0.03)
    with pytest.raises(ValueError, match="not supported"):
        Users.build(load_config(None), "search", seed=0)


def test_closed_loop_through_the_ingress(exported):
    model_dir, cfg = exported
    s = settings(model_dir, cfg, "notifications")
    core = IngressCore(s, InProcessRanker(ModelScorer(s)))
    core.log = MemoryExposureLog()
    users = Users.build(load_config(None), "notifications", seed=1)
    users.candidates = 20

    async def go():
        transport = httpx.ASGITransport(app=build_api(core))
        async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
            return await run(client, "", users, requests=40, concurrency=4, max_delay_s=0.01)

    out = asyncio.run(go())
    assert set(out["statuses"]) == {200}
    tally = out["arms"]["none"]  # no experiment configured
    assert tally["exposures"] == 40 and 0 < tally["expected_ctr"] < 1
    records = asyncio.run(core.log.read("notifications"))
    exposures = {r.request_id: r for _, r in records if r.kind == "exposure"}
    outcomes = [r for _, r in records if r.kind == "outcome"]
    assert len(exposures) == 40
    assert len(outcomes) == sum(tally["events"].values()) > 0
    for o in outcomes:  # every event names a response that showed its item
        assert o.item_id in exposures[o.request_id].items
