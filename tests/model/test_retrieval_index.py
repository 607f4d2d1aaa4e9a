"""model.retrieval_index: the index training writes and serving reads, built from the columns
the config names; per-task_type item features as each task_type's training rows carried them
(checked on the synthetic generator's logs, where ads items also show up in other use-cases
with advertiser 0); bring-your-own tables without task_type / sequence / time, string ids."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from model.config import GenerateConfig, load_config
from model.hashing import string_ids
from model.retrieval_index import (
    INDEX_FILE,
    UNIFIED_ITEM_FEATURES,
    IndexArrays,
    IndexColumns,
    RetrievalError,
    build_index,
)
from model.schema import unified_table
from serve_apps.retrieval import RetrievalIndex

pytestmark = pytest.mark.unit
RELIABILITY = "advertiser_reliability"  # not in the tiny table

REPO = Path(__file__).resolve().parents[2]


def lookup(table: pa.Table, columns: IndexColumns | None = None) -> RetrievalIndex:
    return RetrievalIndex.from_arrays(build_index(table, columns=columns))


def tiny() -> pa.Table:
    """Item 1 is an ad: its ads rows carry advertiser 7; its newest row overall is a
    notifications row with advertiser 0. Rows are out of time order on purpose."""
    return pa.table(
        {
            "task_type": ["notifications", "ads", "ads", "search", "ads"],
            "event_time": pa.array([40, 30, 10, 20, 5], pa.timestamp("s", tz="UTC")),
            "item_id": [1, 1, 1, 2, 3],
            "category_id": [4, 4, 4, 5, 0],
            "advertiser_id": [0, 7, 7, 0, 9],
            "campaign_id": [0, 70, 71, 0, 90],
            "price": [None, 6.0, 5.0, 3.0, 2.0],
            "click": [1.0, 0.0, 1.0, 1.0, None],
        }
    )


def test_tiny_catalogue_and_per_task_type_features():
    idx = lookup(tiny())
    assert idx.items.tolist() == [1, 2, 3]
    ids = np.array([1, 2, 3, 99])
    cat = idx.features(ids)  # catalogue: newest non-missing value of each feature
    assert cat["advertiser_id"].tolist() == [7, 0, 9, 0]
    assert cat["campaign_id"].tolist() == [70, 0, 90, 0]  # t=30 beats t=10
    assert cat["price"][:3].tolist() == [6.0, 3.0, 2.0] and np.isnan(cat["price"][3])
    ads = idx.features(ids, task_type="ads")  # the newest ads row of each item
    assert ads["advertiser_id"].tolist() == [7, 0, 9, 0]
    assert ads["campaign_id"].tolist() == [70, 0, 90, 0]
    notif = idx.features(ids, task_type="notifications")  # as notifications rows had it
    assert notif["advertiser_id"].tolist() == [0, 0, 9, 0]  # 2, 3: never there -> catalogue
    assert np.isnan(notif["price"][0])  # the notifications row had no price
    unknown_tt = idx.features(ids, task_type="category")
    assert unknown_tt["advertiser_id"].tolist() == cat["advertiser_id"].tolist()
    # popularity: positives + shows / 10; eligible ads: items with a campaign
    assert np.allclose(idx.features(ids)["popularity"], [2.3, 1.1, 0.1, 0.0])
    assert idx.eligible_ads(None, 10).tolist() == [1, 3]
    assert idx.eligible_ads([90], 10).tolist() == [3]
    assert idx.meta["task_types"] == ["ads", "notifications", "search"]


def generated_logs(seed: int = 3) -> tuple[pa.Table, pd.DataFrame]:
    """One chunk of the synthetic generator's logs in the unified columns (click = the
    generator's true click), and the same rows as a DataFrame for the expectations."""
    from model.synthetic import World, generate_chunk

    cfg = GenerateConfig(seed=seed, num_impressions=20_000, num_users=500, num_items=2_000)
    chunk = generate_chunk(World.build(cfg), 0)
    imp, truth = chunk["impressions"], chunk["truth"]
    cols = {name: imp[name] for name in imp.column_names}
    n = imp.num_rows
    for label in ("click", "add_to_cart", "checkout", "engage"):
        cols[label] = pa.array(truth[f"true_{label}"].to_numpy().astype(np.float32))
    cols["advertiser_reliability"] = pa.nulls(n, pa.float32())
    cols["sample_weight"] = pa.array(np.ones(n, np.float32))
    table = unified_table(cols)
    df = table.select(["task_type", "event_time", "item_id", "advertiser_id", "campaign_id"])
    return table, df.to_pandas()


