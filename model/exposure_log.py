"""The exposure log: what serving showed (exposures) and what users did (outcomes).

Serving appends records (serve_apps.exposures); ``ray_jobs.flush_log`` moves them from the
Redis stream to parquet; ``serve_apps.experiments report`` joins outcomes to exposures. Both
sides import this module, so neither imports the other.

Redis: one stream per use-case, ``<prefix>:log:<use_case>``; each entry has one field ``r``,
the record as JSON. The flush job deletes exactly the entries it has written to parquet, so
the stream holds only what is not yet in parquet, and a serving replica that restarts loses
nothing (the stream outlives it).

Records:

- exposure: ``request_id``, ``ts`` (unix seconds, float), ``use_case``, ``user_id``,
  ``experiment`` / ``arm`` (null outside an experiment), ``propensity`` (the arm's share: the
  probability that this user's request was served by this arm), ``model_version``,
  ``fallback`` (null, or why the popularity order was served), ``items`` and ``scores``
  (the slate in order: position = index; scores null in a fallback).
- outcome: ``request_id`` (null when the client did not send it), ``ts``, ``use_case``,
  ``user_id``, ``item_id``, ``event_type`` (model.schema.EVENT_TYPES).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import pyarrow as pa

from model.user_encoding import KEY_PREFIX

INT64_MAX = 2**63 - 1
RECORD_FIELD = "r"


def stream_key(use_case: str, prefix: str = KEY_PREFIX) -> str:
    return f"{prefix}:log:{use_case}"


@dataclass(frozen=True)
class Exposure:
    request_id: str
    ts: float
    use_case: str
    user_id: int
    model_version: str
    items: list[int]
    scores: list[float] | None
    experiment: str | None = None
    arm: str | None = None
    propensity: float = 1.0
    fallback: str | None = None
    kind: str = "exposure"


@dataclass(frozen=True)
class Outcome:
    request_id: str | None
    ts: float
    use_case: str
    user_id: int
    item_id: int
    event_type: int
    kind: str = "outcome"


EXPOSURE_SCHEMA = pa.schema(
    [
        ("stream_id", pa.string()),
        ("request_id", pa.string()),
        ("ts", pa.float64()),
        ("use_case", pa.string()),
        ("user_id", pa.int64()),
        ("model_version", pa.string()),
        ("items", pa.list_(pa.int64())),
        ("scores", pa.list_(pa.float64())),
        ("experiment", pa.string()),
        ("arm", pa.string()),
        ("propensity", pa.float64()),
        ("fallback", pa.string()),
    ]
)
OUTCOME_SCHEMA = pa.schema(
    [
        ("stream_id", pa.string()),
        ("request_id", pa.string()),
        ("ts", pa.float64()),
        ("use_case", pa.string()),
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("event_type", pa.int64()),
    ]
)


class BadRecord(ValueError):
    """A log entry that cannot be parsed or holds out-of-range values."""


def encode(record: Exposure | Outcome) -> str:
    return json.dumps(asdict(record), separators=(",", ":"), allow_nan=False)


def _int(d: dict, name: str) -> int:
    v = d.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= INT64_MAX:
        raise BadRecord(f"{name}: expected an int64 >= 0, got {v!r}")
    return v


def _ts(d: dict) -> float:
    v = d.get("ts")
    if not isinstance(v, int | float) or not math.isfinite(v) or not 0 < v < 4e9:
        raise BadRecord(f"ts: expected unix seconds, got {v!r}")
    return float(v)


def decode(text: str | bytes) -> Exposure | Outcome:
    """A stored record, checked: ids int64 >= 0, finite plausible times and scores."""
    try:
        d = json.loads(text)
    except ValueError as exc:
        raise BadRecord(f"not JSON: {exc}") from None
    if not isinstance(d, dict):
        raise BadRecord("not a JSON object")
    kind = d.get("kind")
    if kind == "outcome":
        return Outcome(
            request_id=d.get("request_id"),
            ts=_ts(d),
            use_case=str(d.get("use_case")),
            user_id=_int(d, "user_id"),
            item_id=_int(d, "item_id"),
            event_type=_int(d, "event_type"),
        )
    if kind != "exposure":
        raise BadRecord(f"kind: expected 'exposure' or 'outcome', got {kind!r}")
    items = d.get("items")
    if not isinstance(items, list) or not all(
        isinstance(x, int) and 0 <= x <= INT64_MAX for x in items
    ):
        raise BadRecord("items: expected a list of int64 ids >= 0")
    scores = d.get("scores")
    if scores is not None and (
        not isinstance(scores, list)
        or len(scores) != len(items)
        or not all(isinstance(x, int | float) and math.isfinite(x) for x in scores)
    ):
        raise BadRecord("scores: expected null or one finite number per item")
    prop = d.get("propensity", 1.0)
    if not isinstance(prop, int | float) or not 0 < prop <= 1:
        raise BadRecord(f"propensity: expected 0 < p <= 1, got {prop!r}")
    return Exposure(
        request_id=str(d.get("request_id")),
        ts=_ts(d),
        use_case=str(d.get("use_case")),
        user_id=_int(d, "user_id"),
        model_version=str(d.get("model_version", "")),
        items=items,
        scores=scores,
        experiment=d.get("experiment"),
        arm=d.get("arm"),
        propensity=float(prop),
        fallback=d.get("fallback"),
    )


def to_tables(entries: list[tuple[str, Exposure | Outcome]]) -> tuple[pa.Table, pa.Table]:
    """(stream id, record) pairs -> (exposures, outcomes) tables."""
    exp = [{"stream_id": sid, **asdict(r)} for sid, r in entries if isinstance(r, Exposure)]
    out = [{"stream_id": sid, **asdict(r)} for sid, r in entries if isinstance(r, Outcome)]
    return (
        pa.Table.from_pylist(exp, schema=EXPOSURE_SCHEMA),
        pa.Table.from_pylist(out, schema=OUTCOME_SCHEMA),
    )
