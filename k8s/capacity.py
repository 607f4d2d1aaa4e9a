"""Do a workload's Ray resource requests fit the nodes its cluster declares?

Ray sizes each node's logical resources from its pod: ``rayStartParams.num-cpus`` /
``num-gpus`` when set (the head has ``num-cpus: 0``), else the container limits. A cluster
has at most ``maxReplicas`` nodes per worker group with the in-tree autoscaler, ``replicas``
without it. A workload's demand is a list of bundles, each placed whole on one node:

- RayService: every deployment's ``ray_actor_options`` at its ``min_replicas``;
- train: ``num_workers`` x ``resources_per_worker``; tune: ``max_concurrent_trials`` x
  (trial driver + the trial's workers);
- user-embeddings: ``num_actors`` x ``actor_cpus``;
- every job: one whole CPU left for Ray Data's read tasks (without it a job waits forever).

:func:`check` places the bundles first-fit, largest first, and returns one message per bundle
that finds no node: a request that does not fit stays pending forever, with no error.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any

import yaml

from k8s.jobs import CONFIG_FILE, JOBS
from model.config import UnirankConfig, config_from_dict

JOB_OF_MODULE = {j.module: j.name for j in JOBS.values()}

DATA_READ = ("Ray Data read task", 1.0, 0.0)


@dataclass
class Node:
    group: str
    cpu: float
    gpu: float
    used_cpu: float = 0.0
    used_gpu: float = 0.0

    def take(self, cpu: float, gpu: float) -> bool:
        eps = 1e-9
        if self.used_cpu + cpu > self.cpu + eps or self.used_gpu + gpu > self.gpu + eps:
            return False
        self.used_cpu += cpu
        self.used_gpu += gpu
        return True


@dataclass
class Demand:
    bundles: list[tuple[str, float, float]] = field(default_factory=list)  # (what, CPU, GPU)

    def add(self, what: str, cpu: float, gpu: float = 0.0, count: int = 1) -> None:
        self.bundles += [(what, float(cpu), float(gpu))] * count


def quantity(text: Any) -> float:
    """A Kubernetes CPU quantity ("2", "500m", 1.5) as cores."""
    s = str(text)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def _group_node(name: str, group: dict) -> tuple[float, float]:
    params = group.get("rayStartParams") or {}
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpu = quantity(params["num-cpus"]) if "num-cpus" in params else quantity(limits["cpu"])
    gpus = params.get("num-gpus", limits.get("nvidia.com/gpu", 0))
    return cpu, float(gpus)


def nodes(cluster_spec: dict) -> list[Node]:
    """Every node the cluster can have at most (head first)."""
    out = [Node("head", *_group_node("head", cluster_spec["headGroupSpec"]))]
    autoscaling = cluster_spec.get("enableInTreeAutoscaling", False)
    for g in cluster_spec.get("workerGroupSpecs") or []:
        count = g["maxReplicas"] if autoscaling else g["replicas"]
        out += [Node(g["groupName"], *_group_node(g["groupName"], g)) for _ in range(count)]
    return out


def job_demand(job: str, cfg: UnirankConfig) -> Demand:
    """What a k8s.jobs job asks of its cluster, from its resolved config."""
    d = Demand()
    t = cfg.train
    per_worker = dict(t.resources_per_worker)
    if t.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    worker = (per_worker.get("CPU", 1.0), per_worker.get("GPU", 0.0))
    if job == "train":
        d.add("train worker", *worker, count=t.num_workers)
    elif job == "tune":
        for _ in range(cfg.tune.max_concurrent_trials):
            d.add("tune trial driver", cfg.tune.trial_driver_cpus)
            d.add("tune trial worker", *worker, count=t.num_workers)
    elif job == "user-embeddings":
        e = cfg.user_embeddings
        d.add("user-embeddings actor", e.actor_cpus, count=e.num_actors)
    d.add(*DATA_READ)
    return d


def serve_demand(serve_config_v2: str) -> Demand:
    """Every Serve replica at its min_replicas, from the RayService's serveConfigV2."""
    d = Demand()
    for app in yaml.safe_load(serve_config_v2)["applications"]:
        for dep in app.get("deployments") or []:
            opts = dep.get("ray_actor_options") or {}
            auto = dep.get("autoscaling_config")
            count = auto.get("min_replicas", 1) if auto else dep.get("num_replicas", 1)
            what = f"Serve {app['name']}/{dep['name']} replica"
            d.add(what, opts.get("num_cpus", 1.0), opts.get("num_gpus", 0.0), count=count)
    return d


def check(demand: Demand, cluster_spec: dict, where: str) -> list[str]:
    """One message per bundle that fits on no node (first fit, GPU and large bundles first)."""
    pool = nodes(cluster_spec)
    problems = []
    for what, cpu, gpu in sorted(demand.bundles, key=lambda b: (-b[2], -b[1])):
        if not any(n.take(cpu, gpu) for n in pool):
            free = ", ".join(
                f"{n.group} {n.cpu - n.used_cpu:g} CPU/{n.gpu - n.used_gpu:g} GPU" for n in pool
            )
            problems.append(
                f"{where}: {what} ({cpu:g} CPU, {gpu:g} GPU) fits on no node; free: {free}"
            )
    return problems


def check_docs(docs: list[dict]) -> list[str]:
    """Every RayJob and RayService among rendered ``docs``. A RayJob's config is the
    ``<prefix>-config`` ConfigMap plus its entrypoint's overrides, as the job loads it."""
    configs = [
        d["data"][CONFIG_FILE]
        for d in docs
        if d["kind"] == "ConfigMap" and CONFIG_FILE in (d.get("data") or {})
    ]
    problems: list[str] = []
    for doc in docs:
        kind, name, spec = doc["kind"], doc["metadata"]["name"], doc.get("spec")
        where = f"{kind}/{name}"
        if kind == "RayService":
            problems += check(serve_demand(spec["serveConfigV2"]), spec["rayClusterConfig"], where)
        elif kind == "RayJob":
            argv = shlex.split(spec["entrypoint"])  # python -m MODULE CONFIG [overrides...]
            job = JOB_OF_MODULE[argv[2]]
            if len(configs) != 1:
                raise ValueError(
                    f"{where}: expected one {CONFIG_FILE} ConfigMap, got {len(configs)}"
                )
            cfg = config_from_dict(yaml.safe_load(configs[0]), where, argv[4:])
            problems += check(job_demand(job, cfg), spec["rayClusterSpec"], where)
    return problems
