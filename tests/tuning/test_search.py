"""A tiny real search: trials run the training job; ASHA stops a weak trial; MLflow parent and
child runs; the best trial is registered with the champion rule; an interrupted search resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from model.config import load_config

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def _overrides(root, tracking_uri, name, *extra):
    return [
        f"dataset.train=[{root}/prepared/train]",
        f"dataset.validation=[{root}/prepared/validation]",
        f"dataset.test=[{root}/prepared/test]",
        f"tune.storage_path={root}/tune",
        f"tune.name={name}",
        f"mlflow.tracking_uri={tracking_uri}",
        f"mlflow.experiment=unirank-tune-{os.getpid()}",
        f"mlflow.registered_model=unirank-tune-{os.getpid()}",
        "train.max_steps_per_epoch=6",
        # Grid: a sane learning rate first, then one that cannot learn: ASHA must stop it.
        "tune.search_alg=grid",
        "tune.num_samples=1",
        "tune.space={train.lr: {grid: [0.02, 0.0000001]}, model.fusion: {choice: [gating]}, "
        "loss_weight.checkout: {loguniform: [0.5, 2.0]}}",
        *extra,
    ]


@pytest.fixture(scope="module")
def searched(smoke_data, mlflow_server):
    from tuning.search import search

    cfg = load_config(
        REPO / "configs" / "tune_smoke.yaml", _overrides(smoke_data, mlflow_server, "s1")
    )
    return cfg, search(cfg)


def test_search_runs_trials_and_asha_stops_the_weak_one(searched):
    cfg, summary = searched
    assert summary["trials"] == 2 and summary["errored"] == 0
    table = pd.read_csv(Path(summary["results"]) / "trials.csv")
    assert len(table) == 2
    weak = table[table["param.train.lr"] < 1e-5].iloc[0]
    strong = table[table["param.train.lr"] > 1e-3].iloc[0]
    assert strong.epochs == cfg.train.epochs
    assert weak.epochs < cfg.train.epochs and bool(weak.stopped_early)  # ASHA cut it
    assert strong.best_objective > weak.best_objective
    # per task x task_type metrics kept, the pooled one labelled as such
    assert {"val/click/ads/auc", "val/checkout/ads/auc", "val/click/pooled/auc"} <= set(
        table.columns
    )
    assert (Path(summary["results"]) / "objective_vs_loss_weights.png").exists()
    assert (Path(summary["results"]) / "objective_per_fusion.png").exists()


def test_mlflow_parent_child_runs_and_registry(searched):
    from mlflow.tracking import MlflowClient

    cfg, summary = searched
    c = MlflowClient(cfg.mlflow.tracking_uri)
    exp = c.get_experiment_by_name(cfg.mlflow.experiment)
    parent = c.get_run(summary["mlflow_parent_run_id"])
    children = c.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 2
    lrs = sorted(float(r.data.params["train.lr"]) for r in children)
    assert lrs[0] < 1e-5 < lrs[1]
    assert all("val/objective" in r.data.metrics for r in children)
    best = summary["best"]
    assert float(best["param.train.lr"]) > 1e-3
    arts = [a.path for a in c.list_artifacts(parent.info.run_id, "search")]
    assert "search/trials.csv" in arts and "search/best_trial.json" in arts
    reg = summary["registration"]
    assert reg["promoted"]  # first registration takes the champion alias
    mv = c.get_model_version_by_alias(cfg.mlflow.registered_model, cfg.mlflow.champion_alias)
    assert str(mv.version) == reg["version"]
    assert mv.tags["run_name"].endswith(best["trial_id"])


def test_interrupted_search_resumes_without_rerunning_finished_trials(
    smoke_data, mlflow_server, ray_cluster, tmp_path
):
    from tuning.search import search

    overrides = _overrides(smoke_data, mlflow_server, "s2", "train.epochs=1", "tune.scheduler=none")
    overrides = [o for o in overrides if not o.startswith("tune.space=")] + [
        "tune.space={train.lr: {grid: [0.02, 0.005]}}"
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tuning.search",
            "configs/tune_smoke.yaml",
            *overrides,
            "--no-register",
        ],
        cwd=REPO,
        env=env,
        # a file, not a pipe: nobody reads a pipe meanwhile, and a full one blocks the search
        stdout=(tmp_path / "search.log").open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    runs = Path(smoke_data) / "tune" / "s2" / "runs"
    deadline = time.monotonic() + 400
    # Interrupt once the first trial has finished (its final checkpoint exists).
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(runs.glob("*/epoch_0001"))) >= 1 and len(list(runs.glob("*"))) >= 2:
            break
        time.sleep(1)
    log = tmp_path / "search.log"
    assert proc.poll() is None, log.read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in runs.glob("*/epoch_0001")}
    assert finished, "no trial finished before the interruption\n" + log.read_text()[-3000:]
    cfg = load_config(REPO / "configs" / "tune_smoke.yaml", overrides)
    summary = search(cfg, register=False)
    assert summary["trials"] == 2 and summary["errored"] == 0, summary
    for run, mtime in finished.items():
        assert (runs / run / "epoch_0001").stat().st_mtime_ns == mtime, f"{run} was trained again"
    table = json.loads((Path(summary["results"]) / "trials.json").read_text())
    assert sorted(r["param.train.lr"] for r in table) == [0.005, 0.02]
