"""A ranking request -> unified-schema rows, one per candidate.

The ingress sends the ranker a compact :class:`RankInput` (user-level fields once, candidate
columns as arrays); the ranker expands a whole batch of them into the columns of the unified
example (``model.schema.UNIFIED_SCHEMA``) and runs the exported model's own
FeatureProcessor on them — the same feature path as training.

Besides the unified candidate columns, a RankInput carries what training rows carried about
the item and the user: the candidates' content (scalar columns such as ``brand_id`` in
``candidates``, list columns such as ``title_tokens`` in ``candidate_lists``, from the
retrieval index or the request) and the user's profile (``profile`` / ``profile_lists``, from
the user-profile table, the feature store or the request). ``to_columns`` emits every one of
them, so the model's FeatureProcessor sees the columns it saw in training; a column an input
lacks holds its placeholder (0 / empty list), as a training row that did not log it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model.id_lists import IdLists
from serve_apps.feature_store import Encoding, Events

CANDIDATE_COLUMNS = (
    "item_id",
    "category_id",
    "advertiser_id",
    "campaign_id",
    "price",
    "advertiser_reliability",
)


@dataclass
class RankInput:
    """Everything the model needs for one request."""

    task_type: str
    now: int  # unix seconds: the rows' event_time
    user_id: int
    # CANDIDATE_COLUMNS (+ item content columns, e.g. brand_id) -> (n,)
    candidates: dict[str, np.ndarray]
    events: Events = field(default_factory=Events.empty)
    source_item_id: int = 0
    query_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    device: int = 0
    hour: int = 0
    surface: int = 0
    # The user's precomputed sequence encoding when the ingress found a fresh one, else None
    # and why not (``missing`` / ``stale`` / ``outdated``): the ranker encodes on the fly.
    encoding: Encoding | None = None
    encoding_status: str = "missing"
    # The experiment arm whose model scores this request (None: the ranker's live model).
    arm: str | None = None
    # (after the older fields, so positional construction keeps working)
    candidate_lists: dict[str, IdLists] = field(default_factory=dict)  # e.g. title_tokens
    profile: dict[str, int] = field(default_factory=dict)  # e.g. region, age_band
    profile_lists: dict[str, np.ndarray] = field(default_factory=dict)  # declared_interests

    def __len__(self) -> int:
        return len(self.candidates["item_id"])


def to_columns(inputs: list[RankInput]) -> dict[str, object]:
    """The unified-schema columns of every candidate of every input, in order."""
    counts = [len(x) for x in inputs]
    n = sum(counts)

    def per_row(values: list) -> np.ndarray:
        return np.repeat(np.asarray(values), counts)

    def per_row_lists(arrays: list[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for arr, c in zip(arrays, counts, strict=True):
            out.extend([arr] * c)  # the same array object: no copy per candidate
        return out

    cols: dict[str, object] = {
        "task_type": per_row([x.task_type for x in inputs]).astype(object),
        "event_time": per_row([x.now for x in inputs]).astype(np.int64),
        "user_id": per_row([x.user_id for x in inputs]).astype(np.int64),
        "source_item_id": per_row([x.source_item_id for x in inputs]).astype(np.int64),
        "device": per_row([x.device for x in inputs]).astype(np.int64),
        "hour": per_row([x.hour for x in inputs]).astype(np.int64),
        "surface": per_row([x.surface for x in inputs]).astype(np.int64),
        "query_tokens": per_row_lists([x.query_tokens for x in inputs]),
        "seq_item_ids": per_row_lists([x.events.item_ids for x in inputs]),
        "seq_event_types": per_row_lists([x.events.event_types for x in inputs]),
        "seq_timestamps": per_row_lists([x.events.timestamps for x in inputs]),
    }
    for name in dict.fromkeys(k for x in inputs for k in x.candidates):
        like = next(np.asarray(x.candidates[name]) for x in inputs if name in x.candidates)
        parts = [_column(x.candidates, name, len(x), like) for x in inputs]
        cols[name] = np.concatenate(parts) if parts else np.zeros(0)
    for name in dict.fromkeys(k for x in inputs for k in x.candidate_lists):
        parts = [x.candidate_lists.get(name) or IdLists.empty(len(x)) for x in inputs]
        cols[name] = IdLists.concat(parts).to_arrow()
    for name in dict.fromkeys(k for x in inputs for k in x.profile):
        cols[name] = per_row([x.profile.get(name, 0) for x in inputs]).astype(np.int64)
    empty = np.zeros(0, np.int64)
    for name in dict.fromkeys(k for x in inputs for k in x.profile_lists):
        cols[name] = per_row_lists([x.profile_lists.get(name, empty) for x in inputs])
    assert all(len(v) == n for v in cols.values())  # type: ignore[arg-type]
    return cols


def _column(candidates: dict, name: str, n: int, like: np.ndarray) -> np.ndarray:
    """A candidate column, or its placeholder (NaN for floats, else 0) for an input that
    lacks it; ``like`` is that column of another input."""
    if name in candidates:
        return np.asarray(candidates[name])
    return np.full(n, np.nan, like.dtype) if like.dtype.kind == "f" else np.zeros(n, np.int64)


def split(values: dict[str, np.ndarray], counts: list[int]) -> list[dict[str, np.ndarray]]:
    """Cut per-row outputs back into one dict per input."""
    bounds = np.cumsum([0, *counts])
    return [
        {k: v[a:b] for k, v in values.items()} for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
