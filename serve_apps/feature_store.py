"""The online feature store: a user's recent events, precomputed sequence encodings and
profile updates.

Two backends behind one async interface (``serve.feature_store``):

- ``memory`` (default): a dict in the ingress replica's process. No set-up, nothing shared:
  each application (and each replica) sees the events posted to it. For local runs and tests.
- ``redis`` (``serve.redis_url``): one list per user (``unirank:ev:<user>``, oldest first,
  trimmed to the newest ``keep`` events) and one hash per user for the precomputed encoding
  (``unirank:enc:<user>``: vector, shape, event_ts, computed_at, last_event_ts, model; written
  by ray_jobs.user_embeddings; the format is model.user_encoding). Shared by every application
  and replica. A user's online profile is a hash ``unirank:profile:<user>`` (one JSON value per
  field: ``region``, ``age_band``, ``declared_interests``), written by ``POST /profile``.

Events are ``(item_id, event_type, timestamp_s)``, kept in timestamp order whatever order
they arrive in: a backfilled event goes into its place (equal timestamps keep their arrival
order), so ``recent(user, n)`` returns the newest ``n``, oldest first — the order of the
model's ``seq_*`` columns — and ``Events.last_ts`` is the newest event's time.

Reading checks every stored entry: one that cannot be parsed, holds an id outside int64 or a
timestamp outside the valid event times (serve_apps.bounds.EventTimes), or a history out of
timestamp order (written by an older version), is *repaired*: the readable events are kept
in order, the unreadable entries move to a quarantine list (``unirank:bad:<user>``, newest
``keep``) and the store's ``on_repair(user_id, reason, count)`` callback counts and logs it.
An unreadable encoding is deleted (the batch job writes a new one) and reported the same way.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from model.config import ServeConfig
from model.user_encoding import (  # the stored-encoding format, shared with ray_jobs
    KEY_PREFIX,
    Encoding,
    encoding_fields,
    encoding_from,
    write_encodings,  # noqa: F401 - re-exported: callers of the store's writer
)
from serve_apps.bounds import INT64_MAX, MAX_LIST_IDS, EventTimes

MAX_EVENT_TYPE = 255  # serve_apps.schemas.Event.event_type
logger = logging.getLogger("ray.serve")
RepairHook = Callable[[int, str, int], None]  # (user_id, reason, entries affected)


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
        """The newest event's time (0 without events)."""
        return int(self.timestamps.max()) if len(self) else 0

    def digest(self) -> str:
        """Identifies the exact history (a backfill changes it even when the newest event and
        the count stay the same): part of the result-cache key."""
        import hashlib

        h = hashlib.sha256()
        for a in (self.item_ids, self.event_types, self.timestamps):
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


def _entry_row(entry: object) -> tuple[int, int, int] | None:
    """A stored entry (a tuple, or Redis' ``b"item:type:ts"``) -> its ints, None when
    unreadable or outside the ranges the model can take."""
    try:
        parts = entry.split(b":") if isinstance(entry, bytes) else entry
        item, etype, ts = (int(x) for x in parts)  # type: ignore[union-attr]
    except (TypeError, ValueError, AttributeError):
        return None
    if not (0 <= item <= INT64_MAX and 0 <= etype <= MAX_EVENT_TYPE and 0 <= ts <= INT64_MAX):
        return None
    return item, etype, ts


@dataclass(frozen=True)
class History:
    """What reading a stored history found: the usable events, oldest first, and what needs
    repairing."""

    events: Events
    unreadable: list  # raw entries that cannot be parsed or are out of range
    bad_time: list  # raw entries whose timestamp is outside the valid event times
    out_of_order: bool  # the readable entries were not in timestamp order

    @property
    def needs_repair(self) -> bool:
        return bool(self.unreadable or self.bad_time or self.out_of_order)


def read_history(entries: Iterable, times: EventTimes | None, now: float | None = None) -> History:
    """Parse and check stored entries (oldest first as stored)."""
    rows, unreadable, bad_time = [], [], []
    hi = None if times is None else times.max_ts(now)
    for e in entries:
        row = _entry_row(e)
        if row is None:
            unreadable.append(e)
        elif times is not None and not times.min_ts <= row[2] <= hi:
            bad_time.append(e)
        else:
            rows.append(row)
    ts = [r[2] for r in rows]
    out_of_order = any(a > b for a, b in zip(ts, ts[1:], strict=False))
    if out_of_order:
        rows.sort(key=lambda r: r[2])  # stable: equal times keep their stored order
    return History(Events.from_rows(rows), unreadable, bad_time, out_of_order)