def test_generated_logs_ads_candidates_keep_the_advertiser_training_saw():
    table, df = generated_logs()
    idx = lookup(table)
    newest = df.sort_values("event_time", kind="stable").groupby("item_id").tail(1)
    newest = newest.set_index("item_id")
    ads_rows = df[df.task_type == "ads"].sort_values("event_time", kind="stable")
    newest_ads = ads_rows.groupby("item_id").tail(1).set_index("item_id")
    # the case of the bug: ad items whose newest row is another use-case's, which logs
    # advertiser 0 -- the old index (features of the last row) served them without one
    victims = newest_ads.index[newest.loc[newest_ads.index, "task_type"] != "ads"].to_numpy()
    assert len(victims) > 50
    assert (newest.loc[victims, "advertiser_id"] == 0).all()

    got = idx.features(victims, task_type="ads")
    assert (got["advertiser_id"] == newest_ads.loc[victims, "advertiser_id"].to_numpy()).all()
    assert (got["campaign_id"] == newest_ads.loc[victims, "campaign_id"].to_numpy()).all()
    assert (got["advertiser_id"] != 0).all() and (got["campaign_id"] != 0).all()
    # every item an ads row showed is an eligible ad
    assert set(newest_ads.index) <= set(idx.eligible_ads(None, 10**6).tolist())
    # other use-cases get what their own rows carried
    rel = df[df.task_type == "related_items"].sort_values("event_time", kind="stable")
    newest_rel = rel.groupby("item_id").tail(1).set_index("item_id")
    both = np.intersect1d(victims, newest_rel.index.to_numpy())
    assert len(both) > 0
    got_rel = idx.features(both, task_type="related_items")
    assert (got_rel["advertiser_id"] == newest_rel.loc[both, "advertiser_id"].to_numpy()).all()


def test_byo_table_without_task_type_sequence_or_time_and_string_ids():
    cfg = load_config(
        REPO / "configs" / "byo_example.yaml",
        ["dataset.features.task_type_column=null", "dataset.features.sequence=null"],
    )
    cols = IndexColumns.from_config(cfg.dataset)
    assert (cols.item, cols.task_type, cols.sequence, cols.label) == (
        "item_id",
        None,
        None,
        "click",
    )
    t = pa.table(
        {
            "item_id": ["m1", "m2", "m1", "m3", None],
            "category_id": [3, 4, 3, 4, 1],
            "click": [1.0, 0.0, 1.0, 1.0, 0.0],
            "user_id": ["u1", "u1", "u2", "u2", "u3"],
        }
    )
    index = build_index(t, columns=cols)
    ids = string_ids(pa.array(["m1", "m2", "m3"]))
    assert sorted(index.arrays["items"].tolist()) == sorted([0, *ids.tolist()])
    assert index.meta["features"] == ["category_id"]
    assert "campaign_id" in index.meta["skipped"] and "query_tokens" in index.meta["skipped"]
    assert index.meta["skipped"]["per_task_type_features"] == "no task_type column"
    idx = RetrievalIndex.from_arrays(index)
    f = idx.features(ids, task_type="notifications")
    assert f["category_id"].tolist() == [3, 4, 4]
    assert f["campaign_id"].tolist() == [0, 0, 0] and np.isnan(f["price"]).all()
    assert idx.popular(1).tolist() == [ids[0]]  # two clicks
    assert idx.eligible_ads(None, 10).size == 0 and idx.neighbours(int(ids[0]), 5).size == 0
    assert set(idx.popular_in_category(4, 10).tolist()) == {ids[1], ids[2]}


