"""The multi-application Ray Serve config, generated from the per-use-case configs.

One source of truth: `serve deploy`, the KubeRay RayService (k8s.manifests) and the serving
tests all call :func:`build_serve_config`. Each use-case (``configs/use_cases/*.yaml``, one
:class:`UseCaseConfig` per file) becomes one Serve application on its own route prefix, built
by ``serve_apps.app:build_app`` with two deployments whose names are fixed here:

- ``INGRESS_DEPLOYMENT``: the use-case's HTTP ingress (retrieval + business rules), light;
- ``RANKER_DEPLOYMENT``: the model replica; it gets the use-case's CPUs/GPUs and autoscaling.

CLI::

    python -m serve_apps.deploy_config CONFIG --use-cases configs/use_cases -o serve_config.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from model.config import ConfigError, ExperimentConfig, UnirankConfig, UseCaseConfig, load_config

IMPORT_PATH = "serve_apps.app:build_app"
INGRESS_DEPLOYMENT = "UseCaseIngress"
RANKER_DEPLOYMENT = "Ranker"
INGRESS_NUM_CPUS = 0.1
# GPU share a ranker replica reserves when serve.device is cuda and its use-case sets no
# num_gpus: small rankers pack four to a GPU, and Ray places them on GPU nodes only.
CUDA_RANKER_GPUS = 0.25
# + "<app>/<replica id>": where each ranker replica publishes its rollout state (Ray's KV)
ROLLOUT_KV_PREFIX = "unirank/rollout/"


def load_use_cases(directory: str | Path) -> list[UseCaseConfig]:
    """Every ``*.yaml`` in ``directory``, one UseCaseConfig each, sorted by file name.

    Errors name the file and the dotted field path.
    """
    directory = Path(directory)
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise ConfigError(f"no use-case configs (*.yaml) in {directory}")
    out: list[UseCaseConfig] = []
    for path in files:
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid use-case config {path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"invalid use-case config {path}: top level must be a mapping")
        try:
            out.append(UseCaseConfig.model_validate(data))
        except ValidationError as err:
            lines = [f"invalid use-case config {path}:"]
            for e in err.errors():
                where = ".".join(str(p) for p in e["loc"]) or "<root>"
                msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
                lines.append(f"  {where}: {msg}")
            raise ConfigError("\n".join(lines)) from None
    names = [uc.name for uc in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"use-case configs in {directory}: names {dupes} appear twice")
    return out


def ranker_num_gpus(cfg: UnirankConfig, uc: UseCaseConfig) -> float:
    """The use-case's ``num_gpus``; with ``serve.device: cuda`` at least CUDA_RANKER_GPUS, so
    a replica that will run on CUDA is scheduled where a GPU is (``auto`` reserves none)."""
    if cfg.serve.device == "cuda":
        return uc.num_gpus or CUDA_RANKER_GPUS
    return uc.num_gpus


def _deployments(uc: UseCaseConfig, num_gpus: float | None = None) -> list[dict[str, Any]]:
    # Graceful shutdown lets in-flight requests (bounded by the request timeout) finish.
    shutdown_s = max(2.0, 2 * uc.request_timeout_s)
    # A request that cannot be routed within a fraction of its deadline is better failed fast.
    router = {"max_backoff_s": round(min(0.5, uc.request_timeout_s / 4), 4)}
    ranker = {
        "name": RANKER_DEPLOYMENT,
        "max_ongoing_requests": uc.max_ongoing_requests,
        "autoscaling_config": {
            "min_replicas": uc.min_replicas,
            "max_replicas": uc.max_replicas,
            "target_ongoing_requests": uc.target_ongoing_requests,
        },
        "ray_actor_options": {
            "num_cpus": uc.num_cpus,
            "num_gpus": uc.num_gpus if num_gpus is None else num_gpus,
        },
        "graceful_shutdown_timeout_s": shutdown_s,
        "request_router_config": router,
    }
    ingress = {
        "name": INGRESS_DEPLOYMENT,
        "max_ongoing_requests": uc.max_ongoing_requests,
        "autoscaling_config": {
            "min_replicas": max(1, uc.min_replicas),
            "max_replicas": uc.max_replicas,
            "target_ongoing_requests": uc.target_ongoing_requests,
        },
        "ray_actor_options": {"num_cpus": INGRESS_NUM_CPUS, "num_gpus": 0.0},
        "graceful_shutdown_timeout_s": shutdown_s,
        "request_router_config": router,
    }
    return [ingress, ranker]


def deployment_options(
    uc: UseCaseConfig, cfg: UnirankConfig | None = None
) -> dict[str, dict[str, Any]]:
    """Deployment name -> its options (``Deployment.options(**...)``), the same numbers the
    Serve config carries, so ``serve.run(build_app(args))`` and ``serve deploy`` agree.
    With ``cfg``, the ranker's GPUs follow ``serve.device`` (:func:`ranker_num_gpus`)."""
    gpus = None if cfg is None else ranker_num_gpus(cfg, uc)
    return {d["name"]: d for d in _deployments(uc, gpus)}


