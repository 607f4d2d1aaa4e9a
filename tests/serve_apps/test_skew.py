"""No training/serving skew: for logged rows of seen items and users, the serving path
(retrieval-index catalogue + user-profile table + rows.to_columns + the ranker's batched,
encoded scoring) gives the scores the predictor gives on the logged rows themselves.

The model is the session's untrained export (tests/serve_apps/conftest.py: random weights,
so every input column moves the scores; the check that placeholders move them proves it).
Its catalogue and profile table are built from its training rows; the "test split" is newer
rows drawn from the same catalogue and users. A request sends only what a client knows (item
ids, context, the query, the source item); the ingress fills the rest.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from model.id_lists import IdLists
from model.retrieval_index import INDEX_FILE, IndexArrays, IndexColumns, build_index
from model.user_profiles import PROFILE_FILE, ProfileColumns, UserProfiles, build_profiles
from serve_apps.bootstrap import export_untrained, sample_rows
from serve_apps.feature_store import Events
from serve_apps.ingress import catalogue_features, load_index, load_profiles, user_profile
from serve_apps.ranker import ModelScorer
from serve_apps.retrieval import RetrievalIndex
from serve_apps.rows import RankInput
from serve_apps.schemas import UserProfile
from tests.serve_apps.ingress_helpers import make_apps, post, settings

pytestmark = pytest.mark.unit
CONTENT = ["brand_id", "price_tier", "release_year_bucket", "title_tokens", "item_categories"]
PROFILE = ["region", "age_band", "declared_interests"]


def served_inputs(s, test: pa.Table, blank: tuple[str, ...] = ()) -> list[RankInput]:
    """One RankInput per logged row, built the way the ingress builds it; ``blank`` columns
    are dropped (the skew this change removes: the model gets their placeholders)."""
    index, profiles = load_index(s), load_profiles(s)
    col = {c: test[c].to_pylist() for c in test.column_names}
    out = []
    for i in range(test.num_rows):
        ids = np.asarray([col["item_id"][i]], np.int64)
        feats, lists = catalogue_features(index, ids, col["task_type"][i])
        profile, profile_lists = user_profile(profiles, col["user_id"][i])
        feats.pop("popularity")
        for d in (feats, lists, profile, profile_lists):
            for c in blank:
                d.pop(c, None)
        now = int(col["event_time"][i].timestamp())
        events = Events(
            np.asarray(col["seq_item_ids"][i], np.int64),
            np.asarray(col["seq_event_types"][i], np.int64),
            np.asarray(col["seq_timestamps"][i], np.int64),
        )
        out.append(
            RankInput(
                task_type=col["task_type"][i],
                now=now,
                user_id=col["user_id"][i],
                candidates=feats,
                candidate_lists=lists,
                profile=profile,
                profile_lists=profile_lists,
                events=events,
                source_item_id=col["source_item_id"][i],
                query_tokens=np.asarray(col["query_tokens"][i], np.int64),
                device=col["device"][i],
                hour=col["hour"][i],
                surface=col["surface"][i],
            )
        )
    return out


@pytest.fixture(scope="module")
def scorer_and_test(exported):
    model_dir, cfg = exported
    s = settings(model_dir, cfg, "ads")
    scorer = ModelScorer(s)
    # rows the model was not fitted on, from the same items and users
    test = sample_rows(300, seed=99, task_types=tuple(cfg.dataset.task_types))
    index, profiles = load_index(s), load_profiles(s)
    seen = (index.positions(test["item_id"].to_numpy()) >= 0) & np.array(
        [profiles.position(u) >= 0 for u in test["user_id"].to_pylist()]
    )
    return s, scorer, test.filter(pa.array(seen))


def test_served_scores_equal_the_scores_of_the_logged_rows(scorer_and_test):
    s, scorer, test = scorer_and_test
    assert test.num_rows > 200  # nearly every test row's item and user were seen
    logged = scorer.predictor.predict(test)  # {task: (n,)} the training-side feature path
    served = scorer.score(served_inputs(s, test))  # one input per row, one batched call
    diff = max(
        float(np.max(np.abs(np.concatenate([o[t] for o in served]) - logged[t]))) for t in logged
    )
    print(f"skew: max |served - logged| probability over {test.num_rows} rows: {diff:.2e}")
    assert diff < 1e-5
    # The check can fail: without the catalogue's content and the profile table (what
    # serving sent before), the same rows score differently.
    blank = scorer.score(served_inputs(s, test, blank=(*CONTENT, *PROFILE)))
    moved = np.abs(np.concatenate([o["click"] for o in blank]) - logged["click"])
    assert moved.max() > 1e-3


def test_unknown_items_and_users_get_the_placeholders_of_training(scorer_and_test):
    s, _, _ = scorer_and_test
    feats, lists = catalogue_features(load_index(s), np.asarray([10**15], np.int64), "ads")
    assert all(feats[c][0] == 0 for c in CONTENT[:3])
    assert all(len(lists[c].row(0)) == 0 for c in CONTENT[3:])
    scalars, plists = user_profile(load_profiles(s), 10**15)
    assert scalars == {"region": 0, "age_band": 0}
    assert len(plists["declared_interests"]) == 0
    # field by field: the table < the online profile < the request's profile
    table, table_lists = load_profiles(s).lookup(1)
    scalars, plists = user_profile(load_profiles(s), 1, {"region": 9}, UserProfile(age_band=3))
    assert scalars == {"region": 9, "age_band": 3} != table
    assert plists["declared_interests"].tolist() == table_lists["declared_interests"].tolist()


def test_request_content_and_profile_reach_the_model(apps):
    """Fields a request sends change the scores; a value past the model's vocabulary is its
    placeholder (the same score as 0), exactly as in training."""
    base = {"user_id": 3, "candidates": [{"item_id": 5}, {"item_id": 6}], "context": {"hour": 1}}

    def scores(**extra) -> list[float]:
        body = {**base, **extra}
        r = post(apps, "notifications", body)
        assert r.status_code == 200, r.text
        return [i["score"] for i in sorted(r.json()["items"], key=lambda i: i["item_id"])]

    plain = scores()
    titled = scores(candidates=[{"item_id": 5, "title_tokens": [1, 2, 3]}, {"item_id": 6}])
    assert titled[0] != plain[0] and titled[1] == plain[1]
    assert scores(profile={"declared_interests": [4, 5]}) != plain
    top = 2**63 - 1  # price_tier / age_band have vocab_size 16: placeholder 0
    tier = lambda v: [{"item_id": 5, "price_tier": v}, {"item_id": 6, "price_tier": v}]  # noqa: E731
    assert scores(candidates=tier(top)) == scores(candidates=tier(0))
    assert scores(profile={"age_band": top}) == scores(profile={"age_band": 0})


def test_an_online_profile_update_reaches_the_model_and_busts_the_cache(apps):
    """POST /profile stores fields in the feature store; the next ranking uses them (not
    the cached answer), and the request's own ``profile`` still wins."""
    body = {"user_id": 4, "candidates": [{"item_id": 5}, {"item_id": 6}], "context": {"hour": 2}}
    before = post(apps, "notifications", body).json()
    r = post(
        apps, "notifications", {"user_id": 4, "profile": {"declared_interests": [7, 8]}}, "/profile"
    )
    assert r.status_code == 200 and r.json()["profile"] == {"declared_interests": [7, 8]}, r.text
    after = post(apps, "notifications", body).json()
    assert not after["cached"] and after["items"] != before["items"]
    again = post(apps, "notifications", {**body, "profile": {"declared_interests": [7, 8]}})
    assert [i["score"] for i in again.json()["items"]] == [i["score"] for i in after["items"]]
    bad = post(apps, "notifications", {"user_id": 4, "profile": {"age_band": -2}}, "/profile")
    assert bad.status_code == 422 and "profile.age_band" in [
        f["field"] for f in bad.json()["fields"]
    ]


