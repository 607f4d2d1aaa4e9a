"""No training/serving skew: for logged rows of seen items and users, the serving path
(retrieval-index catalogue + user-profile table + rows.to_columns + the ranker's batched,
encoded scoring) gives the scores the predictor gives on the logged rows themselves.

Two worlds: the serving fixtures' bootstrap rows (tests/serve_apps/conftest.py) and logs
from the synthetic generator (every use-case; category-browse rows log the browsed category).
Each model is an untrained export (random weights, so every input column moves the scores;
the checks that placeholders move them prove it); its catalogue and profile table are built
from its training rows, and newer rows of seen items and users are the test split. A request
sends only what a client knows (item id, context, query, source item, browsed category);
serve_apps.request_features fills the rest, as the ingress does.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from model.id_lists import IdLists
from model.retrieval_index import INDEX_FILE, IndexArrays, IndexColumns, build_index
from model.user_profiles import PROFILE_FILE, ProfileColumns, UserProfiles, build_profiles
from serve_apps.bootstrap import export_untrained, sample_rows
from serve_apps.deploy_config import load_use_cases
from serve_apps.feature_store import Events
from serve_apps.ingress import load_index
from serve_apps.ranker import ModelScorer
from serve_apps.request_features import (
    candidate_features,
    catalogue_features,
    load_profiles,
    user_profile,
)
from serve_apps.retrieval import RetrievalIndex
from serve_apps.rows import RankInput
from serve_apps.schemas import Candidate, Context, RankRequest, UserProfile
from tests.serve_apps.ingress_helpers import REPO, make_apps, post, settings

pytestmark = pytest.mark.unit

CONTENT = ["brand_id", "price_tier", "release_year_bucket", "title_tokens", "item_categories"]
PROFILE = ["region", "age_band", "declared_interests"]


USE_CASES = {uc.name: uc for uc in load_use_cases(REPO / "configs" / "use_cases")}


def request_of(row: dict) -> RankRequest:
    """What a client sends for a logged row: the item id, the context, and the request-level
    fields of its use-case (browsed category, source item, query)."""
    browse = row["task_type"] == "category"
    return RankRequest(
        user_id=row["user_id"],
        candidates=[Candidate(item_id=row["item_id"])],
        category_id=row["category_id"] if browse else None,
        source_item_id=row["source_item_id"] or None,
        query_tokens=row["query_tokens"] or None,
        context=Context(device=row["device"], hour=row["hour"], surface=row["surface"]),
    )


def served_inputs(s, test: pa.Table, blank: tuple[str, ...] = ()) -> list[RankInput]:
    """One RankInput per logged row, its features filled as the ingress fills them
    (serve_apps.request_features); ``blank`` columns are dropped (what serving sent before:
    the model then gets their placeholders)."""
    index, profiles = load_index(s), load_profiles(s)
    out = []
    for row in test.to_pylist():
        req = request_of(row)
        uc = USE_CASES[row["task_type"]]
        ids = np.asarray([row["item_id"]], np.int64)
        feats, lists = candidate_features(index, uc, req, ids)
        profile, profile_lists = user_profile(profiles, req.user_id, None, req.profile)
        feats.pop("popularity")
        for d in (feats, lists, profile, profile_lists):
            for c in blank:
                d.pop(c, None)
        out.append(
            RankInput(
                task_type=uc.name,
                now=int(row["event_time"].timestamp()),  # the row's time: the events' age
                user_id=req.user_id,
                candidates=feats,
                events=Events(
                    np.asarray(row["seq_item_ids"], np.int64),
                    np.asarray(row["seq_event_types"], np.int64),
                    np.asarray(row["seq_timestamps"], np.int64),
                ),
                source_item_id=req.source_item_id or 0,
                query_tokens=np.asarray(req.query_tokens or [], np.int64),
                device=req.context.device,
                hour=req.context.hour,
                surface=req.context.surface,
                candidate_lists=lists,
                profile=profile,
                profile_lists=profile_lists,
            )
        )
    return out


def max_skew(scorer: ModelScorer, s, test: pa.Table, blank: tuple[str, ...] = ()) -> float:
    """Largest |served - logged| probability over every task and row."""
    logged = scorer.predictor.predict(test)  # {task: (n,)} the training-side feature path
    served = scorer.score(served_inputs(s, test, blank))  # one batched call, encoded users
    return max(
        float(np.max(np.abs(np.concatenate([o[t] for o in served]) - logged[t]))) for t in logged
    )


def seen(s, test: pa.Table) -> pa.Table:
    """The rows whose item was in its use-case's training rows and whose user was known."""
    index, profiles = load_index(s), load_profiles(s)
    tt, item = test["task_type"].to_pylist(), test["item_id"].to_numpy()
    ok = [
        bool(index.known(item[i : i + 1], t)[0]) and profiles.position(u) >= 0
        for i, (t, u) in enumerate(zip(tt, test["user_id"].to_pylist(), strict=True))
    ]
    return test.filter(pa.array(ok))


