"""``serve.model_uri`` -> a local exported directory, and what ``/version`` reports about it.

Resolving the URI (a local path, ``file://``, or ``models:/...`` from the MLflow registry) is
``model.model_dir.resolve_model_dir``, shared with the batch jobs; it is re-exported here.
"""

from __future__ import annotations

import json
from pathlib import Path

from model.export import MANIFEST_FILE, model_digest
from model.model_dir import is_registry_uri, resolve_model_dir

__all__ = ["is_registry_uri", "model_version", "resolve_model_dir"]


def model_version(path: Path, uri: str) -> dict:
    """What /version reports: URI, local path, manifest, a digest of the TorchScript file."""
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    return {"model_uri": uri, "path": str(path), "sha256": model_digest(path), **manifest}