@pytest.fixture(scope="module")
def apps(exported):
    out = make_apps(*exported, ("notifications",))
    yield out
    for _, client in out.values():
        client.close()


def test_content_lists_and_profiles_round_trip_through_their_files(tmp_path, rows):
    index = build_index(rows, tmp_path / INDEX_FILE)
    again = IndexArrays.load(tmp_path / INDEX_FILE)
    assert again.list_names == ["title_tokens", "item_categories"] == index.list_names
    for name in again.list_names:
        a, b = index.item_lists(name), again.item_lists(name)
        assert np.array_equal(a.offsets, b.offsets) and np.array_equal(a.values, b.values)
    # each item's stored list is the one its rows logged
    served = RetrievalIndex.load(tmp_path / INDEX_FILE)
    item = rows["item_id"].to_numpy()
    got = served.lists(item[:50])
    for name in ("title_tokens", "item_categories"):
        assert [r.tolist() for r in got[name].rows()] == rows[name].to_pylist()[:50]
    for c in ("brand_id", "price_tier", "release_year_bucket"):
        assert np.array_equal(served.features(item[:50])[c], rows[c].to_numpy()[:50])

    profiles = build_profiles(rows, tmp_path / PROFILE_FILE)
    loaded = UserProfiles.load(tmp_path / PROFILE_FILE)
    assert np.array_equal(loaded.users, profiles.users) and len(loaded) == 50
    user = rows["user_id"].to_pylist()
    for i in range(0, 200, 7):
        scalars, lists = loaded.lookup(user[i])
        assert scalars == {
            "region": rows["region"][i].as_py(),
            "age_band": rows["age_band"][i].as_py(),
        }
        assert lists["declared_interests"].tolist() == rows["declared_interests"][i].as_py()


