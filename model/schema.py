"""The unified example schema, the raw-log schemas, and parquet validation against a spec.

A unified example is one row of training data (see DESIGN.md). Fields a use-case lacks hold
their placeholder (id 0, empty list); labels are nullable: null = not observed for this row,
masked out of that task's loss.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa

from model.config import DatasetConfig
from model.hashing import is_string_type

PLACEHOLDER_ID = 0
TS = pa.timestamp("us", tz="UTC")
IDS = pa.list_(pa.int64())

# Event types in a user's sequence (seq_event_types) and in raw event logs.
EVENT_TYPES = {"impression": 0, "click": 1, "add_to_cart": 2, "checkout": 3, "engage": 4, "rate": 5}

ID_COLUMNS = [
    "user_id",
    "item_id",
    "advertiser_id",
    "campaign_id",
    "source_item_id",
    "category_id",
]
CONTEXT_COLUMNS = ["device", "hour", "surface"]
# What the logs carry about the item and the user besides their ids (0 / empty = unknown).
# Item content: brand, price tier, release year (bucketed), title / tag words (the query-token
# vocabulary), the item's own categories / genres (the category_id vocabulary).
ITEM_CONTENT_COLUMNS = ["brand_id", "price_tier", "release_year_bucket"]
ITEM_CONTENT_LISTS = ["title_tokens", "item_categories"]
# User profile: region, age band, declared interests (category ids).
USER_PROFILE_COLUMNS = ["region", "age_band"]
USER_PROFILE_LISTS = ["declared_interests"]
PROFILE_COLUMNS = [*ITEM_CONTENT_COLUMNS, *USER_PROFILE_COLUMNS]
PROFILE_LISTS = [*ITEM_CONTENT_LISTS, *USER_PROFILE_LISTS]
_PROFILE_FIELDS = [
    *[pa.field(c, pa.int64(), nullable=False) for c in ITEM_CONTENT_COLUMNS],
    *[pa.field(c, IDS) for c in ITEM_CONTENT_LISTS],
    *[pa.field(c, pa.int64(), nullable=False) for c in USER_PROFILE_COLUMNS],
    *[pa.field(c, IDS) for c in USER_PROFILE_LISTS],
]
SEQUENCE_COLUMNS = ["seq_item_ids", "seq_event_types", "seq_timestamps"]
LABEL_COLUMNS = ["click", "add_to_cart", "checkout", "engage"]

UNIFIED_SCHEMA = pa.schema(
    [
        pa.field("task_type", pa.string(), nullable=False),
        pa.field("request_id", pa.string()),
        pa.field("event_time", TS, nullable=False),
        *[pa.field(c, pa.int64(), nullable=False) for c in ID_COLUMNS],
        pa.field("query_tokens", IDS),
        *[pa.field(c, pa.int64(), nullable=False) for c in CONTEXT_COLUMNS],
        pa.field("price", pa.float32()),
        pa.field("advertiser_reliability", pa.float32()),
        *_PROFILE_FIELDS,
        pa.field("seq_item_ids", IDS),
        pa.field("seq_event_types", IDS),
        pa.field("seq_timestamps", IDS),  # seconds since epoch, newest last
        *[pa.field(c, pa.float32(), nullable=True) for c in LABEL_COLUMNS],
        pa.field("sample_weight", pa.float32(), nullable=False),
    ]
)

# Raw logs written by ray_jobs.generate (and expected by ray_jobs.prepare).
IMPRESSIONS_SCHEMA = pa.schema(
    [
        pa.field("impression_id", pa.int64()),
        pa.field("request_id", pa.string()),
        pa.field("task_type", pa.string()),
        pa.field("event_time", TS),
        *[pa.field(c, pa.int64()) for c in ID_COLUMNS],
        pa.field("query_tokens", IDS),
        *[pa.field(c, pa.int64()) for c in CONTEXT_COLUMNS],
        pa.field("price", pa.float32()),
        *[f.with_nullable(True) for f in _PROFILE_FIELDS],
        pa.field("seq_item_ids", IDS),
        pa.field("seq_event_types", IDS),
        pa.field("seq_timestamps", IDS),
    ]
)

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.int64()),
        pa.field("impression_id", pa.int64()),
        pa.field("task_type", pa.string()),  # the surface that logged the impression
        pa.field("event_type", pa.string()),  # click | add_to_cart | checkout | engage
        pa.field("event_time", TS),
        pa.field("advertiser_id", pa.int64()),
        pa.field("match_confidence", pa.float32()),  # 1.0 for first-party events
    ]
)

TRUTH_SCHEMA = pa.schema(
    [
        pa.field("impression_id", pa.int64()),
        pa.field("task_type", pa.string()),
        pa.field("advertiser_id", pa.int64()),
        pa.field("p_click", pa.float32()),
        pa.field("p_add_to_cart", pa.float32()),  # P(add_to_cart | impression)
        pa.field("p_checkout", pa.float32()),  # P(checkout | impression)
        pa.field("p_engage", pa.float32()),
        pa.field("true_click", pa.bool_()),
        pa.field("true_add_to_cart", pa.bool_()),
        pa.field("true_checkout", pa.bool_()),
        pa.field("true_engage", pa.bool_()),
        pa.field("atc_delay_h", pa.float32()),  # null when no add_to_cart
        pa.field("checkout_delay_h", pa.float32()),  # hours after the click
        pa.field("cold_user", pa.bool_()),  # the user arrived in the last cold_start_days
        pa.field("cold_item", pa.bool_()),  # the item arrived in the last cold_start_days
    ]
)

ADVERTISER_TRUTH_SCHEMA = pa.schema(
    [
        pa.field("advertiser_id", pa.int64()),
        pa.field("noisy", pa.bool_()),
        pa.field("base_cvr_logit", pa.float32()),
    ]
)


class SchemaError(ValueError):
    """A parquet file that does not match its spec: names file, column, expected and found."""


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def _is_num(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _is_int_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_int(t.value_type)


def _is_time(t: pa.DataType) -> bool:
    return pa.types.is_timestamp(t) or _is_int(t)


def _hashed(c, categorical) -> bool:
    """Whether a categorical feature's table is hashed (itself or the feature it shares)."""
    by_name = {x.name: x for x in categorical}
    seen = set()
    while c.share_with is not None and c.share_with in by_name and c.name not in seen:
        seen.add(c.name)
        c = by_name[c.share_with]
    return c.hash_buckets is not None