def _report(hook: RepairHook | None, user_id: int, h: History) -> None:
    for reason, n in (
        ("unreadable", len(h.unreadable)),
        ("bad_timestamp", len(h.bad_time)),
        ("out_of_order", int(h.out_of_order)),
    ):
        if n:
            logger.warning("feature store: user %s history repaired: %s x%d", user_id, reason, n)
            if hook is not None:
                hook(user_id, reason, n)


def _profile_value(raw: object) -> int | list[int] | None:
    """A stored profile field (JSON): an id, or a list of at most ``MAX_LIST_IDS`` ids
    (int64, >= 0); None when it is anything else."""
    try:
        v = json.loads(raw)
    except (ValueError, TypeError, UnicodeDecodeError):
        return None

    def is_id(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= INT64_MAX

    if is_id(v):
        return v
    if isinstance(v, list) and len(v) <= MAX_LIST_IDS and all(is_id(x) for x in v):
        return v
    return None


class MemoryFeatureStore:
    """In-process store (one per replica): a timestamp-ordered list per user."""

    backend = "memory"

    def __init__(
        self, keep: int = 256, times: EventTimes | None = None, on_repair: RepairHook | None = None
    ):
        self.keep, self.times, self.on_repair = keep, times, on_repair
        self._events: dict[int, list] = {}
        self._bad: dict[int, list] = {}
        self._enc: dict[int, Encoding] = {}
        self._profile: dict[int, dict] = {}

    async def append(self, user_id: int, item_id: int, event_type: int, ts: int) -> int:
        q = self._events.setdefault(user_id, [])
        # after any event with the same time: equal times keep their arrival order
        bisect.insort_right(q, (item_id, event_type, ts), key=lambda e: e[2])
        del q[: max(0, len(q) - self.keep)]
        return len(q)

    async def recent(self, user_id: int, n: int) -> Events:
        q = self._events.get(user_id)
        if not q or n <= 0:
            return Events.empty()
        h = read_history(q[-n:], self.times)
        if h.needs_repair:
            self._repair(user_id)
            _report(self.on_repair, user_id, h)
        return h.events

    def _repair(self, user_id: int) -> None:
        q = self._events[user_id]
        h = read_history(q, self.times)
        bad = self._bad.setdefault(user_id, [])
        bad.extend(h.unreadable + h.bad_time)
        del bad[: max(0, len(bad) - self.keep)]
        e = h.events
        self._events[user_id] = list(
            zip(e.item_ids.tolist(), e.event_types.tolist(), e.timestamps.tolist(), strict=True)
        )

    async def quarantined(self, user_id: int) -> list:
        return list(self._bad.get(user_id, []))

    async def put_encoding(self, user_id: int, enc: Encoding) -> None:
        self._enc[user_id] = enc

    async def get_encoding(self, user_id: int) -> Encoding | None:
        return self._enc.get(user_id)

    async def put_profile(self, user_id: int, fields: dict) -> None:
        self._profile.setdefault(user_id, {}).update(fields)

    async def get_profile(self, user_id: int) -> dict | None:
        stored = self._profile.get(user_id)
        return dict(stored) if stored else None

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


# Insert one event in timestamp order (after equal times), keep the newest ARGV[1], return
# the length. Lua numbers are doubles: exact for any unix time in seconds. An entry whose
# time cannot be parsed counts as oldest (reading repairs it).
_APPEND_LUA = """
local key, keep, entry, ts = KEYS[1], tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local function ts_of(v)
  return tonumber(string.match(v, ':(%-?%d+)$') or '') or -math.huge
end
local last = redis.call('LINDEX', key, -1)
if (not last) or ts_of(last) <= ts then
  redis.call('RPUSH', key, entry)
else
  local items = redis.call('LRANGE', key, 0, -1)
  local pos = 0
  for i = #items, 1, -1 do
    if ts_of(items[i]) <= ts then pos = i; break end
  end
  local tail = {entry}
  for i = pos + 1, #items do tail[#tail + 1] = items[i] end
  if pos == 0 then redis.call('DEL', key) else redis.call('LTRIM', key, 0, pos - 1) end
  redis.call('RPUSH', key, unpack(tail))
end
redis.call('LTRIM', key, -keep, -1)
return redis.call('LLEN', key)
"""


class RedisFeatureStore:
    """Redis-backed store (redis.asyncio). Events are ``item:type:ts`` strings in a list,
    oldest first."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        keep: int = 256,
        prefix: str = KEY_PREFIX,
        times: EventTimes | None = None,
        on_repair: RepairHook | None = None,
    ):
        import redis.asyncio as aioredis

        self.url, self.keep, self.prefix = url, keep, prefix
        self.times, self.on_repair = times, on_repair
        self.client = aioredis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._append = self.client.register_script(_APPEND_LUA)

    def _ev(self, user_id: int) -> str:
        return f"{self.prefix}:ev:{user_id}"

    def _bad_key(self, user_id: int) -> str:
        return f"{self.prefix}:bad:{user_id}"

    def _enc_key(self, user_id: int) -> str:
        return f"{self.prefix}:enc:{user_id}"

    def _profile_key(self, user_id: int) -> str:
        return f"{self.prefix}:profile:{user_id}"

    async def append(self, user_id: int, item_id: int, event_type: int, ts: int) -> int:
        entry = f"{item_id}:{event_type}:{ts}"
        return int(await self._append(keys=[self._ev(user_id)], args=[self.keep, entry, ts]))

    async def recent(self, user_id: int, n: int) -> Events:
        if n <= 0:
            return Events.empty()
        h = read_history(await self.client.lrange(self._ev(user_id), -n, -1), self.times)
        if h.needs_repair:
            await self._repair(user_id)
            _report(self.on_repair, user_id, h)
        return h.events

    async def _repair(self, user_id: int) -> None:
        """Rewrite the whole list in order without its unreadable entries, which move to the
        quarantine list; optimistic (WATCH): a concurrent append makes it retry once, then
        leave the repair to the next read."""
        import redis

        key, bad_key = self._ev(user_id), self._bad_key(user_id)
        for _ in range(2):
            try:
                async with self.client.pipeline(transaction=True) as pipe:
                    await pipe.watch(key)
                    h = read_history(await pipe.lrange(key, 0, -1), self.times)
                    e = h.events
                    good = [
                        f"{i}:{t}:{s}"
                        for i, t, s in zip(
                            e.item_ids.tolist(),
                            e.event_types.tolist(),
                            e.timestamps.tolist(),
                            strict=True,
                        )
                    ]
                    pipe.multi()
                    pipe.delete(key)
                    if good:
                        pipe.rpush(key, *good)
                    if h.unreadable or h.bad_time:
                        pipe.rpush(bad_key, *(h.unreadable + h.bad_time))
                        pipe.ltrim(bad_key, -self.keep, -1)
                    await pipe.execute()
                return
            except redis.WatchError:
                continue

    async def quarantined(self, user_id: int) -> list:
        return await self.client.lrange(self._bad_key(user_id), 0, -1)

    async def put_encoding(self, user_id: int, enc: Encoding) -> None:
        key = self._enc_key(user_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=encoding_fields(enc))
            await pipe.execute()

    async def get_encoding(self, user_id: int) -> Encoding | None:
        h = await self.client.hgetall(self._enc_key(user_id))
        if not h:
            return None
        try:
            return encoding_from(h)
        except (KeyError, ValueError, TypeError, UnicodeDecodeError):
            # json.JSONDecodeError is a ValueError; a bad shape fails numpy's reshape
            await self.client.delete(self._enc_key(user_id))
            logger.warning("feature store: user %s encoding unreadable, deleted", user_id)
            if self.on_repair is not None:
                self.on_repair(user_id, "encoding_unreadable", 1)
            return None

    async def put_profile(self, user_id: int, fields: dict) -> None:
        """Set the given profile fields (one hash field each, JSON), keep the others."""
        mapping = {k: json.dumps(v) for k, v in fields.items()}
        if mapping:
            await self.client.hset(self._profile_key(user_id), mapping=mapping)

    async def get_profile(self, user_id: int) -> dict | None:
        """The stored profile fields; an unreadable one is deleted and reported."""
        h = await self.client.hgetall(self._profile_key(user_id))
        out, bad = {}, []
        for k, v in h.items():
            name = k.decode(errors="replace") if isinstance(k, bytes) else str(k)
            value = _profile_value(v)
            if value is None:
                bad.append(k)
            else:
                out[name] = value
        if bad:
            await self.client.hdel(self._profile_key(user_id), *bad)
            logger.warning("feature store: user %s profile fields unreadable, deleted", user_id)
            if self.on_repair is not None:
                self.on_repair(user_id, "profile_unreadable", len(bad))
        return out or None

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()


FeatureStore = MemoryFeatureStore | RedisFeatureStore


def make_store(
    serve: ServeConfig,
    keep: int = 256,
    times: EventTimes | None = None,
    on_repair: RepairHook | None = None,
) -> FeatureStore:
    """The configured backend (``serve.feature_store``)."""
    if serve.feature_store == "redis":
        return RedisFeatureStore(serve.redis_url, keep=keep, times=times, on_repair=on_repair)
    return MemoryFeatureStore(keep=keep, times=times, on_repair=on_repair)


def now_s() -> int:
    return int(time.time())
