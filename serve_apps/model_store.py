"""``serve.model_uri`` -> a local exported directory (model.export format).

- a local path (or ``file://`` path) to an exported directory: used as is;
- ``models:/<name>@<alias>`` / ``models:/<name>/<version>``: the MLflow model registry,
  resolved and downloaded by ``model.registry`` (imported lazily, so a local path never
  needs MLflow and a tree without the registry module still serves local exports).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from model.config import ConfigError, UnirankConfig
from model.export import MANIFEST_FILE, model_digest


def is_registry_uri(uri: str) -> bool:
    return uri.startswith("models:/")


def resolve_model_dir(uri: str | None, cfg: UnirankConfig) -> Path:
    """The local exported directory behind ``uri``; errors name the URI and what is wrong."""
    if not uri:
        raise ConfigError("serve.model_uri is not set: give an exported directory or models:/...")
    if is_registry_uri(uri):
        path = _download_registered(uri, cfg)
    else:
        path = Path(uri.removeprefix("file://"))
    if not (path / MANIFEST_FILE).is_file():
        raise ConfigError(
            f"serve.model_uri {uri!r}: {path} is not an exported model directory "
            f"(no {MANIFEST_FILE}; see model.export.export)"
        )
    return path


def _download_registered(uri: str, cfg: UnirankConfig) -> Path:
    """``models:/...`` -> the downloaded serving directory (model.registry, imported lazily).

    The tracking server is ``MLFLOW_TRACKING_URI`` when set, else ``mlflow.tracking_uri``.
    """
    try:
        import mlflow

        from model import registry
    except ImportError as exc:
        raise ConfigError(
            f"serve.model_uri {uri!r}: registry URIs need mlflow and model.registry ({exc}); "
            f"pass an exported model directory instead"
        ) from None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    try:
        return Path(registry.download_serving_dir(uri))
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types; name the URI
        raise ConfigError(f"serve.model_uri {uri!r}: cannot download: {exc}") from exc


def model_version(path: Path, uri: str) -> dict:
    """What /version reports: URI, local path, manifest, a digest of the TorchScript file."""
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    return {"model_uri": uri, "path": str(path), "sha256": model_digest(path), **manifest}
