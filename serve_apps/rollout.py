"""Move running Serve applications to another model version, without restarting replicas:
``python -m serve_apps.rollout CONFIG [section.field=value ...]``.

    python -m serve_apps.rollout configs/synthetic_ads.yaml serve.model_uri=models:/unirank@champion

resolves ``serve.model_uri`` (or ``--model-uri``) ONCE to a concrete version
(``model_dir.pin_model_uri``: ``@champion`` -> ``models:/unirank/7``), writes it into the
``user_config`` of every deployed unirank application (deploy_config.with_rollout) and applies
that as a lightweight Serve update: each running ranker replica loads, checks and warms up the
new model and swaps it in (serve_apps.ranker.Ranker.reconfigure); nothing restarts and no
request is dropped. Then it waits until every ranker replica reports the new version, and
prints one JSON line (versions, replicas, ``switch_s``). A replica that cannot load the new
model keeps serving the old one: the command names it and its error and exits 1.

``--dry-run`` prints what would be rolled out (the pinned URI and label) without Ray.
Run it after ``python -m ray_jobs.registry promote|rollback`` (docs/serving.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from model.config import ConfigError, config_args, load_config
from model.model_dir import pin_model_uri
from serve_apps.deploy_config import IMPORT_PATH, RANKER_DEPLOYMENT, ROLLOUT_KV_PREFIX, with_rollout


class RolloutError(RuntimeError):
    """Some replicas did not switch: the message names them and their errors."""


def replica_states(app: str) -> dict[str, dict | None]:
    """Replica id -> its published rollout state (None before it published one), for every
    ranker replica of ``app`` that is not stopping (one in ``reconfigure`` is UPDATING)."""
    from ray.experimental.internal_kv import _internal_kv_get
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    deps = details["applications"].get(app, {}).get("deployments", {})
    replicas = deps.get(RANKER_DEPLOYMENT, {}).get("replicas", [])
    out: dict[str, dict | None] = {}
    for r in replicas:
        if getattr(r["state"], "value", r["state"]) == "STOPPING":
            continue
        raw = _internal_kv_get(f"{ROLLOUT_KV_PREFIX}{app}/{r['replica_id']}")
        out[r["replica_id"]] = json.loads(raw) if raw else None
    return out


def wait_rolled_out(apps: list[str], label: str, timeout_s: float) -> dict[str, int]:
    """Until every ranker replica of ``apps`` has answered the rollout to ``label``: all serve
    it (returns {app: replicas}), or some failed to load it (RolloutError naming every failed
    replica and its error, once the others have answered too), or the timeout passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = {app: replica_states(app) for app in apps}
        failed, pending = {}, {}
        for app, reps in states.items():
            for rid, st in reps.items():
                if st and st["target"] == label and st["error"]:
                    failed[f"{app}/{rid}"] = st["error"]
                elif not st or (st["serving"], st["target"]) != (label, label):  # not yet
                    pending[f"{app}/{rid}"] = (st or {}).get("serving")
        if failed and not pending:
            raise RolloutError(f"rollout to {label} failed on {len(failed)} replicas (they "
                               f"keep serving the previous version): {failed}")  # fmt: skip
        if not failed and not pending and all(states.values()):
            return {app: len(reps) for app, reps in states.items()}
        if time.monotonic() > deadline:
            raise RolloutError(
                f"rollout to {label}: not every ranker replica answered after {timeout_s} s; "
                f"failed: {failed or 'none'}; replica -> serving: {pending or 'no replicas'}"
            )
        time.sleep(0.2)


def rollout(
    model_uri: str, model_version: str, apps: list[str] | None = None, timeout_s: float = 120.0
) -> dict[str, Any]:
    """Roll the deployed unirank applications (or ``apps``) to ``model_uri`` (concrete, see
    pin_model_uri) on the connected Serve; returns what happened, with ``switch_s``."""
    from serve_apps.run import apply_apps, deployed_apps

    t0 = time.monotonic()
    ours = {n: a for n, a in deployed_apps().items() if a.get("import_path") == IMPORT_PATH}
    names = sorted(ours) if apps is None else apps
    missing = sorted(set(names) - set(ours))
    if missing or not names:
        raise RolloutError(
            f"no deployed unirank application {missing or ''} to roll out (deployed: "
            f"{sorted(ours)}); start them with python -m serve_apps.run"
        )
    config = with_rollout({"applications": [ours[n] for n in names]}, model_uri, model_version)
    apply_apps(config["applications"])
    replicas = wait_rolled_out(names, model_version, timeout_s)
    return {
        "model_uri": model_uri,
        "model_version": model_version,
        "replicas": replicas,
        "switch_s": round(time.monotonic() - t0, 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve_apps.rollout", description=__doc__)
    p.add_argument("config", nargs="?", help="project config YAML (default: embedded defaults)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.add_argument("--model-uri", default=None, help="default: serve.model_uri")
    p.add_argument("--apps", nargs="*", default=None, help="default: every unirank application")
    p.add_argument("--address", default="auto", help="Ray address of the serving cluster")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for replicas")
    p.add_argument("--dry-run", action="store_true", help="print what would be rolled out")
    a = p.parse_args(argv)
    a.config, a.overrides = config_args(a.config, a.overrides)
    if not 0 < a.timeout <= 3600:
        p.exit(2, f"error: --timeout must be in (0, 3600] seconds, got {a.timeout}\n")
    try:
        cfg = load_config(a.config, a.overrides)
        uri, label = pin_model_uri(a.model_uri or cfg.serve.model_uri or "", cfg)
    except ConfigError as exc:
        p.exit(2, f"error: {exc}\n")
    if a.dry_run:
        print(json.dumps({"dry_run": {"model_uri": uri, "model_version": label, "apps": a.apps}}))
        return 0
    import ray

    ray.init(address=a.address, log_to_driver=False)
    try:
        print(json.dumps(rollout(uri, label, a.apps, a.timeout)), flush=True)
    except RolloutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