def expected_columns(spec: DatasetConfig) -> dict[str, tuple[str, callable]]:
    """column -> (expected type description, predicate on the arrow type)."""
    f = spec.features
    out: dict[str, tuple[str, callable]] = {}
    for c in f.categorical:
        if c.multi:
            out[c.name] = ("list<int>", _is_int_list)
        elif _hashed(c, f.categorical):
            # strings get stable ids (model.hashing.string_ids), then the bucket hash
            out[c.name] = ("int or string", lambda t: _is_int(t) or is_string_type(t))
        else:
            out[c.name] = ("int (a vocab_size feature; use hash_buckets for strings)", _is_int)
    for n in f.numeric:
        out[n.name] = ("numeric", _is_num)
    if f.sequence is not None:
        s = f.sequence
        for col in (s.item_column, s.event_type_column, s.timestamp_column):
            if col:
                out[col] = ("list<int>", _is_int_list)
    if f.task_type_column:
        out[f.task_type_column] = (
            "string",
            lambda t: (
                pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)
            ),
        )
    if f.time_column:
        out[f.time_column] = ("timestamp or int", _is_time)
    for t in spec.tasks:
        out[t.column] = ("numeric", _is_num)
    return out


def validate_schema(schema: pa.Schema, spec: DatasetConfig, source: str) -> None:
    """Raise SchemaError naming the file, column, expected and found type."""
    problems = []
    names = set(schema.names)
    for col, (want, ok) in expected_columns(spec).items():
        if col not in names:
            problems.append(f"{source}: column {col!r} is missing (expected {want})")
            continue
        found = schema.field(col).type
        if not ok(found):
            problems.append(f"{source}: column {col!r} has type {found}, expected {want}")
    wcol = spec.features.weight_column
    if wcol and wcol in names and not _is_num(schema.field(wcol).type):
        problems.append(
            f"{source}: column {wcol!r} has type {schema.field(wcol).type}, expected numeric"
        )
    if problems:
        raise SchemaError("\n".join(problems))


def validate_files(paths: Iterable[str], spec: DatasetConfig, filesystem=None) -> int:
    """Validate each parquet file's schema (footer only, no data read). Returns files checked."""
    import pyarrow.parquet as pq

    n = 0
    for p in paths:
        schema = pq.read_schema(p, filesystem=filesystem)
        validate_schema(schema, spec, p)
        n += 1
    return n


def empty_unified_table() -> pa.Table:
    return UNIFIED_SCHEMA.empty_table()


def placeholder(name: str, n: int) -> pa.Array:
    """n rows of the placeholder of a content / profile column: 0, or an empty list."""
    if name in PROFILE_LISTS:
        return pa.ListArray.from_arrays(
            pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.int64())
        )
    if name in PROFILE_COLUMNS:
        return pa.array(np.zeros(n, np.int64))
    raise KeyError(f"{name!r} is not a content or profile column")


def unified_table(columns: dict) -> pa.Table:
    """A UNIFIED_SCHEMA table from a dict of columns; content and profile columns that the
    dict lacks (logs that do not carry them) hold their placeholder."""
    n = len(next(iter(columns.values()))) if columns else 0
    full = dict(columns)
    for name in (*PROFILE_COLUMNS, *PROFILE_LISTS):
        if name not in full:
            full[name] = placeholder(name, n)
    return pa.Table.from_pydict(
        {f.name: full[f.name] for f in UNIFIED_SCHEMA}, schema=UNIFIED_SCHEMA
    )
