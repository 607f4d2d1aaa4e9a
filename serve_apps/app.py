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

from model.model_dir import pin_model_uri
from serve_apps.deploy_config import (
    INGRESS_DEPLOYMENT,
    RANKER_DEPLOYMENT,
    deployment_options,
    rollout_config,
)
from serve_apps.ingress import UseCaseIngress
from serve_apps.ranker import Ranker
from serve_apps.settings import AppSettings


def _options(opts: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in opts.items() if k != "name"}


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder; ``args`` as written by ``deploy_config.build_serve_config``
    (Serve's builders take exactly one argument; ``serve deploy`` applies the config's
    ``deployments`` entries over these options itself).

    The args are validated here (the config, the use-case, the args' keys), so a bad deploy
    fails when the application is built, with the field named, not inside a replica.
    ``model_uri`` is pinned here, once (an alias -> its version, ``model_dir.pin_model_uri``),
    into both deployments' ``user_config``, so every replica of this build serves the same
    version; ``serve_apps.rollout`` moves it later through ``user_config`` alone.
    """
    s = AppSettings.from_args(args)
    opts = deployment_options(s.use_case, s.cfg)
    user_config = rollout_config(*pin_model_uri(s.model_uri or "", s.cfg))
    for name in opts:
        opts[name] = {**opts[name], "user_config": user_config}
    ranker = Ranker.options(**_options(opts[RANKER_DEPLOYMENT])).bind(args)
    return UseCaseIngress.options(**_options(opts[INGRESS_DEPLOYMENT])).bind(ranker, args)
