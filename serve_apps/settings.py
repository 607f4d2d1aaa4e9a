"""The application args (written by serve_apps.deploy_config) -> typed settings.

Args are plain JSON so that the same dict works in a ``serve deploy`` YAML, in the KubeRay
RayService and in ``serve.run(build_app(args))``:

- ``use_case`` (required), ``model_uri``, ``request_timeout_s``;
- ``config`` (the resolved UnirankConfig inline) or ``config_path`` (a YAML file);
- optional ``retrieval_index`` (used when the model dir has no ``retrieval.npz``) and
  ``blocked_item_ids`` (a global blocklist for the ``blocked_items`` rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from model.config import ConfigError, UnirankConfig, UseCaseConfig, config_from_dict, load_config

KNOWN_ARGS = {
    "use_case",
    "model_uri",
    "request_timeout_s",
    "config",
    "config_path",
    "retrieval_index",
    "blocked_item_ids",
}


@dataclass(frozen=True)
class AppSettings:
    cfg: UnirankConfig
    use_case: UseCaseConfig
    model_uri: str | None
    request_timeout_s: float
    retrieval_index: str | None = None
    blocked_item_ids: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> AppSettings:
        unknown = sorted(set(args) - KNOWN_ARGS)
        if unknown:
            raise ConfigError(f"serve app args: unknown keys {unknown}; known {sorted(KNOWN_ARGS)}")
        if "use_case" not in args:
            raise ConfigError("serve app args: use_case is required")
        if args.get("config") is not None:
            cfg = config_from_dict(args["config"], "serve app args.config")
        elif args.get("config_path"):
            cfg = load_config(args["config_path"])
        else:
            raise ConfigError("serve app args: give config (inline) or config_path")
        by_name = {uc.name: uc for uc in cfg.use_cases}
        name = args["use_case"]
        if name not in by_name:
            raise ConfigError(
                f"serve app args: use_case {name!r} is not in config.use_cases {sorted(by_name)}"
            )
        uc = by_name[name]
        return cls(
            cfg=cfg,
            use_case=uc,
            model_uri=args.get("model_uri") or cfg.serve.model_uri,
            request_timeout_s=float(args.get("request_timeout_s") or uc.request_timeout_s),
            retrieval_index=args.get("retrieval_index"),
            blocked_item_ids=frozenset(int(x) for x in args.get("blocked_item_ids") or ()),
        )
