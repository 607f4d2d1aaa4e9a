"""Build the KubeRay and core manifests of one kustomize layer from its settings.

Objects (names use ``settings.name_prefix``, default ``unirank``):

- ConfigMap ``<p>-config``: the resolved project config, mounted at ``/etc/unirank/unirank.yaml``
- ConfigMap ``<p>-env``: non-secret environment (MLflow URI, S3 endpoint, ...) for every Ray pod
- RayCluster ``<p>``: the long-lived cluster (dashboard, ad-hoc ``ray job submit``)
- RayService ``<p>-serve``: the per-use-case Serve apps (only when ``serve_apps.app`` exists)
- RayJob ``<p>-<job>``: one per job of :mod:`k8s.jobs` whose module exists

Worker groups with GPUs join only the clusters of workloads that ask for GPUs
(:func:`needs_gpu`): train and tune with ``train.use_gpu``, the RayService when a ranker
reserves GPUs (``serve.device: cuda``). CPU jobs and the RayCluster get the CPU groups only.

S3 credentials come from the Secret ``settings.s3_secret`` (created out of band, never rendered).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from k8s.capacity import check, job_demand, serve_demand
from k8s.jobs import CONFIG_DIR, CONFIG_FILE, CONFIG_PATH, JOBS, entrypoint
from k8s.jobs import module_exists as _module_exists
from k8s.settings import ROOT, NodeResources, Settings
from model.config import ConfigError, UnirankConfig, apply_overrides, config_from_dict
from model.config import _resolve_base as resolve_base
from serve_apps.deploy_config import (
    IMPORT_PATH,
    build_serve_config,
    load_use_cases,
    ranker_num_gpus,
)

RAY_API = "ray.io/v1"
DASHBOARD_PORT = 8265
SERVE_PORT = 8000
GCS_PORT = 6379
CLIENT_PORT = 10001
SERVE_MODULE = IMPORT_PATH.split(":")[0]
CONFIG_VOLUME = "unirank-config"


@dataclass
class Layer:
    """The manifests of one layer, split into the two kustomize roots."""

    cluster: list[dict[str, Any]] = field(
        default_factory=list
    )  # ConfigMaps, RayCluster, RayService
    jobs: list[dict[str, Any]] = field(default_factory=list)  # RayJobs, submitted one at a time
    notes: list[str] = field(default_factory=list)


def config_document(s: Settings, root: Path = ROOT) -> dict[str, Any]:
    """The config file the cluster mounts: settings.config + its overrides + the use-cases.

    Only what is set is written (no defaults): the job resolves and saves the full config at
    load time, so a new default in model/config.py does not change the manifests. It is
    validated here, so a bad override fails at render time.
    """
    data: dict[str, Any] = {}
    if s.config is not None:
        path = root / s.config
        data = yaml.safe_load(path.read_text()) or {}
        # `base:` chains at any depth, exactly as the jobs' own load_config resolves them.
        data = resolve_base(path, data, seen=(path.resolve(),))
    if s.model_uri is not None:
        # The model the RayService serves is also the one user-embeddings encodes with.
        data.setdefault("serve", {}).setdefault("model_uri", s.model_uri)
    data = apply_overrides(data, s.config_overrides)
    data["use_cases"] = [
        uc.model_dump(mode="json", exclude_unset=True)
        for uc in load_use_cases(root / s.use_cases_dir)
    ]
    config_from_dict(data, f"k8s settings config {s.config or '<defaults>'}")
    return data


def resolved_config(
    s: Settings, root: Path = ROOT, overrides: list[str] | None = None
) -> UnirankConfig:
    """The resolved project config of the cluster (what the jobs and Serve will load), plus
    a job's entrypoint ``overrides``."""
    return config_from_dict(config_document(s, root), "k8s settings config", overrides)


def needs_gpu(cfg: UnirankConfig, workload: str) -> bool:
    """Whether ``workload`` (a k8s.jobs job name or "serve") reserves GPUs with this config."""
    if workload in ("train", "tune"):
        return cfg.train.use_gpu or cfg.train.resources_per_worker.get("GPU", 0) > 0
    if workload == "serve":
        return any(ranker_num_gpus(cfg, uc) > 0 for uc in cfg.use_cases)
    return False


