"""ray_jobs.export.add_retrieval_index without Ray or MLflow: the index columns come from the
config, so a foreign-shaped parquet (string ids, no task_type, no sequence) exports an index
of what it has, and one without the item column gets a named skip, never a crash."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.config import CategoricalFeature, load_config
from model.export import MANIFEST_FILE
from model.hashing import string_ids
from model.user_profiles import PROFILE_FILE, UserProfiles
from ray_jobs.export import add_retrieval_index, add_user_profiles
from serve_apps.retrieval import INDEX_FILE, RetrievalIndex

pytestmark = pytest.mark.unit

BYO = Path(__file__).resolve().parents[2] / "configs" / "byo_example.yaml"
FOREIGN = ["dataset.features.task_type_column=null", "dataset.features.sequence=null"]


def setup(tmp_path, table: pa.Table, *overrides: str):
    (tmp_path / "train").mkdir()
    pq.write_table(table, tmp_path / "train" / "part-0.parquet")
    serving = tmp_path / "serving"
    serving.mkdir()
    (serving / MANIFEST_FILE).write_text(json.dumps({"files": ["model.pt"]}))
    cfg = load_config(BYO, [f"dataset.train=[{tmp_path / 'train'}]", *FOREIGN, *overrides])
    return serving, cfg


def test_foreign_parquet_exports_an_index_of_what_it_has(tmp_path):
    table = pa.table(
        {
            "user_id": ["a1f", "b2e", "a1f", "c3d"],
            "item_id": ["tt01", "tt02", "tt01", "tt03"],
            "category_id": [2, 5, 2, 5],
            "hour": [1, 2, 3, 4],
            "click": [1.0, 0.0, 1.0, 0.0],
            "engage": [0.0, 1.0, 1.0, 0.0],
        }
    )
    serving, cfg = setup(tmp_path, table)
    info = add_retrieval_index(serving, cfg)
    assert info["file"] == INDEX_FILE and info["items"] == 3
    assert info["features"] == ["category_id"] and info["task_types"] == []
    assert {"advertiser_id", "query_tokens", "per_task_type_features"} <= set(info["skipped"])
    manifest = json.loads((serving / MANIFEST_FILE).read_text())
    assert manifest["files"] == ["model.pt", INDEX_FILE] and manifest["retrieval_index"] == info
    idx = RetrievalIndex.load(serving / INDEX_FILE)
    ids = string_ids(pa.array(["tt01", "tt02", "tt03"]))
    assert idx.popular(1).tolist() == [ids[0]]
    assert idx.features(ids, task_type="notifications")["category_id"].tolist() == [2, 5, 5]
    assert np.array_equal(np.sort(idx.popular_in_category(5, 10)), np.sort(ids[1:]))


def test_no_item_column_is_a_named_skip(tmp_path):
    serving, cfg = setup(
        tmp_path,
        pa.table({"user_id": [1, 2], "click": [1.0, 0.0]}),
        "dataset.catalogue.item_column=movie_id",
    )
    info = add_retrieval_index(serving, cfg)
    assert info["file"] is None and info["items"] == 0
    assert "no item column 'movie_id' (dataset.catalogue.item_column)" in info["skipped"]
    assert not (serving / INDEX_FILE).exists()
    assert json.loads((serving / MANIFEST_FILE).read_text()) == {"files": ["model.pt"]}


def test_profiles_are_exported_when_the_data_has_them(tmp_path):
    """Each user's newest row's profile goes into user_profiles.npz, listed in the manifest;
    data without profile columns the model reads gets no table."""
    table = pa.table(
        {
            "user_id": [1, 2, 1],
            "item_id": [10, 11, 12],
            "event_time": pa.array([5, 6, 9], pa.timestamp("s", tz="UTC")),
            "region": [3, 4, 7],
            "age_band": [2, 2, 2],
            "declared_interests": [[1], [], [5, 6]],
            "click": [1.0, 0.0, 1.0],
        }
    )
    serving, cfg = setup(tmp_path, table)
    assert add_user_profiles(serving, cfg)["file"] is None  # the BYO spec reads no profile
    spec = cfg.dataset.features.categorical + [
        CategoricalFeature(name="region", hash_buckets=100),
        CategoricalFeature(name="age_band", vocab_size=16),
        CategoricalFeature(name="declared_interests", share_with="category_id", multi=True),
    ]
    cfg.dataset.features = cfg.dataset.features.model_copy(update={"categorical": spec})
    info = add_user_profiles(serving, cfg)
    assert info["file"] == PROFILE_FILE and info["users"] == 2
    assert info["features"] == ["region", "age_band"] and info["lists"] == ["declared_interests"]
    assert json.loads((serving / MANIFEST_FILE).read_text())["files"] == ["model.pt", PROFILE_FILE]
    profiles = UserProfiles.load(serving / PROFILE_FILE)
    scalars, lists = profiles.lookup(1)  # the newest row (t=9)
    assert scalars == {"region": 7, "age_band": 2} and lists["declared_interests"].tolist() == [
        5,
        6,
    ]
    assert profiles.lookup(99)[0] == {"region": 0, "age_band": 0}  # unknown: placeholders
