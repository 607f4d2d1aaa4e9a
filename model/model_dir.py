"""A model URI -> the local exported directory (``model.export`` format), for every reader:
the Serve replicas (``serve.model_uri``) and the batch jobs that run an export
(``ray_jobs.user_embeddings``).

- a local path (or ``file://`` path) to an exported directory: used as is;
- ``models:/<name>@<alias>`` / ``models:/<name>/<version>``: the MLflow model registry,
  downloaded by ``model.registry.download_serving_dir``. That module (and MLflow, about 2.5 s
  to import) is imported only for such a URI, so a local export never pays for it.
"""

from __future__ import annotations

import os
from pathlib import Path

from model.config import ConfigError, UnirankConfig
from model.export import MANIFEST_FILE


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
    """``models:/...`` -> the downloaded serving directory.

    The tracking server is ``MLFLOW_TRACKING_URI`` when set, else ``mlflow.tracking_uri``.
    """
    try:
        import mlflow

        from model import registry
    except ImportError as exc:
        raise ConfigError(
            f"serve.model_uri {uri!r}: registry URIs need mlflow ({exc}); "
            f"pass an exported model directory instead"
        ) from None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    try:
        return Path(registry.download_serving_dir(uri))
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types; name the URI
        raise ConfigError(f"serve.model_uri {uri!r}: cannot download: {exc}") from exc


def pin_model_uri(uri: str, cfg: UnirankConfig) -> tuple[str, str]:
    """``uri`` -> (the concrete URI every replica loads, the label responses report).

    A registry alias (``models:/unirank@champion``) is resolved ONCE, here, to its version
    (``models:/unirank/7``, label ``unirank/7``), so replicas started later (autoscaling) load
    the same version as the running ones, whatever the alias says by then. A version URI is
    kept (label ``name/N``); a local export directory is kept, labelled by its model digest.
    """
    if not is_registry_uri(uri):
        from model.export import model_digest

        return uri, model_digest(resolve_model_dir(uri, cfg))
    name, sep, alias = uri.removeprefix("models:/").partition("@")
    if not sep:  # models:/name/N
        return uri, uri.removeprefix("models:/")
    from model import registry

    try:
        version = registry.version_of_alias(name, alias, cfg.mlflow.tracking_uri)
    except LookupError as exc:
        raise ConfigError(f"serve.model_uri {uri!r}: {exc}") from None
    return f"models:/{name}/{version}", f"{name}/{version}"
