"""Closed loop: the generator's users answer live ranked responses.

    python -m serve_apps.simulate [CONFIG] [key=value ...] --url http://127.0.0.1:8000 \\
        --use-case ads --requests 500 --concurrency 4

The synthetic logs come from a world of users and items with hidden vectors
(model.synthetic.World); the model was trained on them. Here the same users send ``/rank``
requests to the running endpoints and answer each ranked slate with the world's true
probabilities: a user examines position ``p`` with probability ``1 / log2(p + 2)``, clicks an
examined item with the world's P(click | user, item, use-case), then (ads) adds it to the cart
and checks out with the world's conditional probabilities, after short delays (conversions
are late in real life too; here up to ``--max-delay-s`` seconds). Every event is posted back
to ``/<use-case>/events`` with the response's ``request_id``, so the exposure log joins them.

The truth is known, so the summary also reports each arm's *expected* click rate per
exposure (the sum of the true click probabilities of what it showed): a yardstick for what
the experiment report measures. Bounded: ``--requests`` requests, then the pending delayed
events, then exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

import numpy as np

from model.config import ConfigError, UnirankConfig, config_args, load_config
from model.schema import EVENT_TYPES
from model.synthetic import DAY, World, start_epoch_s

SUPPORTED = ("ads", "notifications")  # retrieval eligible_ads, or candidates in the request


def examine_probability(position: np.ndarray) -> np.ndarray:
    """Position bias: the chance a user looks at the item at ``position`` (0 = top)."""
    return 1.0 / np.log2(position + 2.0)


@dataclass
class Users:
    """The world's users as clients of one use-case."""

    world: World
    use_case: str
    rng: np.random.Generator
    world_time: float  # the world's clock: the end of the generated logs
    candidates: int = 50

    @classmethod
    def build(cls, cfg: UnirankConfig, use_case: str, seed: int) -> Users:
        if use_case not in SUPPORTED:
            raise ValueError(f"simulate: use-case {use_case!r} is not supported (try {SUPPORTED})")
        world = World.build(cfg.generate)
        end = start_epoch_s(cfg.generate) + cfg.generate.days * DAY
        return cls(world, use_case, np.random.default_rng(seed), float(end))

    def draw_user(self) -> int:
        w = self.world.user_weight
        return int(self.rng.choice(len(w), p=w / w.sum()))

    def body(self, user: int, request_id: str) -> dict:
        body: dict = {"user_id": user, "request_id": request_id, "context": {"hour": 12}}
        if self.use_case == "notifications":  # the request carries its candidates
            items = self.rng.choice(
                np.arange(1, len(self.world.item_vec)), self.candidates, replace=False
            )
            body["candidates"] = [{"item_id": int(i)} for i in items]
        return body

    def truth(self, user: int, items: list[int]) -> dict[str, np.ndarray]:
        """The world's probabilities for ``user`` and each shown item, position bias included
        in ``click``."""
        ids = np.asarray(items, dtype=np.int64)
        n = len(ids)
        w = self.world
        interest = w.interest(np.asarray([user]), np.asarray([self.world_time]))[0]  # (D,)
        affinity = w.item_vec[ids] @ interest
        p_click, p_atc, p_co, p_eng = w.probabilities(
            np.full(n, self.use_case),
            affinity,
            np.zeros(n),
            np.zeros(n),
            np.zeros(n, np.int64),
            np.full(n, 12),
            w.item_advertiser[ids] if self.use_case == "ads" else np.zeros(n, np.int64),
            w.item_price[ids],
        )
        p_click = p_click * examine_probability(np.arange(n))
        return {"click": p_click, "add_to_cart": p_atc, "checkout": p_co, "engage": p_eng}

    def respond(self, user: int, items: list[int]) -> list[tuple[int, str, float]]:
        """(item, event, delay in [0, 1] of the maximum) the user produces for this slate."""
        p = self.truth(user, items)
        events = []
        for k, item in enumerate(items):
            if self.rng.random() >= p["click"][k]:
                continue
            events.append((item, "click", 0.0))
            if self.use_case != "ads":
                if self.rng.random() < p["engage"][k]:
                    events.append((item, "engage", 0.1))
                continue
            if self.rng.random() < p["add_to_cart"][k]:
                events.append((item, "add_to_cart", 0.5))
                if self.rng.random() < p["checkout"][k]:
                    events.append((item, "checkout", 1.0))
        return events


