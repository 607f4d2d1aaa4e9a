"""ray_jobs.user_embeddings on the session Ray cluster and a real Redis: only active users,
each user's latest sequence, encodings equal to the exported model's ``encode``, the same rows
in Redis and in parquet, and errors naming the field."""

import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import redis

from model.config import ConfigError, load_config
from model.export import load_predictor
from ray_jobs import user_embeddings
from serve_apps.bootstrap import T0, export_untrained, sample_rows, write_rows
from serve_apps.feature_store import encoding_from

pytestmark = pytest.mark.integration
TINY = ["model.embedding_dim=8", "model.bottom_dims=[16]", "model.tower_dims=[8]"]
DAY = 86400


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An untrained export and 600 impressions of 40 users over a week from T0."""
    root = tmp_path_factory.mktemp("user_embeddings")
    cfg = load_config(None, [*TINY, "dataset.features.sequence.max_len=8"])
    rows = sample_rows(600, seed=3, num_users=40)
    model = export_untrained(root / "model", cfg, rows)
    write_rows(rows, root / "prepared", rows_per_file=150)  # 4 files: several blocks
    return root, model, rows


def expected_latest(rows: pa.Table, since_s: int, until_s: int) -> dict[int, dict]:
    """Per user active in [since, until]: the row of their latest impression (plain Python)."""
    best: dict[int, dict] = {}
    for r in rows.to_pylist():
        t = int(r["event_time"].timestamp())
        if since_s <= t <= until_s and (r["user_id"] not in best or t > best[r["user_id"]]["t"]):
            best[r["user_id"]] = {**r, "t": t}
    return {u: r for u, r in best.items() if r["seq_item_ids"]}


def test_job_encodes_active_users_into_redis_and_parquet(ray_cluster, data, redis_url):
    root, model, rows = data
    as_of, lookback = T0 + 6 * DAY, 2 * DAY
    prefix_check = redis.Redis.from_url(redis_url)
    cfg = load_config(
        None,
        [
            *TINY,
            f"user_embeddings.input=[{root}/prepared]",
            f"user_embeddings.output={root}/out",
            f"user_embeddings.model_uri={model}",
            f"user_embeddings.as_of={as_of}",
            f"user_embeddings.lookback_s={lookback}",
            "user_embeddings.batch_size=7",
            "serve.feature_store=redis",
            f"serve.redis_url={redis_url}",
        ],
    )
    result = user_embeddings.run(cfg)
    want = expected_latest(rows, as_of - lookback, as_of)
    assert 5 <= len(want) < 40  # the window leaves some users out
    assert result["users"] == len(want) and result["redis"] == redis_url

    out = pq.read_table(root / "out")
    assert sorted(out["user_id"].to_pylist()) == sorted(want)
    assert pc.all(pc.equal(out["computed_at"], result["computed_at"])).as_py()

    p = load_predictor(model)
    users = sorted(want)
    seqs = {
        "event_time": np.full(len(users), int(result["computed_at"]), np.int64),
        "seq_item_ids": [want[u]["seq_item_ids"] for u in users],
        "seq_event_types": [want[u]["seq_event_types"] for u in users],
        "seq_timestamps": [want[u]["seq_timestamps"] for u in users],
    }
    h, mask = p.encode(seqs)
    by_user = {r["user_id"]: r for r in out.to_pylist()}
    for i, u in enumerate(users):
        stored = encoding_from(prefix_check.hgetall(f"unirank:enc:{u}"))
        ts = want[u]["seq_timestamps"][-8:]  # max_len newest events
        assert stored.model == p.digest == result["model"]
        assert stored.computed_at == pytest.approx(result["computed_at"])
        assert stored.last_event_ts == max(ts) and stored.event_ts.tolist() == ts
        np.testing.assert_allclose(stored.vector, h[i][mask[i]], rtol=0, atol=1e-6)
        row = by_user[u]
        assert (row["n_events"], row["dim"]) == (len(ts), 8)
        np.testing.assert_array_equal(np.reshape(row["vector"], (len(ts), 8)), stored.vector)
        assert 0 < prefix_check.ttl(f"unirank:enc:{u}") <= 7 * DAY
    inactive = set(rows["user_id"].to_pylist()) - set(want)
    assert inactive and not any(prefix_check.exists(f"unirank:enc:{u}") for u in inactive)


def test_job_errors_name_the_field(ray_cluster, data, tmp_path, capsys):
    root, model, _ = data
    with pytest.raises(ConfigError, match="user_embeddings.model_uri"):
        user_embeddings.run(load_config(None, [f"user_embeddings.input=[{root}/prepared]"]))
    missing = tmp_path / f"nothing-{uuid.uuid4().hex[:6]}"
    cfg = load_config(
        None, [f"user_embeddings.input=[{missing}]", f"user_embeddings.model_uri={model}"]
    )
    with pytest.raises(ConfigError, match=rf"user_embeddings.input: {missing}"):
        user_embeddings.run(cfg)
    with pytest.raises(SystemExit) as exc:
        user_embeddings.main(["user_embeddings.lookback_s=-1"])
    assert exc.value.code == 2 and "user_embeddings.lookback_s" in capsys.readouterr().err


def test_cli_prints_a_json_summary(ray_cluster, data, capsys):
    root, model, _ = data
    user_embeddings.main(
        [
            *TINY,
            f"user_embeddings.input=[{root}/prepared]",
            f"user_embeddings.output={root}/cli",
            f"user_embeddings.model_uri={model}",
            f"user_embeddings.as_of={T0 + 7 * DAY}",
        ]
    )
    line = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(line)["user_embeddings"]
    assert summary["redis"] is None and summary["users"] == pq.read_table(root / "cli").num_rows
    assert summary["users"] > 0
