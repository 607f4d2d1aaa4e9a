"""Cluster settings per kustomize layer: ``configs/k8s/base.yaml`` + ``configs/k8s/<overlay>.yaml``.

An overlay file holds only what differs from the base; it is deep-merged over it (lists are
replaced, not merged). The merged tree is validated here, so a typo fails at render time with
the file and the field path.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model.config import ConfigError

# The project directory holding configs/ (the source tree; UNIRANK_HOME in the image).
ROOT = Path(os.environ.get("UNIRANK_HOME") or Path(__file__).resolve().parents[1])
SETTINGS_DIR = ROOT / "configs" / "k8s"
BASE = "base"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Toleration(_Strict):
    key: str
    operator: str = "Exists"
    value: str | None = None
    effect: str | None = None


class NodeResources(_Strict):
    """Requests = limits (Ray sizes its logical resources from the container limits)."""

    cpu: str = "1"
    memory: str = "4Gi"
    gpus: int = Field(default=0, ge=0)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


class WorkerGroup(NodeResources):
    name: str = "cpu"
    replicas: int = Field(default=1, ge=0)
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _range(self) -> WorkerGroup:
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(
                f"worker group {self.name!r}: need min_replicas <= replicas <= max_replicas, "
                f"got {self.min_replicas} <= {self.replicas} <= {self.max_replicas}"
            )
        return self


class JobSettings(_Strict):
    """Per-RayJob knobs (the entrypoint itself is fixed in k8s.jobs)."""

    overrides: list[str] = Field(default_factory=list)
    active_deadline_s: int = Field(default=3600, gt=0)
    backoff_limit: int = Field(default=0, ge=0)
    ttl_after_finished_s: int = Field(default=600, ge=0)


class Settings(_Strict):
    name_prefix: str = "unirank"
    namespace: str | None = None
    image: str = "unirank:latest"
    image_pull_policy: str = "IfNotPresent"
    ray_version: str = "2.60.0"
    # The project config the jobs and Serve read (mounted from a ConfigMap); None = defaults.
    config: str | None = None
    config_overrides: list[str] = Field(default_factory=list)
    use_cases_dir: str = "configs/use_cases"
    model_uri: str | None = None
    head: NodeResources = Field(default_factory=NodeResources)
    workers: list[WorkerGroup] = Field(default_factory=lambda: [WorkerGroup()])
    autoscaling: bool = False
    # Non-secret environment for every Ray pod (MLflow URI, S3 endpoint, region, ...).
    env: dict[str, str] = Field(default_factory=dict)
    # Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, created out of band.
    s3_secret: str = "unirank-s3"
    s3_secret_optional: bool = True
    metrics_port: int = 8080
    jobs: dict[str, JobSettings] = Field(default_factory=dict)
    serve_upgrade_strategy: str = "NewCluster"

    @model_validator(mode="after")
    def _groups(self) -> Settings:
        names = [w.name for w in self.workers]
        if len(set(names)) != len(names):
            raise ValueError(f"workers: group names must be unique, got {names}")
        if self.serve_upgrade_strategy not in ("NewCluster", "None"):
            raise ValueError("serve_upgrade_strategy: expected NewCluster or None")
        return self

    def job(self, name: str) -> JobSettings:
        return self.jobs.get(name, JobSettings())


def deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read k8s settings {path}: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"invalid k8s settings {path}: top level must be a mapping")
    return data


def overlays(settings_dir: Path = SETTINGS_DIR) -> list[str]:
    return sorted(p.stem for p in settings_dir.glob("*.yaml") if p.stem != BASE)


def load_settings(layer: str, settings_dir: Path = SETTINGS_DIR) -> Settings:
    """Settings of ``layer``: ``base`` alone, or an overlay merged over the base."""
    data = _read(settings_dir / f"{BASE}.yaml")
    source = str(settings_dir / f"{BASE}.yaml")
    if layer != BASE:
        path = settings_dir / f"{layer}.yaml"
        if not path.exists():
            known = overlays(settings_dir)
            raise ConfigError(f"unknown overlay {layer!r}: no {path} (overlays: {known})")
        data = deep_merge(data, _read(path))
        source = str(path)
    try:
        return Settings.model_validate(data)
    except ValidationError as err:
        lines = [f"invalid k8s settings {source}:"]
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "<root>"
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            lines.append(f"  {where}: {msg}")
        raise ConfigError("\n".join(lines)) from None
