"""The served path takes candidate features from the retrieval index per task_type: an ad
item whose newest training row came from another use-case (advertiser 0 there) is still scored
by the ads use-case with the advertiser and campaign of its ads rows, and by notifications with
what notifications rows carried. Real FastAPI app + IngressCore + in-process ranker, no Ray."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pyarrow as pa
import pytest

from model.retrieval_index import INDEX_FILE, build_index
from serve_apps.api import build_api
from serve_apps.deploy_config import load_use_cases
from serve_apps.ingress import IngressCore
from serve_apps.ranker import InProcessRanker, ModelScorer
from serve_apps.settings import AppSettings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def rows() -> pa.Table:
    """Item 10 is an ad (advertiser 7, campaign 70 on its ads rows); its newest row is a
    notifications row with advertiser 0. Item 11 is organic."""
    return pa.table(
        {
            "task_type": ["ads", "notifications", "notifications", "ads"],
            "event_time": pa.array([10, 20, 15, 5], pa.timestamp("s", tz="UTC")),
            "item_id": [10, 10, 11, 11],
            "category_id": [3, 3, 4, 4],
            "advertiser_id": [7, 0, 0, 0],
            "campaign_id": [70, 0, 0, 0],
            "price": [9.0, 9.0, 2.0, 2.0],
            "click": [1.0, 1.0, 0.0, 1.0],
        }
    )


def client(model_dir: Path, cfg, name: str) -> TestClient:
    conf = cfg.model_dump(mode="json")
    conf["use_cases"] = [
        uc.model_dump(mode="json") for uc in load_use_cases(REPO / "configs/use_cases")
    ]
    s = AppSettings.from_args(
        {"use_case": name, "model_uri": str(model_dir), "config": conf, "request_timeout_s": 30}
    )
    return TestClient(build_api(IngressCore(s, InProcessRanker(ModelScorer(s)))))


def test_each_use_case_scores_candidates_with_its_own_training_features(exported, tmp_path):
    src, cfg = exported
    model_dir = Path(shutil.copytree(src, tmp_path / "model"))
    build_index(rows(), model_dir / INDEX_FILE)
    body = json.dumps({"user_id": 1, "candidates": [{"item_id": 10}, {"item_id": 11}]})
    got = {}
    for name in ("ads", "notifications"):
        with client(model_dir, cfg, name) as c:
            r = c.post("/rank", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        got[name] = {i["item_id"]: i["advertiser_id"] for i in r.json()["items"]}
    assert got["ads"] == {10: 7, 11: 0}  # the ads rows' advertiser, not the newest row's 0
    assert got["notifications"] == {10: 0, 11: 0}  # what notifications rows carried
