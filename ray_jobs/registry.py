"""MLflow helpers of the Ray jobs: one tracking run per training run, artifacts, registration.

A training run (``train.storage_path/train.run_name``) owns exactly one MLflow run. Its id is
remembered next to the checkpoints (RUN_MARKER), so a resumed or re-run training logs into
the same MLflow run, and evaluate / export find it without searching.

Serving never imports this module: loading a registered model by alias lives in
``model/registry.py`` (MLflow client only, no Ray).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from model.config import UnirankConfig
from model.storage import Location, read_text, resolve, write_text

log = logging.getLogger("unirank.registry")

RUN_MARKER = "mlflow_run.json"
RUN_KEY_TAG = "unirank.run_dir"
# Environment a Ray worker needs to reach the tracking server and its artifact store.
ENV_PREFIXES = ("MLFLOW_", "AWS_")


def worker_env() -> dict[str, str]:
    """MLFLOW_* / AWS_* variables of this process, for the workers' runtime_env: artifacts go
    from each client straight to the artifact store (e.g. S3), so workers need its endpoint
    and credentials too."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def client(cfg: UnirankConfig):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_registry_uri(cfg.mlflow.tracking_uri)
    return MlflowClient(cfg.mlflow.tracking_uri, registry_uri=cfg.mlflow.tracking_uri)


def experiment_id(cfg: UnirankConfig) -> str:
    c = client(cfg)
    exp = c.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(cfg.mlflow.experiment)
    except Exception:  # noqa: BLE001 - created concurrently by another process
        return c.get_experiment_by_name(cfg.mlflow.experiment).experiment_id


def run_dir(cfg: UnirankConfig) -> Location:
    return resolve(cfg.train.storage_path, cfg.storage).join(cfg.train.run_name)


def run_id_of(cfg: UnirankConfig) -> str | None:
    """The MLflow run of this training run, if one was started against this tracking URI."""
    marker = run_dir(cfg).join(RUN_MARKER)
    try:
        data = json.loads(read_text(marker.uri, cfg.storage))
    except (FileNotFoundError, OSError):
        return None
    if data.get("tracking_uri") != cfg.mlflow.tracking_uri:
        return None
    try:
        client(cfg).get_run(data["run_id"])
    except Exception:  # noqa: BLE001 - deleted, or a different store behind the same URI
        return None
    return data["run_id"]


def start_or_resume_run(cfg: UnirankConfig) -> str:
    """The MLflow run id of this training run: reused on resume, else created with the
    resolved config flattened as params."""
    existing = run_id_of(cfg)
    c = client(cfg)
    if existing:
        c.update_run(existing, status="RUNNING")
        return existing
    where = run_dir(cfg)
    run = c.create_run(
        experiment_id(cfg),
        run_name=cfg.train.run_name,
        tags={RUN_KEY_TAG: where.uri, "unirank.dataset": cfg.dataset.name},
    )
    log_params(run.info.run_id, cfg.flat())
    write_text(
        where.join(RUN_MARKER).uri,
        json.dumps({"tracking_uri": cfg.mlflow.tracking_uri, "run_id": run.info.run_id}),
        cfg.storage,
    )
    return run.info.run_id


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """All params in batches (the REST API caps 100 per batch); values cut to 6000 chars."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    items = [Param(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
             for k, v in sorted(params.items())]  # fmt: skip
    items = [Param(p.key, p.value[:6000]) for p in items]
    c = MlflowClient()
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def log_dict(run_id: str, payload: dict, artifact_file: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().log_dict(run_id, payload, artifact_file)


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().log_text(run_id, text, artifact_file)


def log_artifacts(run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().log_artifacts(run_id, local_dir, artifact_path)


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    import math

    from mlflow.tracking import MlflowClient

    c = MlflowClient()
    for k, v in metrics.items():
        if v is not None and math.isfinite(v):
            c.log_metric(run_id, k, float(v), step=step or 0)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().set_terminated(run_id, status=status)
