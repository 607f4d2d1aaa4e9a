"""The online feature store: a user's recent events and precomputed sequence encodings.

Two backends behind one async interface (``serve.feature_store``):

- ``memory`` (default): a dict in the ingress replica's process. No set-up, nothing shared:
  each application (and each replica) sees the events posted to it. For local runs and tests.
- ``redis`` (``serve.redis_url``): one list per user (``unirank:ev:<user>``, newest last,
  trimmed to ``keep`` events) and one hash per user for the precomputed encoding
  (``unirank:enc:<user>``: vector, shape, event_ts, computed_at, last_event_ts, model; written
  by ray_jobs.user_embeddings). Shared by every application and replica.

Events are ``(item_id, event_type, timestamp_s)``; ``recent(user, n)`` returns the newest
``n``, oldest first — the order of the model's ``seq_*`` columns.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from model.config import ServeConfig

KEY_PREFIX = "unirank"


@dataclass(frozen=True)
class Events:
    """A user's recent events, oldest first (int64 arrays of equal length)."""

    item_ids: np.ndarray
    event_types: np.ndarray
    timestamps: np.ndarray

    @classmethod
    def empty(cls) -> Events:
        z = np.zeros(0, np.int64)
        return cls(z, z, z)

    @classmethod
    def from_rows(cls, rows: list[tuple[int, int, int]]) -> Events:
        if not rows:
            return cls.empty()
        a = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        return cls(a[:, 0].copy(), a[:, 1].copy(), a[:, 2].copy())

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def last_ts(self) -> int:
        return int(self.timestamps[-1]) if len(self) else 0


@dataclass(frozen=True)
class Encoding:
    """A precomputed user-sequence encoding and when it was computed (unix seconds).

    Written by ``ray_jobs.user_embeddings``: ``vector`` is the model's ``encode_user`` output
    for the user's real events, (n, D) oldest first; ``event_ts`` (n,) their timestamps (the
    ranker measures their age at request time for the recency bias); ``model`` the digest of
    the export that computed it (model.export.model_digest): another model cannot use it.
    """

    vector: np.ndarray  # float32, the user encoder's output for this user
    computed_at: float
    last_event_ts: int  # newest event the encoding saw: newer events make it stale
    event_ts: np.ndarray | None = None  # int64 (n,), timestamps of the encoded events
    model: str = ""  # digest of the exported model that computed it

    def usable(self, now: float, freshness_s: float, events: Events) -> bool:
        """Fresh enough for a use-case and no event arrived after it was computed."""
        return self.status(now, freshness_s, events) == "fresh"

    def status(self, now: float, freshness_s: float, events: Events) -> str:
        """``fresh``; ``stale`` (older than ``freshness_s``); ``outdated`` (the store has an
        event newer than the newest one encoded)."""
        if events.last_ts > self.last_event_ts:
            return "outdated"
        if now - self.computed_at > freshness_s:
            return "stale"
        return "fresh"


def encoding_fields(enc: Encoding) -> dict[str, bytes | str]:
    """The Redis hash of an encoding (``unirank:enc:<user>``); read by ``encoding_from``."""
    ts = np.zeros(0, np.int64) if enc.event_ts is None else enc.event_ts
    return {
        "vector": np.asarray(enc.vector, dtype=np.float32).tobytes(),
        "shape": json.dumps(list(np.shape(enc.vector))),
        "computed_at": repr(float(enc.computed_at)),
        "last_event_ts": str(int(enc.last_event_ts)),
        "event_ts": np.asarray(ts, dtype=np.int64).tobytes(),
        "model": enc.model,
    }


def encoding_from(h: dict[bytes, bytes]) -> Encoding:
    shape = json.loads(h[b"shape"])
    ts = h.get(b"event_ts")
    return Encoding(
        vector=np.frombuffer(h[b"vector"], dtype=np.float32).reshape(shape),
        computed_at=float(h[b"computed_at"]),
        last_event_ts=int(h[b"last_event_ts"]),
        event_ts=None if ts is None else np.frombuffer(ts, dtype=np.int64),
        model=h.get(b"model", b"").decode(),
    )