@pytest.fixture(scope="module")
def scorer_and_test(exported):
    model_dir, cfg = exported
    s = settings(model_dir, cfg, "ads")
    # rows the model was not fitted on, from the same items and users
    test = sample_rows(300, seed=99)  # the five use-cases of configs/use_cases
    return s, ModelScorer(s), seen(s, test)


def test_served_scores_equal_the_scores_of_the_logged_rows(scorer_and_test):
    s, scorer, test = scorer_and_test
    assert test.num_rows > 200  # nearly every test row's item and user were seen
    diff = max_skew(scorer, s, test)
    print(f"skew (bootstrap rows): max |served - logged| over {test.num_rows} rows: {diff:.2e}")
    assert diff < 1e-5
    # The check can fail: without the catalogue's content and the profile table (what
    # serving sent before), the same rows score differently.
    assert max_skew(scorer, s, test, blank=(*CONTENT, *PROFILE)) > 1e-3
    few = test.slice(0, 30)  # and each column alone does
    assert min(max_skew(scorer, s, few, blank=(c,)) for c in (*CONTENT, *PROFILE)) > 0


@pytest.fixture(scope="module")
def generated(serving_cfg, tmp_path_factory):
    """Generated logs (model.synthetic, in process): the older 75% fit an (untrained)
    export and build its catalogue and profile table, the newest 25% are the test split."""
    from model.synthetic import World, generate_chunk, num_chunks

    make_cfg, _ = serving_cfg
    cfg = make_cfg(
        "generate.num_impressions=6000",
        "generate.rows_per_chunk=3000",
        "generate.num_users=200",
        "generate.num_items=600",
        "generate.days=7",
    )
    world = World.build(cfg.generate)
    chunks = range(num_chunks(cfg.generate))
    logs = pa.concat_tables([generate_chunk(world, c)["impressions"] for c in chunks])
    logs = logs.sort_by("event_time")
    cut = int(logs.num_rows * 0.75)
    train, test = logs.slice(0, cut), logs.slice(cut)
    model_dir = export_untrained(tmp_path_factory.mktemp("generated") / "model", cfg, train)
    build_index(train, model_dir / INDEX_FILE, IndexColumns.from_config(cfg.dataset))
    build_profiles(train, model_dir / PROFILE_FILE, ProfileColumns.from_config(cfg.dataset))
    s = settings(model_dir, cfg, "ads")
    return s, ModelScorer(s), test


def test_no_skew_on_a_catalogue_built_from_generated_logs(generated):
    """Every use-case of the generator, the category browse one included (its rows log the
    browsed category, not the item's), scores as its logged rows."""
    s, scorer, test = generated
    rows = seen(s, test)
    assert rows.num_rows > 0.5 * test.num_rows
    rows = rows.take(np.arange(0, rows.num_rows, 4))  # every 4th row: enough, and fast
    assert set(rows["task_type"].to_pylist()) == set(USE_CASES)
    diff = max_skew(scorer, s, rows)
    print(f"skew (generated logs): max |served - logged| over {rows.num_rows} rows: {diff:.2e}")
    assert diff < 1e-5
    assert max_skew(scorer, s, rows, blank=(*CONTENT, *PROFILE)) > 1e-3


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
