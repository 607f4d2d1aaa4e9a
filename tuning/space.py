"""The search space, from config: each key is a config override path, each value a domain.

    tune:
      space:
        model.fusion: {choice: [average, gating, blend]}
        model.backbones: {choice: [[cross], [attention], [cross, attention]]}
        loss_weight.checkout: {loguniform: [0.3, 3.0]}    # sugar for dataset.tasks.<i>.weight
        train.lr: {loguniform: [0.0003, 0.01]}
        model.dropout: {uniform: [0.0, 0.3]}
        model.embedding_dim: {choice: [8, 16, 32]}
        dataset.features.sequence.max_len: {choice: [16, 32]}
        model.cross.num_layers: {randint: [1, 4]}          # [low, high)
        model.experts.kind: {grid: [none, mmoe]}           # every value, crossed with samples

A trial's sampled point becomes ``key=value`` overrides of the base config, so a trial runs
exactly the config a user could write by hand. List-valued choices are carried as JSON strings
(Optuna accepts only scalars) and decoded back.
"""

from __future__ import annotations

import json
from typing import Any

from ray import tune

from model.config import ConfigError, UnirankConfig, config_from_dict

DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint")
LOSS_WEIGHT = "loss_weight."


class SpaceError(ConfigError):
    """A search space entry that cannot be used; names the tune.space key."""


def _encode(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def decode(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value


def _override_key(cfg: UnirankConfig, key: str) -> str:
    if key.startswith(LOSS_WEIGHT):
        task = key[len(LOSS_WEIGHT) :]
        names = [t.name for t in cfg.dataset.tasks]
        if task not in names:
            raise SpaceError(f"tune.space.{key}: task {task!r} is not in dataset.tasks {names}")
        return f"dataset.tasks.{names.index(task)}.weight"
    return key


def param_space(cfg: UnirankConfig) -> dict[str, Any]:
    """tune.space -> a Ray Tune param_space (flat dict keyed by the tune.space keys)."""
    space: dict[str, Any] = {}
    for key, spec in cfg.tune.space.items():
        _override_key(cfg, key)
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
            raise SpaceError(
                f"tune.space.{key}: expected one of {{{', '.join(DOMAINS)}: ...}}, got {spec!r}"
            )
        kind, args = next(iter(spec.items()))
        if kind in ("choice", "grid"):
            if not isinstance(args, list) or not args:
                raise SpaceError(
                    f"tune.space.{key}.{kind}: expected a non-empty list, got {args!r}"
                )
            values = [_encode(v) for v in args]
            space[key] = tune.choice(values) if kind == "choice" else tune.grid_search(values)
        else:
            if not (
                isinstance(args, list)
                and len(args) == 2
                and all(isinstance(a, (int, float)) for a in args)
            ):
                raise SpaceError(f"tune.space.{key}.{kind}: expected [low, high], got {args!r}")
            low, high = args
            if not low < high or (kind == "loguniform" and low <= 0):
                raise SpaceError(
                    f"tune.space.{key}.{kind}: need 0 < low < high for loguniform, low < high otherwise; got {args!r}"
                )
            space[key] = getattr(tune, kind)(low, high)
    return space


def trial_overrides(cfg: UnirankConfig, point: dict[str, Any]) -> list[str]:
    """A sampled point -> section.field=value overrides (values as JSON, valid YAML)."""
    return [
        f"{_override_key(cfg, k)}={json.dumps(decode(v))}"
        for k, v in sorted(point.items())
        if k in cfg.tune.space
    ]


def trial_config(cfg: UnirankConfig, point: dict[str, Any]) -> UnirankConfig:
    """The base config with the point applied; a bad point fails here with the field path."""
    return config_from_dict(cfg.model_dump(mode="json"), "tune trial", trial_overrides(cfg, point))
