"""Value bounds shared by the ingress, the feature store and the ranker.

The HTTP schemas (serve_apps.schemas) bound what a client may send. This module holds the
bounds that need the config or the clock (event timestamps) and the ranker's own check of a
:class:`~serve_apps.rows.RankInput` before it joins a batch: whatever reaches a batched
model call has the dtypes, shapes and ranges the feature path expects, so a bad value fails
its own request and never the batch it would have joined.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from model.config import UnirankConfig
from model.id_lists import IdLists

if TYPE_CHECKING:
    from serve_apps.rows import RankInput

INT64_MAX = 2**63 - 1
MAX_LIST_IDS = 32  # ids per list feature of a candidate / profile (the model keeps <= 8)
FUTURE_S = 86_400  # an event may be at most this far ahead of the server clock


def parse_time(text: str) -> int:
    """ISO 8601 -> unix seconds; a naive time is UTC (as ray_jobs.prepare reads it)."""
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


@dataclass(frozen=True)
class EventTimes:
    """Valid event timestamps: ``prepare.min_event_time`` .. now + ``future_s``."""

    min_ts: int
    future_s: int = FUTURE_S

    @classmethod
    def from_config(cls, cfg: UnirankConfig) -> EventTimes:
        return cls(parse_time(cfg.prepare.min_event_time))

    def max_ts(self, now: float | None = None) -> int:
        return int(time.time() if now is None else now) + self.future_s

    def problem(self, ts: int, now: float | None = None) -> str | None:
        """Why ``ts`` is not a valid event time, or None."""
        hi = self.max_ts(now)
        if ts < self.min_ts or ts > hi:
            return (
                f"timestamp {ts} is outside {self.min_ts} (prepare.min_event_time) .. "
                f"{hi} (now + {self.future_s} s), unix seconds"
            )
        return None

    def valid(self, ts: np.ndarray, now: float | None = None) -> np.ndarray:
        """Bool mask of the valid entries of an int64 array."""
        return (ts >= self.min_ts) & (ts <= self.max_ts(now))


class InvalidRankInput(ValueError):
    """A RankInput the ranker refuses before batching (names the field)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _scalar(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise InvalidRankInput(name, f"expected an int, got {type(v).__name__}")
    if not 0 <= int(v) <= INT64_MAX:
        raise InvalidRankInput(name, f"{v} is outside 0 .. 2**63-1")


def _ints(name: str, a: object, n: int | None = None) -> None:
    if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype != np.int64:
        what = getattr(a, "dtype", type(a).__name__)
        raise InvalidRankInput(name, f"expected a 1-D int64 array, got {what}")
    if n is not None and len(a) != n:
        raise InvalidRankInput(name, f"{len(a)} values, expected {n}")


def _ids(name: str, a: object, n: int | None = None) -> None:
    _ints(name, a, n)
    if (a < 0).any():
        raise InvalidRankInput(name, "negative id")


def check_rank_input(inp: RankInput, times: EventTimes | None = None) -> None:
    """Raise :class:`InvalidRankInput` unless ``inp`` is safe to batch.

    Ints are int64-range scalars or int64 arrays (ids >= 0); candidate columns and content
    lists have one value / list per item, profile columns are scalars or int64 id arrays;
    float columns are float32 or float64 with no infinities (NaN means "unknown", as a null in
    training data); the user's events are equally long int64 arrays, oldest first, with
    timestamps in ``times`` (when given).
    """
    from serve_apps.rows import CANDIDATE_COLUMNS

    if not isinstance(inp.task_type, str):
        raise InvalidRankInput("task_type", "expected a string")
    for name in ("now", "user_id", "source_item_id", "device", "hour", "surface"):
        _scalar(name, getattr(inp, name))
    cands = inp.candidates
    missing = [c for c in CANDIDATE_COLUMNS if c not in cands]
    if missing:
        raise InvalidRankInput("candidates", f"missing columns {missing}")
    n = len(cands["item_id"])
    for name, a in cands.items():
        # floats: the unified ones, and any float item feature of a bring-your-own catalogue
        is_float = isinstance(a, np.ndarray) and a.dtype.kind == "f" and name != "item_id"
        if name in ("price", "advertiser_reliability") or is_float:
            if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype.kind != "f":
                raise InvalidRankInput(f"candidates.{name}", "expected a 1-D float array")
            if len(a) != n:
                raise InvalidRankInput(f"candidates.{name}", f"{len(a)} values, expected {n}")
            if np.isinf(a).any() or (np.abs(np.nan_to_num(a)) > np.finfo(np.float32).max).any():
                raise InvalidRankInput(f"candidates.{name}", "infinite or beyond float32")
        else:
            _ids(f"candidates.{name}", a, n)
    for name, lists in inp.candidate_lists.items():
        where = f"candidate_lists.{name}"
        if not isinstance(lists, IdLists) or len(lists) != n:
            raise InvalidRankInput(where, f"expected IdLists of {n} candidates")
        _ints(f"{where}.offsets", lists.offsets, n + 1)
        if lists.offsets[0] != 0 or np.any(np.diff(lists.offsets) < 0):
            raise InvalidRankInput(f"{where}.offsets", "expected non-decreasing from 0")
        _ids(f"{where}.values", lists.values, int(lists.offsets[-1]))
    for name, v in inp.profile.items():
        _scalar(f"profile.{name}", v)
    for name, a in inp.profile_lists.items():
        _ids(f"profile_lists.{name}", a)
    _ints("query_tokens", inp.query_tokens)
    ev = inp.events
    _ints("events.item_ids", ev.item_ids)
    _ints("events.event_types", ev.event_types, len(ev.item_ids))
    _ints("events.timestamps", ev.timestamps, len(ev.item_ids))
    if len(ev.timestamps) and np.any(np.diff(ev.timestamps) < 0):
        raise InvalidRankInput("events.timestamps", "not oldest first")
    if times is not None and not times.valid(ev.timestamps, inp.now).all():
        raise InvalidRankInput("events.timestamps", "outside the valid event times")
