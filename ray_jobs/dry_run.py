"""``--dry-run`` of every job CLI: the resolved inputs and outputs, checked, without Ray.

    python -m ray_jobs.train CONFIG [key=value ...] --dry-run

loads the config exactly as the job does, prints one JSON line
``{"job", "inputs", "outputs", "endpoints"}`` and exits 0, or exits 2 with a message naming
the config field whose location is empty. Kubernetes tests run every rendered RayJob's
entrypoint this way, so no job can start without its data.

Each job declares its locations below, keyed by the config field they come from (a derived
location names the fields it is derived from). Every declared location is required.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from model.config import UnirankConfig

Locations = dict[str, str | list[str] | None]
# job -> (inputs, outputs) of its resolved config and CLI arguments
Declaration = Callable[[UnirankConfig, argparse.Namespace], tuple[Locations, Locations]]


class DryRunError(ValueError):
    """A required location is empty: the message names the job and the config field."""


def _run_dir(cfg: UnirankConfig) -> str:
    return f"{cfg.train.storage_path.rstrip('/')}/{cfg.train.run_name}"


def _checkpoint(cfg: UnirankConfig, args: argparse.Namespace) -> Locations:
    ckpt = getattr(args, "checkpoint", None)
    return {"--checkpoint": ckpt} if ckpt else {"train.storage_path/train.run_name": _run_dir(cfg)}


def _generate(cfg, args):
    return {}, {"generate.output": cfg.generate.output}


def _prepare(cfg, args):
    return {"prepare.input": cfg.prepare.input}, {"prepare.output": cfg.prepare.output}


def _movielens(cfg, args):
    return {"movielens.source": cfg.movielens.source}, {"movielens.output": cfg.movielens.output}


def _train(cfg, args):
    inputs: Locations = {
        "dataset.train": cfg.dataset.train,
        "dataset.validation": cfg.dataset.validation,
    }
    if cfg.train.init_from:
        inputs["train.init_from"] = cfg.train.init_from
    return inputs, {"train.storage_path/train.run_name": _run_dir(cfg)}


def _evaluate(cfg, args):
    split = cfg.evaluate.split
    inputs = {**_checkpoint(cfg, args), "dataset.validation": cfg.dataset.validation}
    inputs[f"dataset.{split}"] = getattr(cfg.dataset, split)
    out = cfg.evaluate.output or f"{_run_dir(cfg)}/eval"
    return inputs, {"evaluate.output": out}


def _export(cfg, args):
    split = cfg.evaluate.split
    inputs = {**_checkpoint(cfg, args), "dataset.validation": cfg.dataset.validation}
    inputs[f"dataset.{split}"] = getattr(cfg.dataset, split)
    m = cfg.mlflow
    return inputs, {"mlflow.registered_model": f"models:/{m.registered_model}@{m.champion_alias}"}


def _user_embeddings(cfg, args):
    e, d = cfg.user_embeddings, cfg.dataset
    inputs: Locations = {
        # [] = the dataset's splits (ray_jobs.user_embeddings.inputs_of)
        "user_embeddings.input": list(e.input) or [*d.train, *d.validation, *d.test],
        "user_embeddings.model_uri": e.model_uri or cfg.serve.model_uri,
    }
    outputs: Locations = {"user_embeddings.output": e.output}
    if cfg.serve.feature_store == "redis":
        outputs["serve.redis_url"] = cfg.serve.redis_url
    return inputs, outputs


def _tune(cfg, args):
    inputs = {"dataset.train": cfg.dataset.train, "dataset.validation": cfg.dataset.validation}
    outputs: Locations = {
        "tune.storage_path": f"{cfg.tune.storage_path.rstrip('/')}/{cfg.tune.name}"
    }
    if not getattr(args, "no_register", False):
        m = cfg.mlflow
        outputs["mlflow.registered_model"] = f"models:/{m.registered_model}@{m.champion_alias}"
    return inputs, outputs


def _flush_log(cfg, args):
    return {"serve.redis_url": cfg.serve.redis_url}, {
        "serve.exposure_log_output": cfg.serve.exposure_log_output
    }


def _champion(cfg: UnirankConfig, source: str) -> tuple[Locations, Locations]:
    m = cfg.mlflow
    outputs: Locations = {
        "mlflow.champion_alias": f"models:/{m.registered_model}@{m.champion_alias}",
        "previous champion": f"models:/{m.registered_model}@previous_{m.champion_alias}",
    }
    return {"champion source": f"models:/{m.registered_model}{source}"}, outputs


def _promote(cfg, args):
    return _champion(cfg, f"/{args.version}")


def _rollback(cfg, args):
    return _champion(cfg, f"@previous_{cfg.mlflow.champion_alias}")


JOBS: dict[str, Declaration] = {
    "generate": _generate,
    "prepare": _prepare,
    "movielens": _movielens,
    "train": _train,
    "evaluate": _evaluate,
    "export": _export,
    "user_embeddings": _user_embeddings,
    "tune": _tune,
    "flush_log": _flush_log,
    "promote": _promote,  # ray_jobs.registry promote / rollback
    "rollback": _rollback,
}
# Jobs that resolve local paths to absolute ones first (ray_jobs.train.resolve_paths).
RESOLVES_PATHS = {"train", "evaluate", "export", "tune"}
# Jobs that talk to MLflow: their tracking URI is part of what they need.
TRACKED = {"train", "evaluate", "export", "tune", "promote", "rollback"}


def _empty(value) -> bool:
    if isinstance(value, list):
        return not value or any(not v for v in value)
    return not value


def report(job: str, cfg: UnirankConfig, args: argparse.Namespace) -> dict:
    """What ``job`` reads and writes with this config; DryRunError on an empty location."""
    if job in RESOLVES_PATHS:
        from ray_jobs.train import resolve_paths

        cfg = resolve_paths(cfg)
    inputs, outputs = JOBS[job](cfg, args)
    for kind, locations in (("input", inputs), ("output", outputs)):
        for field, value in locations.items():
            if _empty(value):
                raise DryRunError(
                    f"{job}: {kind} {field} is empty ({value!r}); set it in the config or "
                    f"with {field.split('/')[0]}=..."
                )
    endpoints: dict[str, str | None] = {"storage.endpoint_url": cfg.storage.resolved_endpoint()}
    if job in TRACKED:
        endpoints["mlflow.tracking_uri"] = cfg.mlflow.tracking_uri
    return {"job": job, "inputs": inputs, "outputs": outputs, "endpoints": endpoints}


def run(job: str, cfg: UnirankConfig, args: argparse.Namespace, parser) -> None:
    """Print the report as one JSON line and exit: 0, or 2 naming the empty field."""
    try:
        line = json.dumps({"dry_run": report(job, cfg, args)}, sort_keys=True)
    except DryRunError as exc:
        parser.exit(2, f"error: --dry-run: {exc}\n")
    print(line, flush=True)
    parser.exit(0)