def build_serve_config(
    cfg: UnirankConfig,
    use_cases: list[UseCaseConfig],
    *,
    host: str = "127.0.0.1",
    model_uri: str | None = None,
    config_path: str | None = None,
    retrieval_index: str | None = None,
) -> dict[str, Any]:
    """The `serve deploy` multi-application config (a plain dict, ServeDeploySchema-valid).

    ``model_uri`` defaults to ``cfg.serve.model_uri``. With ``config_path`` the applications
    read the resolved config from that file (the RayService mounts it from a ConfigMap);
    without it the resolved config travels inline in the application args.
    ``retrieval_index``: where the apps load the candidate indices from when the exported
    model directory has no ``retrieval.npz`` of its own (ray_jobs.export writes one).
    """
    if not use_cases:
        raise ConfigError("build_serve_config: no use-cases given")
    uri = model_uri if model_uri is not None else cfg.serve.model_uri
    resolved = cfg.model_copy(update={"use_cases": list(use_cases)})
    apps = []
    for uc in use_cases:
        args: dict[str, Any] = {
            "use_case": uc.name,
            "model_uri": uri,
            "request_timeout_s": uc.request_timeout_s,
        }
        if retrieval_index is not None:
            args["retrieval_index"] = retrieval_index
        if config_path is not None:
            args["config_path"] = config_path
        else:
            args["config"] = resolved.model_dump(mode="json")
        apps.append(
            {
                "name": uc.name,
                "route_prefix": uc.route_prefix,
                "import_path": IMPORT_PATH,
                "args": args,
                "deployments": _deployments(uc, ranker_num_gpus(resolved, uc)),
            }
        )
    return {
        "proxy_location": "EveryNode",
        "http_options": {
            "host": host,
            "port": cfg.serve.port,
            # The proxy's end-to-end bound; each app enforces its own (smaller) deadline.
            "request_timeout_s": max(uc.request_timeout_s for uc in use_cases) * 2,
        },
        "applications": apps,
    }


def rollout_config(model_uri: str, model_version: str) -> dict[str, str]:
    """The ``user_config`` of both deployments of an app: the concrete model every replica
    serves (``models:/unirank/7``, never an alias) and the label responses report."""
    return {"model_uri": model_uri, "model_version": model_version}


USER_CONFIG_KEYS = {"model_uri", "model_version"}
OPTIONAL_USER_CONFIG_KEYS = {"arms", "experiment"}  # an online experiment's (experiments.md)


def _model(config: Any, where: str) -> tuple[str, str]:
    for key in ("model_uri", "model_version"):
        v = config.get(key) if isinstance(config, dict) else None
        if not isinstance(v, str) or not v or len(v) > 2048:
            raise ConfigError(f"{where}.{key} must be a non-empty string, got {v!r:.200}")
    return config["model_uri"], config["model_version"]


