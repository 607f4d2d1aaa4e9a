"""MovieLens -> unified examples: use-cases, labels, sequences, time split."""

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from model.schema import UNIFIED_SCHEMA, validate_schema

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def built(movielens_root):
    out, cfg, summary = movielens_root
    splits = {s: pq.read_table(out / s) for s in ("train", "validation", "test")}
    return cfg, summary, splits, out


def test_splits_are_unified_examples_and_ordered_in_time(built):
    cfg, summary, splits, _ = built
    for name, table in splits.items():
        assert table.schema.equals(UNIFIED_SCHEMA), name
        validate_schema(table.schema, cfg.dataset, name)
    train_max = pc.max(splits["train"]["event_time"]).as_py()
    val_min, val_max = (
        pc.min(splits["validation"]["event_time"]).as_py(),
        pc.max(splits["validation"]["event_time"]).as_py(),
    )
    test_min = pc.min(splits["test"]["event_time"]).as_py()
    assert train_max <= val_min and val_max <= test_min
    total = sum(t.num_rows for t in splits.values())
    assert total == 100836 * (1 + cfg.movielens.negatives_per_positive)
    assert splits["test"].num_rows == pytest.approx(0.1 * total, rel=0.05)


def test_use_cases_and_their_context(built):
    _, _, splits, _ = built
    t = splits["train"].to_pandas()
    assert set(t.task_type) == {"notifications", "related_items", "search", "category"}
    assert (t[t.task_type == "related_items"].source_item_id > 0).all()
    assert (t[t.task_type == "search"].query_tokens.map(len) > 0).all()
    assert (t[t.task_type == "category"].category_id > 0).all()
    assert (t[t.task_type != "search"].query_tokens.map(len) == 0).all()


def test_labels_click_engage_and_unobserved_conversions(built):
    cfg, _, splits, _ = built
    t = splits["train"].to_pandas()
    assert t.click.mean() == pytest.approx(1 / (1 + cfg.movielens.negatives_per_positive), abs=0.01)
    assert (t.engage <= t.click).all()  # engage only on rated items
    assert t.add_to_cart.isna().all() and t.checkout.isna().all()
    assert (t.sample_weight == 1.0).all()


def test_sequences_are_prior_ratings_newest_last(built):
    cfg, _, splits, _ = built
    t = splits["test"].slice(0, 2000).to_pandas()
    event_s = t.event_time.astype("int64") // 10**6 if t.event_time.dtype != object else None
    for ts_list, now in zip(t.seq_timestamps, event_s, strict=True):
        assert len(ts_list) <= cfg.movielens.max_seq_len
        assert (np.diff(ts_list) >= 0).all()
        assert len(ts_list) == 0 or ts_list[-1] <= now


def test_raw_logs_for_prepare(built):
    _, _, splits, out = built
    imps = pq.read_table(out / "raw" / "impressions")
    events = pq.read_table(out / "raw" / "events")
    assert imps.num_rows == sum(t.num_rows for t in splits.values())
    clicks = events.filter(pc.equal(events["event_type"], "click")).num_rows
    assert clicks == 100836


def test_item_content_genres_title_words_and_release_year(built):
    """Each movie's genres are its item_categories (the category_id vocabulary of the
    category use-case), its title then tag words its title_tokens (the query vocabulary),
    the year in its title a 5-year bucket; MovieLens has no user profiles."""
    import pandas as pd

    from ray_jobs.movielens import year_bucket

    cfg, _, splits, _ = built
    t = splits["train"].slice(0, 20000).to_pandas()
    movies = pd.read_csv(f"{cfg.movielens.source}/movies.csv").set_index("movieId")
    heat = t[t.item_id == 6].iloc[0]  # "Heat (1995)", Action|Crime|Thriller
    assert heat.release_year_bucket == (1995 - 1900) // 5 + 1
    assert len(heat.item_categories) == 3
    for _, row in t.drop_duplicates("item_id").head(300).iterrows():
        genres = movies.loc[row.item_id, "genres"]
        expected = 0 if genres == "(no genres listed)" else len(genres.split("|"))
        assert len(row.item_categories) == expected
        assert row.release_year_bucket == year_bucket(movies.loc[row.item_id, "title"])
        assert len(row.title_tokens) > 0
    # The category use-case's browsed genre is one of the positive item's genres.
    cat = t[(t.task_type == "category") & (t.click == 1.0)]
    assert all(c in g for c, g in zip(cat.category_id, cat.item_categories, strict=True))
    # Search queries are tag words: every positive's title tokens hold its query.
    search = t[(t.task_type == "search") & (t.click == 1.0)]
    assert all(
        set(q) <= set(w) for q, w in zip(search.query_tokens, search.title_tokens, strict=True)
    )
    for col in ("region", "age_band", "brand_id", "price_tier"):
        assert (t[col] == 0).all(), col
    assert (t.declared_interests.map(len) == 0).all()


def test_year_bucket_parses_the_title():
    from ray_jobs.movielens import year_bucket

    assert year_bucket("Toy Story (1995)") == 20
    assert year_bucket("Metropolis (1927) ") == 6
    assert year_bucket("Stranger Things (2016-)") == 24
    assert year_bucket("Babylon 5") == 0
    assert year_bucket("Ancient (1850)") == 1  # clipped


def test_no_movie_is_shown_before_anyone_rated_it(built):
    """Negatives come from the catalogue as it was: a movie first rated later is never an
    earlier negative (else 'not yet released' would be a label that flips between splits)."""
    import pandas as pd

    cfg, _, splits, _ = built
    ratings = pd.read_csv(f"{cfg.movielens.source}/ratings.csv")
    first = ratings.groupby("movieId").timestamp.min()
    for name, table in splits.items():
        t = table.select(["item_id", "event_time"]).to_pandas()
        shown = t.event_time.astype("int64").to_numpy() // 10**6
        # negatives are shown one second before the rated movie of their context
        assert (first.loc[t.item_id].to_numpy() <= shown + 1).all(), name