def test_newest_non_empty_list_wins(tmp_path):
    t = pa.table(
        {
            "item_id": [1, 1, 1, 2],
            "event_time": pa.array([1, 3, 2, 1], pa.timestamp("s", tz="UTC")),
            "title_tokens": [[5, 6], [], [7], None],
        }
    )
    idx = build_index(t, None, IndexColumns(features=(), lists=("title_tokens",)))
    lists = idx.item_lists("title_tokens")
    assert [r.tolist() for r in lists.rows()] == [[7], []]  # newest logged list; none for 2
    assert isinstance(lists, IdLists)


def test_a_byo_dataset_without_content_builds_an_index_and_serves(serving_cfg, tmp_path):
    """A bring-your-own dataset whose spec and parquet have no content or profile columns
    exports an index without lists, no profile table, and serves."""
    make_cfg, _ = serving_cfg
    spec = (
        "[{name: user_id, hash_buckets: 1000}, {name: item_id, hash_buckets: 1000},"
        " {name: category_id, vocab_size: 32}, {name: hour, vocab_size: 24}]"
    )
    cfg = make_cfg(
        f"dataset.features.categorical={spec}",
        "dataset.features.numeric=[]",
        "dataset.features.sequence=null",
    )
    n = 60
    bare = pa.table(
        {
            "task_type": ["notifications"] * n,
            "event_time": pa.array(np.arange(n) * 60, pa.timestamp("s", tz="UTC")),
            "user_id": np.arange(n) % 7 + 1,
            "item_id": np.arange(n) % 11 + 1,
            "category_id": np.arange(n) % 3 + 1,
            "hour": np.arange(n) % 24,
            **{t.column: (np.arange(n) % 2).astype(np.float32) for t in cfg.dataset.tasks},
        }
    )
    model_dir = export_untrained(tmp_path / "model", cfg, bare)
    index = build_index(bare, model_dir / INDEX_FILE, IndexColumns.from_config(cfg.dataset))
    assert index.list_names == [] and "brand_id" in index.meta["skipped"]
    assert ProfileColumns.from_config(cfg.dataset) == ProfileColumns(
        features=(), lists=(), time="event_time"
    )  # nothing to keep: ray_jobs.export writes no profile table (test_export_index)
    s = settings(model_dir, cfg, "notifications")
    assert load_profiles(s) is None
    apps = make_apps(model_dir, cfg, ("notifications",))
    r = post(apps, "notifications", {"user_id": 1, "candidates": [{"item_id": 5}, {"item_id": 99}]})
    assert r.status_code == 200 and r.json()["fallback"] is None, r.text
    assert {i["item_id"] for i in r.json()["items"]} == {5, 99}
    apps["notifications"][1].close()