def parse_rollout(config: Any) -> tuple[str, str]:
    """A deployment's ``user_config`` -> (model_uri, model_version); errors name the key."""
    if (
        not isinstance(config, dict)
        or not set(config) >= USER_CONFIG_KEYS
        or (set(config) - USER_CONFIG_KEYS - OPTIONAL_USER_CONFIG_KEYS)
    ):
        raise ConfigError(
            f"user_config must be {{model_uri, model_version}} (deploy_config.rollout_config), "
            f"optionally with arms and experiment, got {config!r:.200}"
        )
    return _model(config, "user_config")


def parse_arms(config: dict) -> dict[str, tuple[str, str]]:
    """``user_config.arms``: experiment arm -> its pinned (model_uri, model_version)."""
    arms = config.get("arms") or {}
    if not isinstance(arms, dict) or len(arms) > 16:
        raise ConfigError(
            f"user_config.arms must map at most 16 arm names to models, got {arms!r:.200}"
        )
    return {str(name): _model(m, f"user_config.arms.{name}") for name, m in arms.items()}


def parse_experiment(config: dict) -> ExperimentConfig | None:
    """``user_config.experiment``: the running experiment (arms and shares), or None."""
    raw = config.get("experiment")
    if raw is None:
        return None
    try:
        return ExperimentConfig.model_validate(raw)
    except ValueError as exc:
        raise ConfigError(f"user_config.experiment: {exc}") from None


def experiment_user_config(uc: UseCaseConfig, pin) -> dict[str, Any]:
    """The ``arms`` and ``experiment`` keys of a use-case's ``user_config``: each model arm
    with a ``model_uri`` pinned ONCE by ``pin(uri) -> (uri, label)``, like the live model."""
    exp = uc.experiment
    if exp is None:
        return {}
    arms = {}
    for arm in exp.arms:
        if arm.policy == "model" and arm.model_uri:
            uri, label = pin(arm.model_uri)
            arms[arm.name] = rollout_config(uri, label)
    return {"arms": arms, "experiment": exp.model_dump(mode="json")}


def with_rollout(
    serve_config: dict[str, Any],
    model_uri: str,
    model_version: str,
    extra: dict[str, dict[str, Any]] | None = None,
) -> dict:
    """``serve_config`` with ``user_config`` = rollout_config(...) on the ingress and the ranker
    of every application, keeping what else their user_config holds (an experiment's arms),
    plus ``extra[app]`` where given. Only ``user_config`` differs from the running config, so
    Serve applies it as a lightweight update: ``reconfigure`` on every running replica, no
    restart; replicas started later (autoscaling) get the same config before they take
    traffic."""
    out = {**serve_config, "applications": []}
    for app in serve_config["applications"]:
        more = (extra or {}).get(app["name"], {})
        deployments = [
            {
                **d,
                "user_config": {
                    **(d.get("user_config") or {}),
                    **more,
                    **rollout_config(model_uri, model_version),
                },
            }
            for d in app["deployments"]
        ]
        out["applications"].append({**app, "deployments": deployments})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve_apps.deploy_config", description=__doc__)
    p.add_argument("config", help="the project config YAML (UnirankConfig)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.add_argument("--use-cases", default="configs/use_cases", help="directory of use-case YAMLs")
    p.add_argument("-o", "--output", help="write here instead of stdout")
    p.add_argument("--host", default=None, help="HTTP host (default: serve.host of the config)")
    p.add_argument("--model-uri", default=None)
    p.add_argument("--config-path", default=None, help="apps read the config from this path")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
        use_cases = load_use_cases(a.use_cases)
        out = build_serve_config(
            cfg,
            use_cases,
            host=a.host or cfg.serve.host,
            model_uri=a.model_uri,
            config_path=a.config_path,
        )
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    text = yaml.safe_dump(out, sort_keys=False)
    if a.output:
        Path(a.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
