"""MovieLens (ml-latest-small) -> unified examples for the streaming use-cases.

    python -m ray_jobs.movielens [CONFIG] [section.field=value ...]

Data: GroupLens MovieLens "latest small" (see its README.txt for the terms: research use,
no endorsement, cite Harper & Konstan 2015, no commercial use without permission).

Each rating is a positive impression of one use-case; negatives are sampled items shown in the
same context (popularity-weighted, among the movies already rated by then):
    notifications  user -> item
    related_items  source item (the user's previous rating within related_window_s) -> item
    search         query tokens (words of the item's tags) -> item
    category       genre -> item (negatives from the same genre)
Item content: ``item_categories`` = the movie's genres (the category_id vocabulary),
``title_tokens`` = the words of its title then its tag words, most tagged first (the
query-token vocabulary), ``release_year_bucket`` = the year in its title in 5-year buckets
(1 = 1900-1904, 0 = unknown). MovieLens has no user profiles: region, age band and declared
interests hold their placeholders.
Labels: click = rated, engage = rating >= engage_threshold; add_to_cart / checkout are null
(not observed here, so masked out of those tasks' losses). The user sequence is the user's
earlier ratings (event type ``rate``), newest last. Split by time into train / validation /
test. The same impressions and events are also written as raw logs (raw/impressions,
raw/events) so that ``ray_jobs.prepare`` can run on MovieLens too.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from model.config import MovieLensConfig, UnirankConfig
from model.schema import (
    EVENT_TYPES,
    EVENTS_SCHEMA,
    IMPRESSIONS_SCHEMA,
    UNIFIED_SCHEMA,
    placeholder,
)
from model.storage import resolve
from ray_jobs.common import job_parser, parse_job_args, setup_logging, write_json

USE_CASES = ("notifications", "related_items", "search", "category")
SURFACE = {"notifications": 2, "related_items": 3, "search": 4, "category": 5}


def _read(source: Path, name: str) -> pd.DataFrame:
    path = source / name
    if not path.exists():
        raise FileNotFoundError(f"MovieLens file {path} not found (movielens.source={source})")
    return pd.read_csv(path)


def _vocab(words: pd.Series) -> dict[str, int]:
    return {w: i + 1 for i, w in enumerate(sorted(set(words)))}


YEAR_BUCKET_START, YEAR_BUCKET_YEARS, YEAR_BUCKETS = 1900, 5, 63


def year_bucket(title: str) -> int:
    """The release year in a MovieLens title ("Heat (1995)") as a 5-year bucket: 1 for
    1900-1904, ..., clipped to [1, 63]; 0 when the title carries no year."""
    m = re.search(r"\((\d{4})(?:-\d{0,4})?\)\s*$", str(title))
    if not m:
        return 0
    bucket = (int(m.group(1)) - YEAR_BUCKET_START) // YEAR_BUCKET_YEARS + 1
    return int(min(max(bucket, 1), YEAR_BUCKETS))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", str(text).lower())


def load_frames(ml: MovieLensConfig) -> tuple[pd.DataFrame, dict, dict, dict]:
    """Ratings sorted by (user, time) with each movie's genres and tag tokens, and its
    content: movieId -> (title then tag tokens, release-year bucket)."""
    source = Path(ml.source)
    ratings = _read(source, "ratings.csv")
    movies = _read(source, "movies.csv")
    tags = _read(source, "tags.csv")
    missing = {"userId", "movieId", "rating", "timestamp"} - set(ratings.columns)
    if missing:
        raise ValueError(f"{source / 'ratings.csv'}: missing columns {sorted(missing)}")
    genres = movies.set_index("movieId")["genres"].str.split("|")
    genre_vocab = _vocab(g for gs in genres for g in gs if g != "(no genres listed)")
    movie_genres = {m: [genre_vocab[g] for g in gs if g in genre_vocab] for m, gs in genres.items()}
    words = tags.assign(w=tags["tag"].map(_words))
    words = words.explode("w").dropna(subset=["w"])
    token_vocab = _vocab(words["w"])
    movie_tokens = (
        words.groupby("movieId")["w"]
        .apply(lambda ws: sorted({token_vocab[w] for w in ws}))
        .to_dict()
    )
    # Title words extend the tag vocabulary (tag ids, hence query tokens, stay as they were).
    titles = movies.set_index("movieId")["title"].astype(str)
    title_words = {
        m: _words(re.sub(r"\(\d{4}(?:-\d{0,4})?\)\s*$", "", t)) for m, t in titles.items()
    }
    for w in sorted({w for ws in title_words.values() for w in ws} - set(token_vocab)):
        token_vocab[w] = len(token_vocab) + 1
    tagged = words.groupby(["movieId", "w"]).size().rename("n").reset_index()
    tagged = tagged.sort_values(["movieId", "n", "w"], ascending=[True, False, True])
    tag_order = tagged.groupby("movieId")["w"].apply(list).to_dict()
    content = {
        m: (
            list(dict.fromkeys(token_vocab[w] for w in [*title_words[m], *tag_order.get(m, [])])),
            year_bucket(titles[m]),
        )
        for m in titles.index
    }
    ratings = ratings.sort_values(["userId", "timestamp", "movieId"], kind="stable").reset_index(
        drop=True
    )
    return ratings, movie_genres, movie_tokens, content


def build(ml: MovieLensConfig) -> dict[str, pa.Table]:
    """Return {'impressions', 'events', 'labels'} tables (labels aligned with impressions)."""
    ratings, movie_genres, movie_tokens, content = load_frames(ml)
    rng = np.random.default_rng(ml.seed)
    n = len(ratings)
    users = ratings["userId"].to_numpy(np.int64)
    items = ratings["movieId"].to_numpy(np.int64)
    ts = ratings["timestamp"].to_numpy(np.int64)
    stars = ratings["rating"].to_numpy(np.float32)

    # Each rating's history: the same user's previous ratings, truncated to the newest max_seq_len.
    first = np.r_[0, np.flatnonzero(np.diff(users)) + 1]
    user_start = np.repeat(first, np.diff(np.r_[first, n]))
    idx = np.arange(n)
    hist_start = np.maximum(user_start, idx - ml.max_seq_len)
    hist_len = idx - hist_start
    flat = np.repeat(hist_start, hist_len) + (
        np.arange(hist_len.sum()) - np.repeat(np.cumsum(hist_len) - hist_len, hist_len)
    )

    prev_ok = (hist_len > 0) & (ts - ts[np.maximum(idx - 1, 0)] <= ml.related_window_s)
    has_tags = np.array([m in movie_tokens for m in items])
    r = rng.random(n)
    use_case = np.where(
        has_tags & (r < 0.5),
        "search",
        np.where(
            prev_ok & (r < 0.8), "related_items", np.where(r < 0.9, "notifications", "category")
        ),
    )
    use_case = np.where(
        (use_case == "category") & ~np.array([bool(movie_genres.get(m)) for m in items]),
        "notifications",
        use_case,
    )

    # Negatives: popularity-weighted items in the same context, among the movies already in
    # the catalogue then (first rated at or before that time). Drawing from every movie would
    # show movies nobody could rate yet as early negatives, a signal that flips in later
    # splits (the release-year feature exposes it: newer year -> negative in train only).
    k = ml.negatives_per_positive
    first_seen = pd.Series(ts).groupby(items).min()  # movieId -> first rating time
    known = first_seen.sort_values(kind="stable").index.to_numpy()  # by first rating
    known_t = first_seen.loc[known].to_numpy()
    cum = np.cumsum(pd.Series(items).value_counts().loc[known].to_numpy(dtype=float))
    avail = np.searchsorted(known_t, ts, side="right")  # (n,) >= 1: the rated movie itself
    u = rng.random((n, k)) * cum[avail - 1][:, None]
    neg_items = known[np.searchsorted(cum, u, side="right")]
    genre_of = np.array([rng.choice(movie_genres[m]) if movie_genres.get(m) else 0 for m in items])
    by_genre: dict[int, list] = {}
    for m in known:  # in order of first rating
        for g in movie_genres.get(m, []):
            by_genre.setdefault(g, []).append(m)
    genre_items = {g: np.asarray(ms) for g, ms in by_genre.items()}
    genre_t = {g: first_seen.loc[ms].to_numpy() for g, ms in genre_items.items()}
    for i in np.flatnonzero(use_case == "category"):
        g = genre_of[i]
        j = np.searchsorted(genre_t[g], ts[i], side="right")  # genre's movies known by then
        neg_items[i] = genre_items[g][rng.integers(0, j, size=k)]

    # Rows: positives first block, then k negative blocks; all share context with their positive.
    base = np.tile(idx, k + 1)
    row_item = np.concatenate([items, neg_items.T.reshape(-1)])
    positive = np.arange(len(base)) < n
    row_ts = ts[base] - np.where(positive, 0, 1)  # negatives shown just before the rated item
    order = np.lexsort((row_item, row_ts))
    base, row_item, positive, row_ts = base[order], row_item[order], positive[order], row_ts[order]
    m = len(base)
    tt = use_case[base]
    source_item = np.where(tt == "related_items", items[np.maximum(base - 1, 0)], 0)
    category = np.where(tt == "category", genre_of[base], 0)
    q_lists = [
        list(
            rng.choice(
                movie_tokens[items[b]], size=min(3, len(movie_tokens[items[b]])), replace=False
            )
        )
        if t == "search"
        else []
        for b, t in zip(base, tt, strict=True)
    ]
    seq_off = np.r_[0, np.cumsum(hist_len)]
    seq_items = pa.ListArray.from_arrays(pa.array(seq_off.astype(np.int32)), pa.array(items[flat]))
    seq_types = pa.ListArray.from_arrays(
        pa.array(seq_off.astype(np.int32)),
        pa.array(np.full(len(flat), EVENT_TYPES["rate"], dtype=np.int64)),
    )
    seq_ts = pa.ListArray.from_arrays(pa.array(seq_off.astype(np.int32)), pa.array(ts[flat]))
    take = pa.array(base)
    ts_type = IMPRESSIONS_SCHEMA.field("event_time").type
    zeros = np.zeros(m, dtype=np.int64)
    hour = (row_ts % 86400) // 3600
    impressions = pa.table(
        {
            "impression_id": np.arange(m, dtype=np.int64),
            "request_id": pa.array([f"ml-{users[b]}-{ts[b]}" for b in base]),
            "task_type": pa.array(tt.astype(str)),
            "event_time": pa.array(row_ts * 1_000_000).cast(ts_type),
            "user_id": users[base],
            "item_id": row_item,
            "advertiser_id": zeros,
            "campaign_id": zeros,
            "source_item_id": source_item.astype(np.int64),
            "category_id": category.astype(np.int64),
            "query_tokens": pa.array(q_lists, type=pa.list_(pa.int64())),
            "device": zeros,
            "hour": hour.astype(np.int64),
            "surface": np.array([SURFACE[t] for t in tt], dtype=np.int64),
            "price": pa.nulls(m, pa.float32()),
            "brand_id": zeros,
            "price_tier": zeros,
            "release_year_bucket": np.array(
                [content.get(i, ([], 0))[1] for i in row_item], dtype=np.int64
            ),
            "title_tokens": pa.array(
                [content.get(i, ([], 0))[0] for i in row_item], type=pa.list_(pa.int64())
            ),
            "item_categories": pa.array(
                [movie_genres.get(i, []) for i in row_item], type=pa.list_(pa.int64())
            ),
            "region": zeros,
            "age_band": zeros,
            "declared_interests": placeholder("declared_interests", m),
            "seq_item_ids": seq_items.take(take),
            "seq_event_types": seq_types.take(take),
            "seq_timestamps": seq_ts.take(take),
        },
        schema=IMPRESSIONS_SCHEMA,
    )
    engage = positive & (stars[base] >= ml.engage_threshold)
    labels = {"click": positive.astype(np.float32), "engage": engage.astype(np.float32)}
    ev_rows = [(np.flatnonzero(positive), "click", 1), (np.flatnonzero(engage), "engage", 2)]
    events = pa.concat_tables(
        [
            pa.table(
                {
                    "event_id": rows * 16 + EVENT_TYPES[name],
                    "impression_id": rows.astype(np.int64),
                    "task_type": pa.array(tt[rows].astype(str)),
                    "event_type": pa.array([name] * len(rows), pa.string()),
                    "event_time": pa.array((row_ts[rows] + delay) * 1_000_000).cast(ts_type),
                    "advertiser_id": np.zeros(len(rows), dtype=np.int64),
                    "match_confidence": np.ones(len(rows), dtype=np.float32),
                },
                schema=EVENTS_SCHEMA,
            )
            for rows, name, delay in ev_rows
        ]
    )
    return {"impressions": impressions, "events": events, "labels": labels}


def to_unified(impressions: pa.Table, labels: dict[str, np.ndarray]) -> pa.Table:
    m = impressions.num_rows
    cols = {}
    for field in UNIFIED_SCHEMA:
        name = field.name
        if name in labels:
            cols[name] = pa.array(labels[name], pa.float32())
        elif name in ("add_to_cart", "checkout"):
            cols[name] = pa.nulls(m, pa.float32())  # not observed on MovieLens
        elif name == "sample_weight":
            cols[name] = pa.array(np.ones(m, dtype=np.float32))
        elif name == "advertiser_reliability":
            cols[name] = pa.array(np.zeros(m, dtype=np.float32))
        else:
            cols[name] = impressions.column(name).cast(field.type)
    return pa.table(cols, schema=UNIFIED_SCHEMA)


def time_split(event_time: np.ndarray, val_frac: float, test_frac: float) -> tuple[int, int]:
    """Boundaries (epoch us) so that the newest test_frac rows are test, the val_frac before validation."""
    t_val = int(np.quantile(event_time, 1.0 - val_frac - test_frac))
    t_test = int(np.quantile(event_time, 1.0 - test_frac))
    return t_val, t_test


def write_movielens(cfg: UnirankConfig) -> dict:
    ml = cfg.movielens
    built = build(ml)
    unified = to_unified(built["impressions"], built["labels"])
    t_us = unified.column("event_time").cast(pa.int64()).to_numpy()
    t_val, t_test = time_split(t_us, ml.validation_fraction, ml.test_fraction)
    root = resolve(ml.output, cfg.storage)
    fs = root.filesystem
    splits = {
        "train": t_us < t_val,
        "validation": (t_us >= t_val) & (t_us < t_test),
        "test": t_us >= t_test,
    }
    summary: dict = {"splits": {}, "boundaries_us": {"validation": t_val, "test": t_test}}
    for name, mask in splits.items():
        part = unified.filter(pa.array(mask))
        fs.create_dir(root.join(name).path, recursive=True)
        pq.write_table(part, root.join(name, "part-00000.parquet").path, filesystem=fs)
        per_tt = part.group_by("task_type").aggregate(
            [("click", "mean"), ("engage", "mean"), ("click", "count")]
        )
        summary["splits"][name] = {
            "rows": part.num_rows,
            "task_types": {
                r["task_type"]: {
                    "rows": r["click_count"],
                    "click": round(r["click_mean"], 4),
                    "engage": round(r["engage_mean"], 4),
                }
                for r in per_tt.to_pylist()
            },
        }
    for name in ("impressions", "events"):
        fs.create_dir(root.join("raw", name).path, recursive=True)
        pq.write_table(
            built[name], root.join("raw", name, "part-00000.parquet").path, filesystem=fs
        )
    write_json(root.join("summary.json").uri, summary, cfg.storage)
    return summary


def main(argv=None) -> None:
    setup_logging()
    _, cfg = parse_job_args(job_parser(__doc__.split("\n\n")[0], job="movielens"), argv)
    summary = write_movielens(cfg)
    for split, s in summary["splits"].items():
        print(f"{split:<11} {s['rows']:>8} rows")
        for tt, e in sorted(s["task_types"].items()):
            print(f"  {tt:<15}{e['rows']:>8}  click={e['click']:.3f} engage={e['engage']:.3f}")


if __name__ == "__main__":
    main()