def write_encodings(
    url: str,
    encodings: list[tuple[int, Encoding]],
    prefix: str = KEY_PREFIX,
    ttl_s: float | None = None,
) -> int:
    """Write many encodings to Redis in one pipeline (the batch job's side, synchronous).

    ``ttl_s``: the keys expire after it (None: never), so users who went inactive do not
    keep their last encoding forever.
    """
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10.0, socket_connect_timeout=5.0)
    try:
        with client.pipeline(transaction=False) as pipe:
            for user_id, enc in encodings:
                key = f"{prefix}:enc:{user_id}"
                pipe.delete(key)  # no field of an older encoding survives
                pipe.hset(key, mapping=encoding_fields(enc))
                if ttl_s:
                    pipe.expire(key, int(ttl_s))
            pipe.execute()
    finally:
        client.close()
    return len(encodings)


class MemoryFeatureStore:
    """In-process store (one per replica)."""

    backend = "memory"

    def __init__(self, keep: int = 256):
        self.keep = keep
        self._events: dict[int, deque] = {}
        self._enc: dict[int, Encoding] = {}

    async def append(self, user_id: int, item_id: int, event_type: int, ts: int) -> int:
        q = self._events.setdefault(user_id, deque(maxlen=self.keep))
        q.append((item_id, event_type, ts))
        return len(q)

    async def recent(self, user_id: int, n: int) -> Events:
        q = self._events.get(user_id)
        if not q or n <= 0:
            return Events.empty()
        return Events.from_rows(list(q)[-n:])

    async def put_encoding(self, user_id: int, enc: Encoding) -> None:
        self._enc[user_id] = enc

    async def get_encoding(self, user_id: int) -> Encoding | None:
        return self._enc.get(user_id)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


class RedisFeatureStore:
    """Redis-backed store (redis.asyncio). Events are ``item:type:ts`` strings in a list."""

    backend = "redis"

    def __init__(self, url: str, keep: int = 256, prefix: str = KEY_PREFIX):
        import redis.asyncio as aioredis

        self.url, self.keep, self.prefix = url, keep, prefix
        self.client = aioredis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)

    def _ev(self, user_id: int) -> str:
        return f"{self.prefix}:ev:{user_id}"

    def _enc_key(self, user_id: int) -> str:
        return f"{self.prefix}:enc:{user_id}"

    async def append(self, user_id: int, item_id: int, event_type: int, ts: int) -> int:
        key = self._ev(user_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.rpush(key, f"{item_id}:{event_type}:{ts}")
            pipe.ltrim(key, -self.keep, -1)
            pipe.llen(key)
            _, _, length = await pipe.execute()
        return int(length)

    async def recent(self, user_id: int, n: int) -> Events:
        if n <= 0:
            return Events.empty()
        raw = await self.client.lrange(self._ev(user_id), -n, -1)
        return Events.from_rows([tuple(int(x) for x in r.split(b":")) for r in raw])

    async def put_encoding(self, user_id: int, enc: Encoding) -> None:
        key = self._enc_key(user_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=encoding_fields(enc))
            await pipe.execute()

    async def get_encoding(self, user_id: int) -> Encoding | None:
        h = await self.client.hgetall(self._enc_key(user_id))
        return encoding_from(h) if h else None

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()


FeatureStore = MemoryFeatureStore | RedisFeatureStore


def make_store(serve: ServeConfig, keep: int = 256) -> FeatureStore:
    """The configured backend (``serve.feature_store``)."""
    if serve.feature_store == "redis":
        return RedisFeatureStore(serve.redis_url, keep=keep)
    return MemoryFeatureStore(keep=keep)


def now_s() -> int:
    return int(time.time())