def test_columns_from_config_and_what_cannot_be_used():
    cfg = load_config(
        None,
        ["dataset.catalogue.item_features=[category_id,title_tokens]",
         "dataset.catalogue.popularity_label=engage"],
    )  # fmt: skip
    cols = IndexColumns.from_config(cfg.dataset)
    assert cols.label == "engage" and cols.features == ("category_id", "title_tokens")
    t = pa.table(
        {"item_id": [1, 2], "category_id": [1, 2], "title_tokens": [[1], [2]], "engage": [0, 1]}
    )
    index = build_index(t, columns=cols)
    assert index.meta["features"] == ["category_id"]
    assert "not a scalar item feature" in index.meta["skipped"]["title_tokens"]
    assert RetrievalIndex.from_arrays(index).popular(1).tolist() == [2]
    with pytest.raises(RetrievalError, match=r"no item column 'movie' \(dataset.catalogue"):
        build_index(t, columns=IndexColumns(item="movie"))
    with pytest.raises(RetrievalError, match="no rows"):
        build_index(t.slice(0, 0), columns=cols)


def test_file_round_trip_and_the_format_before_metadata(tmp_path):
    index = build_index(tiny(), tmp_path / INDEX_FILE)
    back = IndexArrays.load(tmp_path / INDEX_FILE)
    assert back.meta == json.loads(json.dumps(index.meta))
    assert set(back.arrays) == set(index.arrays)
    for k, v in index.arrays.items():
        assert np.array_equal(back.arrays[k], v, equal_nan=v.dtype.kind == "f"), k
    # an index written before the metadata (features under their bare names, no task_type
    # tables) still loads: the catalogue answers for every task_type
    old = {k: v for k, v in index.arrays.items() if not k.startswith(("tt", "feat:"))}
    old.update({n: index.arrays[f"feat:{n}"] for n in UNIFIED_ITEM_FEATURES if n != RELIABILITY})
    with (tmp_path / "old.npz").open("wb") as f:
        np.savez(f, **old)
    idx = RetrievalIndex.load(tmp_path / "old.npz")
    assert idx.features(np.array([1]), task_type="notifications")["advertiser_id"].tolist() == [7]
    (tmp_path / "junk.npz").write_text("not an index")
    with pytest.raises(RetrievalError, match="junk.npz cannot be read"):
        IndexArrays.load(tmp_path / "junk.npz")


def test_grouping_matches_a_plain_count():
    """Neighbour / token lists: per key, values by summed weight desc (ties: smaller value
    first), at most ``top``; checked against a dict count on random pairs."""
    from collections import Counter

    from model.retrieval_index import _csr

    rng = np.random.default_rng(1)
    keys, values = rng.integers(0, 20, 3000), rng.integers(0, 60, 3000)
    weights = rng.integers(1, 4, 3000).astype(float)
    ukeys, indptr, items, w = _csr(keys, values, weights, top=5)
    count: Counter = Counter()
    for k, v, x in zip(keys.tolist(), values.tolist(), weights.tolist(), strict=True):
        count[k, v] += x
    assert ukeys.tolist() == sorted(set(keys.tolist()))
    for i, k in enumerate(ukeys.tolist()):
        want = sorted(((-c, v) for (kk, v), c in count.items() if kk == k))[:5]
        got = list(
            zip(
                (-w[indptr[i] : indptr[i + 1]]).tolist(),
                items[indptr[i] : indptr[i + 1]].tolist(),
                strict=True,
            )
        )
        assert got == [(float(c), v) for c, v in want]
