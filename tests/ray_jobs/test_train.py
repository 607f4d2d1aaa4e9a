"""ray_jobs.train through a real TorchTrainer on the session cluster: DDP run with checkpoints
and MLflow tracking, rerun semantics, and a worker killed mid-run."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ray_jobs import train
from ray_jobs.train_loop import CHECKPOINT_FILES, load_state

pytestmark = pytest.mark.integration


def _complete(checkpoint: str) -> None:
    missing = [f for f in CHECKPOINT_FILES if not (Path(checkpoint) / f).is_file()]
    assert not missing, f"{checkpoint} lacks {missing}"


def test_ddp_run_checkpoints_every_epoch_and_tracks_in_mlflow(trained_run):
    cfg, r = trained_run
    assert (r.epochs, r.starts, r.stopped_early) == (2, [0], False)
    assert [h["epoch"] for h in r.history] == [1, 2]
    for h in r.history:
        assert h["train/rows_per_s"] > 0 and h["train/rows"] > 0
        assert 0.0 < h["val/objective"] < 1.0
        assert {"val/click/pooled/auc", "val/checkout/ads/auc", "val/click/ads/auc"} <= set(h)
    assert r.best_epoch in (1, 2) and r.best_objective == max(h["val/objective"] for h in r.history)
    # every epoch checkpointed (num_to_keep=2 keeps both), each complete
    ckpts = sorted(Path(r.run_dir).glob("epoch_*"))
    assert [p.name for p in ckpts] == ["epoch_0001", "epoch_0002"]
    for p in ckpts:
        _complete(p)
    assert load_state(ckpts[0]).epoch == 1 and r.checkpoint.endswith("epoch_0002")

    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(r.mlflow_run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.num_workers"] == "2" and params["model.embedding_dim"] == "8"
    assert params["dataset.tasks.2.name"] == "checkout"
    steps = [m.step for m in client.get_metric_history(r.mlflow_run_id, "val/objective")]
    assert sorted(steps) == [1, 2]
    assert client.get_metric_history(r.mlflow_run_id, "val/checkout/ads/auc")
    # artifacts went through the server's S3 artifact store
    names = {a.path for a in client.list_artifacts(r.mlflow_run_id, "train")}
    assert {"train/config.yaml", "train/history.json", "train/summary.json"} <= names


def test_rerun_of_a_finished_run_does_not_start_over(trained_run):
    cfg, r = trained_run
    again = train.run(cfg)
    assert again.starts == [0] and again.epochs == 2
    assert again.checkpoint == r.checkpoint and again.mlflow_run_id == r.mlflow_run_id


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line), from /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        out[int(entry)] = (ppid, cmd)
    return out


def _train_worker_pids() -> list[int]:
    """Ray Train workers of the session cluster: descendants of this test process only (the
    session's raylet is its child), never another Ray on the machine."""
    procs = _processes()
    mine, frontier = set(), [os.getpid()]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in procs.items():
            if ppid == parent and pid not in mine:
                mine.add(pid)
                frontier.append(pid)
    return [pid for pid in mine if "RayTrainWorker" in procs[pid][1]]


def test_killed_worker_is_replaced_and_resumes_then_rerun_resumes(
    smoke_data, mlflow_server, train_cfg
):
    # max_failures=2: the kill is one failure; one spare for the shared, loaded test machine.
    cfg = train_cfg(smoke_data, "kill", mlflow_server, "train.epochs=2", "train.max_failures=2")
    box: dict = {}

    def target():
        try:
            box["result"] = train.run(cfg)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    # Kill once Ray has registered the first checkpoint (its run snapshot names it): a
    # checkpoint written but not yet reported is not one Ray Train resumes from.
    snapshot = smoke_data / "runs" / "kill" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 240
    while not (snapshot.exists() and "epoch_0001" in snapshot.read_text()):
        assert thread.is_alive(), box.get("error")
        assert time.monotonic() < deadline, "no registered checkpoint after 240 s"
        time.sleep(0.1)
    pids = _train_worker_pids()
    assert pids, "no RayTrainWorker process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive(), "training did not finish within 300 s after the kill"
    assert "error" not in box, box.get("error")
    r = box["result"]
    # the replacement worker group resumed from the epoch-1 checkpoint, not from zero
    assert r.epochs == 2 and r.starts[0] == 0 and r.starts[-1] == 1, r.starts
    assert [h["epoch"] for h in r.history] == [1, 2]
    _complete(r.checkpoint)

    # the same run name again, with more epochs: resumes after epoch 2
    more = train_cfg(smoke_data, "kill", mlflow_server, "train.epochs=3", "train.max_steps_per_epoch=2")  # fmt: skip
    r2 = train.run(more)
    assert r2.starts == [*r.starts, 2] and r2.epochs == 3
    assert [h["epoch"] for h in r2.history] == [1, 2, 3]
    assert r2.mlflow_run_id == r.mlflow_run_id
    _complete(r2.checkpoint)


def test_deterministic_runs_repeat_bit_for_bit(smoke_data, mlflow_server, train_cfg):
    """train.deterministic: two runs of the same config and seed give the same losses, metrics
    and weights (block order kept through the cache and the ingest)."""
    import torch

    runs = []
    for name in ("exact-a", "exact-b"):
        cfg = train_cfg(
            smoke_data, name, mlflow_server,
            "train.deterministic=true", "train.epochs=2", "train.max_steps_per_epoch=12",
        )  # fmt: skip
        runs.append(train.run(cfg, track=False))
    a, b = runs
    keys = [
        "train/loss",
        "train/rows",
        "val/objective",
        "val/click/ads/auc",
        "val/checkout/ads/auc",
    ]
    assert [[h[k] for k in keys] for h in a.history] == [[h[k] for k in keys] for h in b.history]
    wa, wb = (torch.load(Path(r.checkpoint) / "model.pt") for r in runs)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
