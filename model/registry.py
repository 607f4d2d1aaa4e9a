"""The registered model, as Serve sees it: an MLflow model URI -> a local export directory.

A unirank model version (written by ``ray_jobs.export``) is an MLflow pyfunc model whose
artifacts are two directories:

    artifacts/serving/    the serving face, exactly model.export.export's directory
                          (model.pt TorchScript, processor.json, calibrators.json,
                          config.yaml, manifest.json) -> model.export.load_predictor
    artifacts/training/   best_model.pt (eager state_dict), processor.json, config.yaml:
                          what ``train.init_from=champion`` warm-starts from

Serve calls ``load_predictor(download_serving_dir("models:/unirank@champion"))``. This module
needs only the MLflow client (no Ray, no training code); ``mlflow.pyfunc.load_model`` on the
same URI also works (``UnirankPyfunc``: DataFrame in, one probability column per task out).

Any model URI (a local export or ``models:/...``) -> a local directory:
``model.model_dir.resolve_model_dir`` (used by Serve and ray_jobs.user_embeddings). It lives in
its own module because this one imports MLflow when loaded, which a local export never needs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow.pyfunc

SERVING_ARTIFACT = "serving"
TRAINING_ARTIFACT = "training"


def model_uri_for(registered_model: str, alias: str) -> str:
    """``models:/<name>@<alias>``, e.g. models:/unirank@champion."""
    return f"models:/{registered_model}@{alias}"


def _download(model_uri: str, subdir: str, dst: str | Path | None) -> Path:
    from mlflow.artifacts import download_artifacts

    dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="unirank-model-"))
    local = Path(download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    for candidate in (local / "artifacts" / subdir, local / subdir):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"{model_uri}: no '{subdir}' directory in the model's artifacts "
        f"(found {sorted(p.name for p in local.iterdir())}); was it written by ray_jobs.export?"
    )


def download_serving_dir(model_uri: str, dst: str | Path | None = None) -> Path:
    """Download a registered unirank model (``models:/name@alias``, ``models:/name/3``, ...)
    and return the local export directory for ``model.export.load_predictor``.

    The tracking / registry URI comes from MLflow's usual configuration
    (``MLFLOW_TRACKING_URI`` or ``mlflow.set_tracking_uri``); artifacts on S3 need
    ``MLFLOW_S3_ENDPOINT_URL`` (non-AWS) and AWS credentials in the environment.
    """
    return _download(model_uri, SERVING_ARTIFACT, dst)


def download_training_dir(model_uri: str, dst: str | Path | None = None) -> Path:
    """The eager weights + processor of a registered model (warm start)."""
    return _download(model_uri, TRAINING_ARTIFACT, dst)


class UnirankPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc face of an export directory: unified-schema DataFrame -> {task}_probability."""

    def load_context(self, context) -> None:
        from model.export import load_predictor

        self.predictor = load_predictor(context.artifacts[SERVING_ARTIFACT])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        out = self.predictor.predict(model_input)
        return pd.DataFrame({f"{t}_probability": p for t, p in out.items()})


def version_of_alias(name: str, alias: str, tracking_uri: str) -> str:
    """The version ``models:/name@alias`` points to; the error names the alias. The tracking
    server is ``MLFLOW_TRACKING_URI`` when set, else ``tracking_uri``."""
    import os

    from mlflow.tracking import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri
    try:
        return str(
            MlflowClient(uri, registry_uri=uri).get_model_version_by_alias(name, alias).version
        )
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types; name the alias
        raise LookupError(f"models:/{name}@{alias}: no such alias at {uri} ({exc})") from exc
