"""The documented cluster route: `ray start --head`, then `ray job submit --working-dir . --
python -m ray_jobs.train ...` (docs/training.md), against a second local head on 127.0.0.1.

The session cluster (ray.init) keeps running meanwhile, so this head gets its own free ports
and temp dir; it is stopped by ending exactly its own processes (``ray stop`` would end every
Ray on the machine). Ray 2.60 clients need RAY_AUTH_MODE=token (the token is ~/.ray/auth_token).
"""

import uuid

import pytest
from mlflow.tracking import MlflowClient

from model.config import load_config
from tests.ray_jobs.local_cluster import REPO, local_cluster

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ray_head():
    """A `ray start --head` cluster on 127.0.0.1 with its own ports and temp dir."""
    with local_cluster() as cluster:
        yield cluster


def test_ray_job_submit_trains_to_succeeded(ray_head, smoke_data, mlflow_server, train_args):
    run_name = f"submitted-{uuid.uuid4().hex[:6]}"
    overrides = train_args(
        smoke_data, run_name, mlflow_server, "train.epochs=1", "train.max_steps_per_epoch=4"
    )
    logs = ray_head.run_job("train", ["ray_jobs.train", "configs/smoke.yaml", *overrides])
    assert "epoch 1/1" in logs and '"train":' in logs
    assert (smoke_data / "runs" / run_name / "epoch_0001" / "state.json").is_file()
    # the submitted job tracked into the same MLflow server (rank 0 from the cluster's worker)
    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides)
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "val/objective" in runs[0].data.metrics


def test_ray_job_submit_runs_a_search_and_registers_its_winner(
    ray_head, smoke_data, mlflow_server, train_args
):
    name = f"submitted-search-{uuid.uuid4().hex[:6]}"
    overrides = [
        o
        for o in train_args(smoke_data, "unused", mlflow_server)
        if not o.startswith(("train.run_name=", "train.storage_path="))
    ] + [
        f"mlflow.registered_model=unirank-{name}",
        f"tune.storage_path={smoke_data}/tune",
        f"tune.name={name}",
        "tune.search_alg=grid",
        "tune.num_samples=1",
        "tune.space={model.fusion: {grid: [gating]}}",
        "train.epochs=1",
        "train.max_steps_per_epoch=4",
    ]
    logs = ray_head.run_job(
        "search", ["tuning.search", "configs/tune_smoke.yaml", *overrides], timeout=420
    )
    assert f"search {name}: 1 trial (" in logs, logs[-3000:]
    assert "first version" in logs or "promoted to champion" in logs
    results = smoke_data / "tune" / name / "results" / "trials.csv"
    assert results.is_file() and len(results.read_text().splitlines()) == 2
    client = MlflowClient(mlflow_server)
    mv = client.get_model_version_by_alias(f"unirank-{name}", "champion")
    assert mv.version == "1" and name in mv.tags["run_name"]
