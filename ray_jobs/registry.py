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


# ----------------------------------------------------------------- champion: promote / rollback


class RegistryError(ValueError):
    """A promote / rollback that cannot be done: the message names the version or alias."""


def previous_alias(cfg: UnirankConfig) -> str:
    """The alias that remembers the champion before the last move (``previous_champion``)."""
    return f"previous_{cfg.mlflow.champion_alias}"


def _alias_version(c, name: str, alias: str) -> str | None:
    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except Exception:  # noqa: BLE001 - no such alias (MLflow raises RestException / MlflowException)
        return None


def _move_champion(cfg: UnirankConfig, version: str, action: str, reason: str, by: str | None):
    """Point the champion alias at ``version`` and the previous alias at the old champion; the
    who / when / why go into the new champion version's tags."""
    import datetime
    import getpass

    c, m = client(cfg), cfg.mlflow
    try:
        c.get_model_version(m.registered_model, version)
    except Exception as exc:  # noqa: BLE001 - unknown model or version
        known = sorted((int(v.version) for v in _versions(c, m.registered_model)), reverse=True)
        raise RegistryError(
            f"{action}: registered model {m.registered_model!r} has no version {version} "
            f"(versions: {known[:20] or 'none'}) at {cfg.mlflow.tracking_uri}"
        ) from exc
    before = _alias_version(c, m.registered_model, m.champion_alias)
    at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    by = by or getpass.getuser()
    if before != version:
        c.set_registered_model_alias(m.registered_model, m.champion_alias, version)
        if before is not None:
            c.set_registered_model_alias(m.registered_model, previous_alias(cfg), before)
    tags = {"action": action, "by": by, "at": at, "reason": reason, "replaced": before or ""}
    for k, v in tags.items():
        c.set_model_version_tag(m.registered_model, version, f"unirank.champion.{k}", v[:500])
    result = {"registered_model": m.registered_model, "champion": version, "previous": before}
    log.info("%s: @%s %s -> v%s (%s, by %s)", action, m.champion_alias, before, version, reason, by)
    return {**result, **tags, "changed": before != version}


def _versions(c, name: str) -> list:
    try:
        return list(c.search_model_versions(f"name='{name}'"))
    except Exception:  # noqa: BLE001 - no such registered model
        return []


def promote(cfg: UnirankConfig, version: int | str, reason: str = "", by: str | None = None):
    """``@champion`` -> ``version``; the champion it replaces becomes ``@previous_champion``."""
    return _move_champion(cfg, str(version), "promote", reason, by)


def rollback(cfg: UnirankConfig, reason: str = "", by: str | None = None):
    """``@champion`` -> ``@previous_champion``; the replaced one becomes the previous, so a
    second rollback undoes the first (like ``kubectl rollout undo``)."""
    m = cfg.mlflow
    prev = _alias_version(client(cfg), m.registered_model, previous_alias(cfg))
    if prev is None:
        raise RegistryError(
            f"rollback: no previous champion: alias models:/{m.registered_model}@"
            f"{previous_alias(cfg)} is not set at {m.tracking_uri} (set by promote / export)"
        )
    return _move_champion(cfg, prev, "rollback", reason, by)


COMMANDS = ("promote", "rollback")


def main(argv: list[str] | None = None) -> int:
    """``python -m ray_jobs.registry promote CONFIG --version N`` / ``rollback CONFIG``."""
    import sys

    from ray_jobs.common import job_parser, parse_job_args, setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(
            f"usage: python -m ray_jobs.registry {{{','.join(COMMANDS)}}} CONFIG ...",
            file=sys.stderr,
        )
        return 2
    command = argv.pop(0)
    p = job_parser(f"Move the champion alias: {command}", job=command)
    p.prog = f"python -m ray_jobs.registry {command}"
    if command == "promote":
        p.add_argument("--version", type=int, required=True, help="registered version number")
    p.add_argument("--reason", default="", help="why (kept in the version's tags)")
    p.add_argument("--by", default=None, help="who (default: the OS user)")
    args, cfg = parse_job_args(p, argv)
    if command == "promote" and not 1 <= args.version < 2**31:
        p.exit(
            2, f"error: --version must be a registered version number >= 1, got {args.version}\n"
        )
    setup_logging()
    try:
        if command == "promote":
            result = promote(cfg, args.version, args.reason, args.by)
        else:
            result = rollback(cfg, args.reason, args.by)
    except RegistryError as exc:
        p.exit(2, f"error: {exc}\n")
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
