"""A ranking request -> unified-schema rows, one per candidate.

The ingress sends the ranker a compact :class:`RankInput` (user-level fields once, candidate
columns as arrays); the ranker expands a whole batch of them into the columns of the unified
example (``model.schema.UNIFIED_SCHEMA``) and runs the exported model's own
FeatureProcessor on them — the same feature path as training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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
    candidates: dict[str, np.ndarray]  # CANDIDATE_COLUMNS -> (n,)
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
    for name in CANDIDATE_COLUMNS:
        parts = [np.asarray(x.candidates[name]) for x in inputs]
        cols[name] = np.concatenate(parts) if parts else np.zeros(0)
    assert all(len(v) == n for v in cols.values())  # type: ignore[arg-type]
    return cols


def split(values: dict[str, np.ndarray], counts: list[int]) -> list[dict[str, np.ndarray]]:
    """Cut per-row outputs back into one dict per input."""
    bounds = np.cumsum([0, *counts])
    return [
        {k: v[a:b] for k, v in values.items()} for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
