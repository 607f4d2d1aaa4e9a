"""Something to serve before the training job lands: synthetic catalogue rows and an
exported *untrained* model.

``sample_rows`` draws a small unified-schema table from a fixed item catalogue (items with a
category, an advertiser, a campaign, a price, title tokens, a brand, a price tier, a release
year) and fixed user profiles (region, age band, declared interests), with user sequences drawn from
the same items, so that the retrieval indices built from it (popularity, co-occurrence,
inverted index, eligible ads) are meaningful. ``export_untrained`` fits the FeatureProcessor
on those rows and exports ``build_model(cfg)`` as it is initialised; the served scores are
then arbitrary but deterministic, which is all the serving path needs.

Serve code must not import training code, so this is deliberately self-contained (numpy +
pyarrow + model/).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from model.config import UnirankConfig
from model.ensemble import build_model
from model.export import export
from model.features import FeatureProcessor
from model.schema import UNIFIED_SCHEMA, unified_table

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z
_TASK_MIX = {"ads": 0.4, "notifications": 0.15, "related_items": 0.15, "search": 0.15}


def catalogue(num_items: int = 300, seed: int = 5) -> dict[str, np.ndarray]:
    """The item catalogue behind ``sample_rows``: one entry per item id (ids 1..num_items).

    Every third item is an ad (advertiser and campaign > 0); the rest are organic items.
    """
    rng = np.random.default_rng(seed)
    item = np.arange(1, num_items + 1, dtype=np.int64)
    is_ad = item % 3 == 0
    advertiser = np.where(is_ad, rng.integers(1, 16, size=num_items), 0).astype(np.int64)
    return {
        "item_id": item,
        "category_id": rng.integers(1, 11, size=num_items).astype(np.int64),
        "advertiser_id": advertiser,
        "campaign_id": np.where(is_ad, advertiser * 10 + rng.integers(1, 3, size=num_items), 0),
        "price": np.exp(rng.normal(3.0, 1.0, size=num_items)).astype(np.float32),
        "advertiser_reliability": np.where(is_ad, rng.uniform(0.3, 1.0, num_items), np.nan),
        # two title tokens per item, from a vocabulary of 60: the search use-case's index
        "tokens": rng.integers(1, 61, size=(num_items, 2)).astype(np.int64),
        # Zipf-like appeal: a few items are much more popular than the rest
        "appeal": rng.zipf(1.6, size=num_items).clip(max=50).astype(np.float64),
        # content (drawn last, so the columns above do not depend on it)
        "brand_id": rng.integers(1, 31, size=num_items).astype(np.int64),
        "price_tier": rng.integers(1, 6, size=num_items).astype(np.int64),
        "release_year_bucket": rng.integers(1, 21, size=num_items).astype(np.int64),
    }


def user_profiles(num_users: int = 50, seed: int = 6) -> dict[str, np.ndarray]:
    """Profiles of users 1..num_users (index 0: the placeholder user): region, age band and
    0-3 declared interests (category ids, 0-padded)."""
    rng = np.random.default_rng(seed)
    n = num_users + 1
    interests = rng.integers(1, 11, size=(n, 3)).astype(np.int64)
    count = rng.integers(0, 4, size=n)
    interests[np.arange(3)[None, :] >= count[:, None]] = 0
    profile = {
        "region": rng.integers(1, 11, size=n).astype(np.int64),
        "age_band": rng.integers(1, 7, size=n).astype(np.int64),
        "declared_interests": interests,
        "num_interests": count,
    }
    for v in profile.values():
        v[0] = 0
    return profile


def sample_rows(
    n: int = 2000,
    seed: int = 0,
    num_users: int = 50,
    num_items: int = 300,
    max_seq: int = 16,
    task_types: tuple[str, ...] = ("ads", "notifications", "related_items", "search", "category"),
) -> pa.Table:
    """n unified-schema rows (impressions with labels) drawn from ``catalogue(num_items)``."""
    cat = catalogue(num_items)
    prof = user_profiles(num_users)
    rng = np.random.default_rng(seed)
    p_item = cat["appeal"] / cat["appeal"].sum()
    mix = np.array([_TASK_MIX.get(t, 0.15) for t in task_types])
    ttype = rng.choice(len(task_types), size=n, p=mix / mix.sum())
    names = np.asarray(task_types)[ttype]
    ad_idx = np.flatnonzero(cat["advertiser_id"] > 0)
    items = rng.choice(num_items, size=n, p=p_item)  # (n,) catalogue index
    ads = names == "ads"
    items[ads] = rng.choice(ad_idx, size=int(ads.sum()))
    users = rng.integers(1, num_users + 1, size=n)
    event_time = T0 + rng.integers(0, 7 * 86400, size=n)

    lengths = rng.integers(0, max_seq + 1, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    total = int(offsets[-1])
    row_of = np.repeat(np.arange(n), lengths)
    # a user's events cluster in a category: neighbours co-occur in sequences
    seq_idx = rng.choice(num_items, size=total, p=p_item)
    ages = np.sort(rng.exponential(6 * 3600.0, size=total))[::-1]
    order = np.lexsort((-ages, row_of))  # newest (smallest age) last within a row
    seq_ts = (event_time[row_of] - ages[order]).astype(np.int64)

    tok_n = np.where(names == "search", 2, 0)
    tok_off = np.concatenate([[0], np.cumsum(tok_n)]).astype(np.int32)
    tokens = cat["tokens"][items[names == "search"]].ravel()
    click = rng.random(n) < 0.1 + 0.4 * (cat["appeal"][items] / cat["appeal"].max())
    atc = click & (rng.random(n) < 0.3)
    checkout = atc & (rng.random(n) < 0.3)
    engage = click & (rng.random(n) < 0.5)
    source = np.where(names == "related_items", cat["item_id"][rng.choice(num_items, n)], 0)

    def label(y: np.ndarray, observed: np.ndarray) -> pa.Array:
        return pa.array(np.where(observed, y, np.nan).astype(np.float32), from_pandas=True)

    def lists(values: np.ndarray, off: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(off), pa.array(values.astype(np.int64)))

    cols = {
        "task_type": pa.array(names),
        "request_id": pa.array([f"s{seed}-{i}" for i in range(n)]),
        "event_time": pa.array(event_time * 1_000_000).cast(
            UNIFIED_SCHEMA.field("event_time").type
        ),
        "user_id": pa.array(users.astype(np.int64)),
        "item_id": pa.array(cat["item_id"][items]),
        "advertiser_id": pa.array(cat["advertiser_id"][items]),
        "campaign_id": pa.array(cat["campaign_id"][items].astype(np.int64)),
        "source_item_id": pa.array(source.astype(np.int64)),
        "category_id": pa.array(cat["category_id"][items]),
        "query_tokens": lists(tokens, tok_off),
        "device": pa.array(rng.integers(0, 3, size=n)),
        "hour": pa.array(((event_time % 86400) // 3600).astype(np.int64)),
        "surface": pa.array(rng.integers(0, 4, size=n)),
        "price": pa.array(cat["price"][items]),
        "advertiser_reliability": pa.array(
            cat["advertiser_reliability"][items].astype(np.float32), from_pandas=True
        ),
        # item content and user profile, as the catalogue and the sign-up form show them
        "brand_id": pa.array(cat["brand_id"][items]),
        "price_tier": pa.array(cat["price_tier"][items]),
        "release_year_bucket": pa.array(cat["release_year_bucket"][items]),
        "title_tokens": lists(cat["tokens"][items].ravel(), np.arange(n + 1, dtype=np.int32) * 2),
        "item_categories": lists(cat["category_id"][items], np.arange(n + 1, dtype=np.int32)),
        "region": pa.array(prof["region"][users]),
        "age_band": pa.array(prof["age_band"][users]),
        "declared_interests": lists(
            prof["declared_interests"][users][prof["declared_interests"][users] > 0],
            np.concatenate([[0], np.cumsum(prof["num_interests"][users])]).astype(np.int32),
        ),
        "seq_item_ids": lists(cat["item_id"][seq_idx], offsets),
        "seq_event_types": lists(rng.integers(0, 5, size=total), offsets),
        "seq_timestamps": lists(seq_ts, offsets),
        "click": label(click, np.ones(n, bool)),
        "add_to_cart": label(atc, ads),
        "checkout": label(checkout, ads),
        "engage": label(engage, ~ads),
        "sample_weight": pa.array(np.ones(n, dtype=np.float32)),
    }
    return unified_table(cols)


def write_rows(table: pa.Table, directory: str | Path, rows_per_file: int = 1000) -> Path:
    """Write ``table`` as parquet shards under ``directory`` (what ray_jobs.prepare writes)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(0, table.num_rows, rows_per_file):
        pq.write_table(
            table.slice(i, rows_per_file), out / f"part-{i // rows_per_file:05d}.parquet"
        )
    return out


def export_untrained(
    out_dir: str | Path, cfg: UnirankConfig, rows: pa.Table | None = None, seed: int = 0
) -> Path:
    """Export ``build_model(cfg)`` untrained, with a processor fitted on ``rows``."""
    rows = rows if rows is not None else sample_rows(500, seed=seed)
    proc = FeatureProcessor(cfg.dataset).fit([rows])
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    return export(out_dir, model, proc, cfg)
