"""ray_jobs.flush_log against a real Redis and the moto S3 server: every stream entry lands in
parquet exactly once (a flush that dies before deleting is repeated without duplicates for
readers), unreadable entries are kept, and the stream is emptied only of what was written."""

from __future__ import annotations

import json

import pytest

from model.exposure_log import RECORD_FIELD, Exposure, Outcome, encode, stream_key
from ray_jobs import flush_log
from serve_apps.experiments import read_log

pytestmark = pytest.mark.integration


def fill(client, use_case: str, n: int) -> None:
    client.delete(stream_key(use_case))
    for i in range(n):
        e = Exposure(f"r{i}", 1.7e9 + i, use_case, i % 7, "v1", [1, 2, 3], [0.3, 0.2, 0.1])
        client.xadd(stream_key(use_case), {RECORD_FIELD: encode(e)})
        o = Outcome(f"r{i}", 1.7e9 + i + 5, use_case, i % 7, 2, 1)
        client.xadd(stream_key(use_case), {RECORD_FIELD: encode(o)})
    bad = {**json.loads(encode(e)), "user_id": -3}  # a writer bug: a negative user id
    client.xadd(stream_key(use_case), {RECORD_FIELD: json.dumps(bad)})


@pytest.mark.parametrize("where", ["local", "s3"])
def test_flush_writes_everything_once_and_keeps_bad_entries(
    where, redis_url, tmp_path, s3_bucket, capsys
):
    import redis

    client = redis.Redis.from_url(redis_url)
    fill(client, "flushtest", 25)
    bucket, storage = s3_bucket
    root = str(tmp_path / "log") if where == "local" else f"s3://{bucket}/log"
    argv = [f"serve.redis_url={redis_url}", f"serve.exposure_log_output={root}", *storage]

    # a flush that dies after writing its first batch, before deleting it
    real_xdel = client.xdel

    def dying_xdel(*a):
        raise ConnectionError("killed between write and delete")

    client.xdel = dying_xdel
    with pytest.raises(ConnectionError):
        flush_log.flush_use_case(client, _cfg(argv), "flushtest", batch=20)
    client.xdel = real_xdel
    assert client.xlen(stream_key("flushtest")) == 51  # written but not deleted: all still there

    assert flush_log.main([*argv, "--batch", "20"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["flushed"]["flushtest"] == {"exposures": 25, "outcomes": 25, "bad": 1}
    assert client.xlen(stream_key("flushtest")) == 0
    exposures, outcomes = read_log(root, "flushtest", _cfg(argv).storage)
    # the first batch was written twice (before and after the crash): read once
    assert exposures.num_rows == 25 and outcomes.num_rows == 25
    assert sorted(exposures.column("request_id").to_pylist()) == sorted(f"r{i}" for i in range(25))
    assert exposures.column("items").to_pylist()[0] == [1, 2, 3]
    if where == "local":  # the unreadable entry is kept with its reason, not dropped
        (bad,) = (tmp_path / "log" / "flushtest" / "bad").glob("*.jsonl")
        assert "user_id" in json.loads(bad.read_text())["error"]


def _cfg(argv):
    from model.config import load_config

    return load_config(None, argv)
