"""Stored user-sequence encodings: the format ``ray_jobs.user_embeddings`` writes and the
serving feature store (``serve_apps.feature_store``) reads.

One Redis hash per user, ``<prefix>:enc:<user_id>`` (prefix ``unirank``), with the fields of
:func:`encoding_fields`: ``vector`` (float32 bytes), ``shape`` (JSON list), ``computed_at``
(unix seconds), ``last_event_ts``, ``event_ts`` (int64 bytes) and ``model`` (the export's
digest). Both sides import this module, so neither imports the other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

import numpy as np

KEY_PREFIX = "unirank"


def encoding_key(user_id: int, prefix: str = KEY_PREFIX) -> str:
    """The Redis key of a user's encoding."""
    return f"{prefix}:enc:{user_id}"


class _HasLastTs(Protocol):
    last_ts: int  # the newest stored event's timestamp (serve_apps.feature_store.Events)


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

    def usable(self, now: float, freshness_s: float, events: _HasLastTs) -> bool:
        """Fresh enough for a use-case and no event arrived after it was computed."""
        return self.status(now, freshness_s, events) == "fresh"

    def status(self, now: float, freshness_s: float, events: _HasLastTs) -> str:
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
    """The inverse of ``encoding_fields`` on a hash as Redis returns it (bytes keys)."""
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
    keep their last encoding forever. ``redis`` is imported here only: reading the format
    needs no client.
    """
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10.0, socket_connect_timeout=5.0)
    try:
        with client.pipeline(transaction=False) as pipe:
            for user_id, enc in encodings:
                key = encoding_key(user_id, prefix)
                pipe.delete(key)  # no field of an older encoding survives
                pipe.hset(key, mapping=encoding_fields(enc))
                if ttl_s:
                    pipe.expire(key, int(ttl_s))
            pipe.execute()
    finally:
        client.close()
    return len(encodings)
