"""Two Ray nodes on one machine, driven as the README's "Run on a Ray cluster" shows:
`ray start --head`, `ray start --address ... --resources`, then `ray job submit` of prepare ->
train (2 workers, one per node) -> export, with data, checkpoints and MLflow artifacts on the
moto S3 server and tracking on the MLflow server. The raw logs are the session's generated
smoke data (``smoke_data``), copied to S3.

Mid-training, once Ray Train has registered the first checkpoint (its checkpoint manager
snapshot is in storage), the worker node's raylet is killed, the rest of that node goes too (a
lost machine), and a replacement node joins: Ray Train
(``FailureConfig(max_failures=train.max_failures)``) starts a new worker group, which resumes
from that checkpoint and finishes the run. (A checkpoint uploaded but not yet registered, i.e.
not every rank had reported, is not resumed from: that epoch is trained again.)

One worker per node: each node offers one ``trainer`` resource and each worker asks for one.
"""

import json
import os
import signal
import time

import pyarrow.fs as pafs
import pytest
from mlflow.tracking import MlflowClient

from model.config import load_config
from model.storage import resolve
from tests.ray_jobs.local_cluster import local_cluster, node_pids, stop_node

pytestmark = pytest.mark.e2e
EPOCHS = 3
RUN = "multinode"
WORKER_NODE = {"trainer": 1, "node2": 1}  # node2: finds the worker node in the state API


def wait_for_file(fs: pafs.FileSystem, path: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fs.get_file_info(path).type == pafs.FileType.File:
            return
        time.sleep(0.3)
    raise TimeoutError(f"s3://{path} did not appear in {timeout} s")


def node_id(cluster, resource: str, other_than: str = "", timeout: float = 30) -> str:
    """The id of the alive node offering ``resource`` (a lost node may still count as alive
    for some seconds: ``other_than`` skips it)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = cluster.alive_nodes()
        found = [n["node_id"] for n in nodes
                 if resource in n["resources_total"] and n["node_id"] != other_than]  # fmt: skip
        if len(found) == 1 or time.monotonic() > deadline:
            assert len(found) == 1, nodes
            return found[0]
        time.sleep(1)


MODEL_PREFIX = "unirank-multinode"


def test_two_nodes_prepare_train_export_and_survive_a_lost_node(
    s3_bucket, mlflow_server, smoke_data, train_args
):
    bucket, storage = s3_bucket
    root = f"s3://{bucket}"
    args = [
        *train_args(
            root,
            RUN,
            mlflow_server,
            f"train.epochs={EPOCHS}",
            "train.patience=10",  # no early stop: the run must still be training when hit
            "train.num_workers=2",
            "train.resources_per_worker={CPU: 0.4, trainer: 1}",
        ),  # fmt: skip
        *storage,
        # its own registered model: other tests of the session register versions too
        f"mlflow.registered_model={MODEL_PREFIX}-{bucket}",
        f"prepare.input={root}/raw",
        f"prepare.output={root}/prepared",
    ]
    store = resolve(root, load_config(None, storage).storage)
    pafs.copy_files(str(smoke_data / "raw"), store.join("raw").path,
                    destination_filesystem=store.filesystem)  # fmt: skip
    t0, laps = time.monotonic(), {}  # seconds since start, printed: the test must stay short

    def lap(name: str) -> None:
        laps[name] = round(time.monotonic() - t0)

    with local_cluster(head_cpus=2, head_resources={"trainer": 1}) as cluster:
        node2 = cluster.start_node(False, 1, WORKER_NODE)
        head_id, lost_id = node_id(cluster, "node:__internal_head__"), node_id(cluster, "node2")
        lap("2 nodes up")
        cluster.run_job("prepare", ["ray_jobs.prepare", "configs/smoke.yaml", *args])
        lap("prepared")
        job = cluster.submit(
            "train", ["ray_jobs.train", "configs/smoke.yaml", *args],
            env_vars={"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"},  # the Train state API / tab
        )  # fmt: skip

        # once a checkpoint is registered: the worker node's raylet dies, then the whole node
        wait_for_file(
            store.filesystem, store.join(f"runs/{RUN}/checkpoint_manager_snapshot.json").path
        )
        raylets = node_pids(node2, name="raylet")
        assert len(raylets) == 1, raylets
        os.kill(raylets[0], signal.SIGKILL)
        lap("raylet killed")
        stop_node(node2)
        cluster.start_node(False, 1, WORKER_NODE)  # a replacement machine joins
        new_id = node_id(cluster, "node2", other_than=lost_id)
        lap("node replaced")
        logs = cluster.wait(job, timeout=300)
        lap("trained")

        runs = cluster.api("/api/train/v2/runs/v1")["train_runs"]
        attempts = next(r for r in runs if r["name"] == RUN)["attempts"]
        summary = json.loads(next(line for line in logs.splitlines() if '{"train":' in line))
        print(f"resumed after epoch {summary['train']['starts'][1:]}; attempts:", [
            (a["status"], sorted((w["world_rank"], w["node_id"][:8]) for w in a["workers"]))
            for a in attempts
        ])  # fmt: skip

        cluster.run_job("export", ["ray_jobs.export", "configs/smoke.yaml", *args])
        lap("exported")
    lap("stopped")
    print("multinode e2e timeline:", laps)

    # each attempt ran its 2 workers on 2 different nodes: head + worker node (then its
    # replacement)
    assert [sorted(w["node_id"] for w in a["workers"]) for a in attempts] == [
        sorted([head_id, lost_id]),
        sorted([head_id, new_id]),
    ]
    assert [a["status"] for a in attempts] == ["ERRORED", "FINISHED"]
    # the second attempt resumed after a checkpointed epoch and trained to the end
    train = summary["train"]
    resumed_after = train["starts"][1]
    assert train["starts"] == [0, resumed_after] and 1 <= resumed_after < EPOCHS, train
    assert train["epochs"] == EPOCHS and not train["stopped_early"]
    assert f"resuming after epoch {resumed_after}" in logs
    assert train["last"]["epoch"] == EPOCHS

    # the export job registered the run's model as the first champion
    client = MlflowClient(mlflow_server)
    name = f"{MODEL_PREFIX}-{bucket}"
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "1" and champion.run_id == train["mlflow_run_id"]
