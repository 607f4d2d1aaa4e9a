"""The Serve application of one use-case: ``serve_apps.app:build_app`` (the import path of
every application in the generated Serve config).

    UseCaseIngress (FastAPI: validation, feature store, cache, retrieval, rules, fallback)
        -> Ranker (the exported model behind @serve.batch)

Both deployments get their options (replicas / autoscaling, max_ongoing_requests, CPUs /
GPUs) from the use-case's config through ``deploy_config.deployment_options``; a ``serve
deploy`` config sets the same values again, so the two paths agree.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from model.config import ConfigError
from serve_apps.deploy_config import INGRESS_DEPLOYMENT, RANKER_DEPLOYMENT, deployment_options
from serve_apps.ingress import UseCaseIngress
from serve_apps.ranker import Ranker
from serve_apps.settings import AppSettings


def _options(opts: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in opts.items() if k != "name"}


def build_app(args: dict[str, Any], deployments: list[dict[str, Any]] | None = None) -> Application:
    """Serve application builder; ``args`` as written by ``deploy_config.build_serve_config``.

    The args are validated here (the config, the use-case, the args' keys), so a bad deploy
    fails when the application is built, with the field named, not inside a replica.
    ``deployments``: the config's per-deployment entries, merged over the use-case's options
    (what ``serve deploy`` does with the same YAML).
    """
    s = AppSettings.from_args(args)
    opts = deployment_options(s.use_case, s.cfg)
    for d in deployments or []:
        if d["name"] not in opts:
            raise ConfigError(
                f"deployments: unknown deployment {d['name']!r}; known {sorted(opts)}"
            )
        opts[d["name"]] = {**opts[d["name"]], **d}
    ranker = Ranker.options(**_options(opts[RANKER_DEPLOYMENT])).bind(args)
    return UseCaseIngress.options(**_options(opts[INGRESS_DEPLOYMENT])).bind(ranker, args)