def _labels(s: Settings, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": s.name_prefix,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "unirank",
    }


def _meta(name: str, s: Settings, component: str) -> dict[str, Any]:
    return {"name": name, "labels": _labels(s, component)}


def configmaps(s: Settings, config: dict[str, Any]) -> list[dict[str, Any]]:
    config_text = yaml.safe_dump(config, sort_keys=False)
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(f"{s.name_prefix}-config", s, "config"),
            "data": {CONFIG_FILE: config_text},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(f"{s.name_prefix}-env", s, "config"),
            "data": dict(sorted(s.env.items())),
        },
    ]


def _resources(r: NodeResources) -> dict[str, Any]:
    amount = {"cpu": r.cpu, "memory": r.memory}
    if r.gpus:
        amount["nvidia.com/gpu"] = str(r.gpus)
    return {"requests": dict(amount), "limits": dict(amount)}


def _container(s: Settings, r: NodeResources, name: str, ports: list[tuple[str, int]]):
    return {
        "name": name,
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "resources": _resources(r),
        "env": [{"name": "UNIRANK_CONFIG", "value": CONFIG_PATH}],
        "envFrom": [
            {"configMapRef": {"name": f"{s.name_prefix}-env"}},
            {"secretRef": {"name": s.s3_secret, "optional": s.s3_secret_optional}},
        ],
        "ports": [{"name": n, "containerPort": p} for n, p in ports],
        "volumeMounts": [{"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True}],
    }


def _pod_template(s: Settings, r: NodeResources, component: str, ports) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [_container(s, r, f"ray-{component}", ports)],
        "volumes": [
            {"name": CONFIG_VOLUME, "configMap": {"name": f"{s.name_prefix}-config"}},
        ],
    }
    if r.node_selector:
        spec["nodeSelector"] = dict(r.node_selector)
    if r.tolerations:
        spec["tolerations"] = [t.model_dump(exclude_none=True) for t in r.tolerations]
    return {
        "metadata": {
            "labels": _labels(s, f"ray-{component}"),
            # Prometheus scrapes Ray's metrics agent on every node (no operator CRD needed).
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(s.metrics_port),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": spec,
    }


def ray_cluster_spec(s: Settings, gpu: bool = False) -> dict[str, Any]:
    """The Ray cluster: head + the CPU worker groups, + the GPU groups when ``gpu``."""
    metrics = ("metrics", s.metrics_port)
    head_ports = [
        ("gcs", GCS_PORT),
        ("dashboard", DASHBOARD_PORT),
        ("client", CLIENT_PORT),
        ("serve", SERVE_PORT),
        metrics,
    ]
    spec: dict[str, Any] = {
        "rayVersion": s.ray_version,
        # Ray >= 2.52 uses token auth; KubeRay creates the token Secret and wires every pod.
        "authOptions": {"mode": "token"},
        "enableInTreeAutoscaling": s.autoscaling,
        "headGroupSpec": {
            "rayStartParams": {
                "dashboard-host": "0.0.0.0",
                # No Ray tasks on the head: it runs GCS, dashboard and job drivers only.
                "num-cpus": "0",
                "metrics-export-port": str(s.metrics_port),
            },
            "template": _pod_template(s, s.head, "head", head_ports),
        },
        "workerGroupSpecs": [
            {
                "groupName": w.name,
                "replicas": w.replicas,
                "minReplicas": w.min_replicas,
                "maxReplicas": w.max_replicas,
                "rayStartParams": {"metrics-export-port": str(s.metrics_port)},
                "template": _pod_template(s, w, "worker", [metrics]),
            }
            for w in s.workers
            if gpu or not w.gpus
        ],
    }
    if s.autoscaling:
        spec["autoscalerOptions"] = {"upscalingMode": "Default", "idleTimeoutSeconds": 120}
    return spec


def raycluster(s: Settings) -> dict[str, Any]:
    return {
        "apiVersion": RAY_API,
        "kind": "RayCluster",
        "metadata": _meta(s.name_prefix, s, "raycluster"),
        "spec": ray_cluster_spec(s),
    }


def rayjob(
    s: Settings, job_name: str, extra_overrides: list[str] | None = None, root: Path = ROOT
) -> dict:
    job = JOBS[job_name]
    js = s.job(job_name)
    overrides = [*js.overrides, *(extra_overrides or [])]
    cfg = resolved_config(s, root, overrides)
    cluster = ray_cluster_spec(s, gpu=needs_gpu(cfg, job.name))
    _must_fit(check(job_demand(job.name, cfg), cluster, f"RayJob {s.name_prefix}-{job.name}"))
    return {
        "apiVersion": RAY_API,
        "kind": "RayJob",
        "metadata": _meta(f"{s.name_prefix}-{job.name}", s, f"job-{job.name}"),
        "spec": {
            "entrypoint": entrypoint(job, overrides),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": js.ttl_after_finished_s,
            "activeDeadlineSeconds": js.active_deadline_s,
            "backoffLimit": js.backoff_limit,
            "submitterConfig": {"backoffLimit": 2},
            "rayClusterSpec": cluster,
        },
    }


def serve_config_v2(s: Settings, cfg: UnirankConfig, model_uri: str | None = None) -> str:
    serve = build_serve_config(
        cfg,
        cfg.use_cases,
        host="0.0.0.0",  # inside the pod: the proxy must be reachable from the Service
        model_uri=model_uri if model_uri is not None else s.model_uri,
        config_path=CONFIG_PATH,
    )
    return yaml.safe_dump(serve, sort_keys=False)


def _must_fit(problems: list[str]) -> None:
    """A request that fits on no node stays pending forever: fail at render time instead."""
    if problems:
        raise ConfigError(
            "k8s settings: resource requests do not fit the declared nodes (head / workers "
            "in configs/k8s/*.yaml):\n  " + "\n  ".join(problems)
        )


def rayservice(s: Settings, cfg: UnirankConfig, model_uri: str | None = None) -> dict:
    serve_config = serve_config_v2(s, cfg, model_uri)
    cluster = ray_cluster_spec(s, gpu=needs_gpu(cfg, "serve"))
    _must_fit(check(serve_demand(serve_config), cluster, f"RayService {s.name_prefix}-serve"))
    return {
        "apiVersion": RAY_API,
        "kind": "RayService",
        "metadata": _meta(f"{s.name_prefix}-serve", s, "rayservice"),
        "spec": {
            # Zero-downtime upgrades: a new cluster is brought up, traffic switches when ready.
            "upgradeStrategy": {"type": s.serve_upgrade_strategy},
            "serviceUnhealthySecondThreshold": 900,
            "deploymentUnhealthySecondThreshold": 300,
            "serveConfigV2": serve_config,
            "rayClusterConfig": cluster,
        },
    }


def build_layer(
    s: Settings,
    *,
    root: Path = ROOT,
    all_jobs: bool = False,
    force_serve: bool = False,
    module_exists=_module_exists,
) -> Layer:
    """Every manifest of a layer. Jobs/Serve whose module is missing are skipped with a note,
    unless ``all_jobs`` / ``force_serve`` (used by tests to validate them ahead of time)."""
    config = config_document(s, root)
    cfg = config_from_dict(config, "k8s settings config")
    layer = Layer(cluster=[*configmaps(s, config), raycluster(s)])
    if force_serve or module_exists(SERVE_MODULE):
        layer.cluster.append(rayservice(s, cfg))
    else:
        layer.notes.append(f"RayService skipped: module {SERVE_MODULE} does not exist yet")
    for name, job in JOBS.items():
        if all_jobs or module_exists(job.module):
            layer.jobs.append(rayjob(s, name, root=root))
        else:
            layer.notes.append(f"RayJob {name} skipped: module {job.module} does not exist yet")
    return layer


def with_namespace(docs: list[dict], namespace: str | None) -> list[dict]:
    """What kustomize's ``namespace:`` does to our kinds: set metadata.namespace."""
    out = copy.deepcopy(docs)
    if namespace:
        for d in out:
            d["metadata"]["namespace"] = namespace
    return out