@dataclass
class ArmTally:
    exposures: int = 0
    expected_clicks: float = 0.0
    events: dict[str, int] = field(default_factory=dict)
    versions: set = field(default_factory=set)

    def as_dict(self) -> dict:
        n = max(self.exposures, 1)
        return {
            "exposures": self.exposures,
            "expected_ctr": self.expected_clicks / n,
            "events": dict(self.events),
            "observed_per_exposure": {k: v / n for k, v in self.events.items()},
            "model_versions": sorted(self.versions),
        }


async def run(
    client, prefix: str, users: Users, requests: int, concurrency: int, max_delay_s: float
) -> dict:
    """Drive ``requests`` ranked requests through ``client`` (an httpx.AsyncClient) at
    ``concurrency``; post every event back; return per-arm tallies and HTTP statuses."""
    tallies: dict[str, ArmTally] = {}
    statuses: dict[int, int] = {}
    pending: list[asyncio.Task] = []
    sem = asyncio.Semaphore(concurrency)

    async def post_event(user: int, item: int, kind: str, request_id: str, delay: float) -> None:
        await asyncio.sleep(delay * max_delay_s)
        ev = {
            "user_id": user,
            "item_id": item,
            "event_type": EVENT_TYPES[kind],
            "request_id": request_id,
        }
        r = await client.post(f"{prefix}/events", json=ev)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    async def one(i: int) -> None:
        user = users.draw_user()
        rid = f"sim-{users.use_case}-{i}-{int(time.time() * 1e3)}"
        async with sem:
            r = await client.post(f"{prefix}/rank", json=users.body(user, rid))
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if r.status_code != 200:
            return
        out = r.json()
        items = [it["item_id"] for it in out["items"]]
        tally = tallies.setdefault(out.get("arm") or "none", ArmTally())
        tally.exposures += 1
        tally.versions.add(out["model_version"])
        if items:
            tally.expected_clicks += float(users.truth(user, items)["click"].sum())
        for item, kind, delay in users.respond(user, items):
            tally.events[kind] = tally.events.get(kind, 0) + 1
            pending.append(
                asyncio.create_task(post_event(user, item, kind, out["request_id"], delay))
            )

    await asyncio.gather(*(one(i) for i in range(requests)))
    await asyncio.gather(*pending)
    return {"arms": {k: v.as_dict() for k, v in tallies.items()}, "statuses": statuses}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", help="the config the model was trained with (generate.*)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="Serve's HTTP address")
    p.add_argument("--use-case", default="ads", choices=SUPPORTED)
    p.add_argument("--route-prefix", default=None, help="default: /<use-case>")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-delay-s", type=float, default=1.0, help="latest conversion delay")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.config, a.overrides = config_args(a.config, a.overrides)
    if not 1 <= a.requests <= 1_000_000 or not 1 <= a.concurrency <= 256:
        p.exit(2, "error: --requests must be in 1..1000000 and --concurrency in 1..256\n")
    if not 0 <= a.max_delay_s <= 3600:
        p.exit(2, f"error: --max-delay-s must be in 0..3600, got {a.max_delay_s}\n")
    try:
        cfg = load_config(a.config, a.overrides)
    except ConfigError as exc:
        p.exit(2, f"error: {exc}\n")
    import httpx

    users = Users.build(cfg, a.use_case, a.seed)
    prefix = a.route_prefix or f"/{a.use_case}"

    async def go() -> dict:
        limits = httpx.Limits(max_connections=a.concurrency * 2)
        async with httpx.AsyncClient(base_url=a.url, timeout=30.0, limits=limits) as client:
            return await run(client, prefix, users, a.requests, a.concurrency, a.max_delay_s)

    print(json.dumps({"simulate": asyncio.run(go())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
