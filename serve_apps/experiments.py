"""Online experiments: which arm serves a user, and what the arms did.

    python -m serve_apps.experiments report [CONFIG] [key=value ...] [--log DIR] [--mlflow]
    python -m serve_apps.experiments apply [CONFIG] [key=value ...] [--log DIR] [--dry-run]

A use-case's ``experiment`` (model.config.ExperimentConfig) splits its users between arms:
the champion, challengers (other model versions) and a holdout (a non-personalized policy).
A user's arm is a pure function of (user_id, salt), so every replica and every request
agree without shared state, the same user always sees the same arm, and a new salt
reshuffles everyone. Statistics: serve_apps.experiment_stats.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.stats import norm

from model.config import (
    ArmConfig,
    ConfigError,
    ExperimentConfig,
    UnirankConfig,
    config_args,
    load_config,
)
from model.exposure_log import EXPOSURE_SCHEMA, OUTCOME_SCHEMA
from model.storage import exists, list_parquet
from serve_apps.deploy_config import load_use_cases
from serve_apps.experiment_stats import compare, msprt_pvalues, ratio

HASH_SPACE = 2**64


def user_position(user_id: int, salt: str) -> float:
    """The user's place in [0, 1): the first 8 bytes of BLAKE2b over ``salt:user_id``."""
    digest = hashlib.blake2b(f"{salt}:{int(user_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / HASH_SPACE


def assign_arm(user_id: int, exp: ExperimentConfig) -> ArmConfig:
    """The arm that serves ``user_id``: arms own consecutive slices of [0, 1) in config
    order, each as wide as its share (a share of 0 gets nobody)."""
    edges = np.cumsum([a.share for a in exp.arms])
    at = int(np.searchsorted(edges, user_position(user_id, exp.salt), side="right"))
    live = [i for i, a in enumerate(exp.arms) if a.share > 0]
    # float rounding can leave the last edge a hair under 1: that slice goes to the last arm
    return exp.arms[at if at < len(exp.arms) else live[-1]]


# --------------------------------------------------------------------------- analysis

METRIC_EVENTS = {"ctr": 1, "add_to_cart_rate": 2, "checkout_rate": 3, "engage_rate": 4}


def read_log(root: str, use_case: str, storage=None) -> tuple[pa.Table, pa.Table]:
    """The flushed log of one use-case (ray_jobs.flush_log): (exposures, outcomes), each
    stream entry once (a flush that died before deleting its entries wrote them twice)."""
    tables = []
    for kind, schema in (("exposures", EXPOSURE_SCHEMA), ("outcomes", OUTCOME_SCHEMA)):
        uri = f"{root.rstrip('/')}/{use_case}/{kind}"
        if not exists(uri, storage):
            tables.append(schema.empty_table())
            continue
        fs, files = list_parquet([uri], storage)
        t = pa.concat_tables([pq.read_table(f, filesystem=fs, schema=schema) for f in files])
        _, first = np.unique(
            t.column("stream_id").to_numpy(zero_copy_only=False), return_index=True
        )
        tables.append(t.take(np.sort(first)))
    return tables[0], tables[1]


@dataclass
class _Joined:
    """The experiment's exposures, sorted by time, and per metric the (exposure, time) of
    every attributed event (one per item: its first event within the window)."""

    ts: np.ndarray  # (E,)
    user: np.ndarray  # (E,) index into the experiment's users
    arm: np.ndarray  # (E,) object
    events: dict[str, tuple[np.ndarray, np.ndarray]]  # metric -> (exposure index, time)


def join(exposures: pa.Table, outcomes: pa.Table, exp: ExperimentConfig) -> _Joined:
    """Outcomes joined to the experiment's exposures by request_id and item, counted when
    they arrive within ``attribution_window_s`` after the exposure."""
    e = exposures.filter(pc.equal(exposures.column("experiment"), exp.id))
    e = e.take(pc.sort_indices(e, [("ts", "ascending")]))
    ts = e.column("ts").to_numpy()
    where = {r: i for i, r in enumerate(e.column("request_id").to_pylist())}
    items = [set(x) for x in e.column("items").to_pylist()]
    first: dict[tuple[str, int, int], float] = {}  # (metric, exposure, item) -> first time
    by_type = {v: m for m, v in METRIC_EVENTS.items()}
    o = outcomes.to_pydict()
    for r, t, item, kind in zip(
        o["request_id"], o["ts"], o["item_id"], o["event_type"], strict=True
    ):
        i, metric = where.get(r), by_type.get(kind)
        if i is None or metric is None or item not in items[i]:
            continue
        # events carry whole seconds (Event.timestamp), exposures fractions of one
        if math.floor(ts[i]) <= t <= ts[i] + exp.attribution_window_s:
            key = (metric, i, item)
            first[key] = min(first.get(key, t), t)
    events = {}
    for m in METRIC_EVENTS:
        pairs = [(i, t) for (metric, i, _), t in first.items() if metric == m]
        idx = np.asarray([i for i, _ in pairs], dtype=np.int64)
        events[m] = (idx, np.asarray([t for _, t in pairs], dtype=np.float64))
    _, user = np.unique(e.column("user_id").to_numpy(), return_inverse=True)
    return _Joined(ts, user, np.asarray(e.column("arm").to_pylist(), dtype=object), events)


def _per_user(j: _Joined, metric: str, arm: str, upto: float) -> tuple[np.ndarray, np.ndarray]:
    """(events, exposures) per user of ``arm``, as known at time ``upto``."""
    shown = (j.arm == arm) & (j.ts <= upto)  # (E,)
    n_users = int(j.user.max()) + 1 if len(j.user) else 0
    den = np.bincount(j.user[shown], minlength=n_users).astype(float)
    idx, t = j.events[metric]
    ok = shown[idx] & (t <= upto)
    num = np.bincount(j.user[idx[ok]], minlength=n_users).astype(float)
    keep = den > 0
    return num[keep], den[keep]


def analyze(exposures: pa.Table, outcomes: pa.Table, exp: ExperimentConfig) -> dict:
    """Per arm: exposures, users, rates; against the control: lift with 95% CIs and an
    always-valid mSPRT p-value per metric (looks after every ``check_every`` exposures, each
    using only what was known then); the decision per arm."""
    j = join(exposures, outcomes, exp)
    looks = j.ts[np.arange(exp.check_every - 1, len(j.ts), exp.check_every)].tolist()
    if len(j.ts) and (not looks or looks[-1] < j.ts[-1]):
        looks.append(float(j.ts[-1]))
    metrics = [exp.primary_metric, *[g.metric for g in exp.guardrails]]
    metrics = list(dict.fromkeys([*metrics, *METRIC_EVENTS]))
    report: dict = {"experiment": exp.id, "exposures": len(j.ts), "looks": len(looks), "arms": {}}
    for arm in exp.arms:
        num0, den0 = _per_user(j, exp.primary_metric, arm.name, math.inf)
        entry = {
            "share": arm.share,
            "policy": arm.policy,
            "exposures": int(den0.sum()),
            "users": len(den0),
            "rates": {m: ratio(*_per_user(j, m, arm.name, math.inf)).value for m in metrics},
        }
        if arm.name != exp.control:
            entry["vs_control"] = {m: _sequential(j, exp, m, arm.name, looks) for m in metrics}
            entry["decision"] = _decide(exp, entry["vs_control"])
        report["arms"][arm.name] = entry
    return report


def _sequential(j: _Joined, exp: ExperimentConfig, metric: str, arm: str, looks: list) -> dict:
    diffs, variances, exposures = [], [], []
    for t in looks:
        c = compare(
            ratio(*_per_user(j, metric, exp.control, t)), ratio(*_per_user(j, metric, arm, t))
        )
        diffs.append(c.diff if math.isfinite(c.diff) else 0.0)
        variances.append(c.variance if math.isfinite(c.variance) else 0.0)
        exposures.append(int(np.count_nonzero((j.ts <= t) & np.isin(j.arm, [exp.control, arm]))))
    if not looks:
        return {"p_value": 1.0}
    # tau: the mixing sd, relative to the control's rate at the end (a plug-in scale)
    control = ratio(*_per_user(j, metric, exp.control, math.inf))  # everything known now
    base = control.value
    tau = exp.msprt_tau * (base if base > 0 and math.isfinite(base) else 1.0)
    p = msprt_pvalues(np.asarray(diffs), np.asarray(variances), tau)
    significant = np.flatnonzero(p <= exp.alpha)
    final = compare(control, ratio(*_per_user(j, metric, arm, math.inf)))
    out = {
        "diff": final.diff,
        "diff_ci": list(final.diff_ci),
        "lift": final.lift,
        "lift_ci": list(final.lift_ci),
        "p_value": float(p[-1]),
        "significant_at_exposures": exposures[significant[0]] if len(significant) else None,
    }
    # the exposures a fixed-horizon z-test needs for 80% power at the planned lift
    if math.isfinite(base) and base > 0 and final.variance > 0:
        z = norm.ppf(1 - exp.alpha / 2) + norm.ppf(0.8)
        effect = exp.minimum_detectable_lift * base
        out["fixed_horizon_exposures"] = int(exposures[-1] * final.variance * z * z / effect**2)
    return out


def _decide(exp: ExperimentConfig, vs: dict) -> dict:
    """``stop`` when a guardrail (or the primary metric) is significantly harmed, ``promote``
    when the primary metric is significantly better, else ``continue``."""
    for g in exp.guardrails:
        r = vs[g.metric]
        if r["p_value"] <= exp.alpha and r["lift"] < -g.max_drop:
            return {
                "action": "stop",
                "reason": f"guardrail {g.metric} harmed (lift {r['lift']:+.3f})",
            }
    r = vs[exp.primary_metric]
    if r["p_value"] <= exp.alpha:
        if r["diff"] > 0:
            return {
                "action": "promote",
                "reason": f"{exp.primary_metric} better (lift {r['lift']:+.3f})",
            }
        return {"action": "stop", "reason": f"{exp.primary_metric} worse (lift {r['lift']:+.3f})"}
    return {"action": "continue", "reason": "no significant difference yet"}


# --------------------------------------------------------------------------- report CLI


def experiments_of(
    cfg: UnirankConfig, use_cases_dir: str | None
) -> list[tuple[str, ExperimentConfig]]:
    """(use-case, experiment) for every use-case that runs one: the config's own use-cases,
    else those in ``use_cases_dir``."""
    ucs = list(cfg.use_cases) or (load_use_cases(use_cases_dir) if use_cases_dir else [])
    return [(uc.name, uc.experiment) for uc in ucs if uc.experiment is not None]


def format_report(use_case: str, r: dict) -> str:
    lines = [
        f"experiment {r['experiment']} ({use_case}): {r['exposures']} exposures, {r['looks']} looks"
    ]
    for name, a in r["arms"].items():
        rates = " ".join(f"{m}={v:.4f}" for m, v in a["rates"].items())
        lines.append(
            f"  {name:<12} share={a['share']:.2f} exposures={a['exposures']} users={a['users']} {rates}"
        )
        for m, v in a.get("vs_control", {}).items():
            if "lift" in v:
                lo, hi = v["lift_ci"]
                lines.append(
                    f"    {m:<17} lift {v['lift']:+.3f} [{lo:+.3f}, {hi:+.3f}]  mSPRT p={v['p_value']:.4f}"
                )
        if "decision" in a:
            lines.append(f"    decision: {a['decision']['action']} ({a['decision']['reason']})")
    return "\n".join(lines)


def log_to_mlflow(cfg: UnirankConfig, use_case: str, r: dict) -> str:
    """One MLflow run per experiment (found again by its tag): rates, lifts and p-values
    per arm, decisions as tags. Returns the run id."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(cfg.mlflow.tracking_uri)
    exp = c.get_experiment_by_name(cfg.mlflow.experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(cfg.mlflow.experiment)
    tag = f"tags.`unirank.online_experiment` = '{r['experiment']}'"
    runs = c.search_runs([exp_id], filter_string=tag, max_results=1)
    run_id = (
        runs[0].info.run_id
        if runs
        else c.create_run(
            exp_id,
            run_name=f"online-{r['experiment']}",
            tags={"unirank.online_experiment": r["experiment"], "unirank.use_case": use_case},
        ).info.run_id
    )
    step = r["exposures"]
    for arm, a in r["arms"].items():
        c.log_metric(run_id, f"{arm}/exposures", a["exposures"], step=step)
        for m, v in a["rates"].items():
            if math.isfinite(v):
                c.log_metric(run_id, f"{arm}/{m}", v, step=step)
        for m, v in a.get("vs_control", {}).items():
            for key in ("lift", "p_value"):
                if key in v and math.isfinite(v[key]):
                    c.log_metric(run_id, f"{arm}/vs_control/{m}/{key}", v[key], step=step)
        if "decision" in a:
            c.set_tag(run_id, f"decision.{arm}", a["decision"]["action"])
    return run_id


def stop_arms(exp: ExperimentConfig, names: list[str]) -> ExperimentConfig:
    """``exp`` with the ``names`` arms' shares set to 0 and given to the control: their users
    are served by the control from the next request on."""
    moved = sum(a.share for a in exp.arms if a.name in names and a.name != exp.control)
    arms = [
        a.model_copy(
            update={
                "share": 0.0
                if a.name in names and a.name != exp.control
                else a.share + (moved if a.name == exp.control else 0.0)
            }
        )
        for a in exp.arms
    ]
    return exp.model_copy(update={"arms": arms})


def to_stop(exp: ExperimentConfig, report: dict) -> list[str]:
    """Arms the report says to stop that still get traffic."""
    live = {a.name for a in exp.arms if a.share > 0}
    return sorted(
        name
        for name, a in report["arms"].items()
        if a.get("decision", {}).get("action") == "stop" and name in live
    )


def push_experiment(app: str, exp: ExperimentConfig) -> None:
    """Set the running application's experiment (``user_config.experiment``) live: a
    lightweight Serve update, the ingress replicas reconfigure, nothing restarts."""
    from serve_apps.run import apply_apps, deployed_apps

    spec = deployed_apps().get(app)
    if spec is None:
        raise ConfigError(f"no deployed application {app!r} to change (serve_apps.run starts it)")
    deployments = [
        {
            **d,
            "user_config": {
                **(d.get("user_config") or {}),
                "experiment": exp.model_dump(mode="json"),
            },
        }
        for d in spec["deployments"]
    ]
    apply_apps([{**spec, "deployments": deployments}])


def live_experiment(app: str) -> ExperimentConfig | None:
    """The experiment the running application serves now (a previous apply may have changed
    the shares the config file has)."""
    from serve_apps.deploy_config import INGRESS_DEPLOYMENT, parse_experiment
    from serve_apps.run import deployed_apps

    spec = deployed_apps().get(app) or {}
    for d in spec.get("deployments", []):
        if d["name"] == INGRESS_DEPLOYMENT and d.get("user_config"):
            return parse_experiment(d["user_config"])
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Online experiments: per-arm report with always-valid tests."
    )
    sub = p.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="analyze the flushed exposure log (ray_jobs.flush_log)")
    app = sub.add_parser(
        "apply", help="report, then stop (share 0, live) every arm the report says to stop"
    )
    for sp in (rep, app):
        sp.add_argument("config", nargs="?", help="project config YAML (default: the defaults)")
        sp.add_argument("overrides", nargs="*", help="section.field=value overrides")
        sp.add_argument("--use-cases", default="configs/use_cases", help="use-case YAML folder")
        sp.add_argument("--log", default=None, help="flushed log root (serve.exposure_log_output)")
        sp.add_argument("--mlflow", action="store_true", help="log each experiment to MLflow")
    app.add_argument("--address", default="auto", help="Ray address of the serving cluster")
    app.add_argument("--dry-run", action="store_true", help="decide, change nothing")
    a = p.parse_args(argv)
    a.config, a.overrides = config_args(a.config, a.overrides)
    try:
        cfg = load_config(a.config, a.overrides)
        found = experiments_of(cfg, a.use_cases)
    except ConfigError as exc:
        p.exit(2, f"error: {exc}\n")
    if not found:
        p.exit(
            2,
            f"error: no use-case in {a.config or 'the defaults'} / {a.use_cases} has an experiment\n",
        )
    root = a.log or cfg.serve.exposure_log_output
    reports = {}
    for use_case, exp in found:
        exposures, outcomes = read_log(root, use_case, cfg.storage)
        r = analyze(exposures, outcomes, exp)
        if a.mlflow:
            r["mlflow_run_id"] = log_to_mlflow(cfg, use_case, r)
        print(format_report(use_case, r))
        reports[use_case] = r
    if a.command == "apply":
        reports = {"experiments": reports, "applied": _apply(a, cfg, found, reports)}
    else:
        reports = {"experiments": reports}
    print(json.dumps(reports, default=float))
    return 0


def _apply(a, cfg: UnirankConfig, found, reports: dict) -> dict:
    """Stop what the reports say to stop on the running apps; log each decision."""
    import ray

    if not a.dry_run:
        ray.init(address=a.address, log_to_driver=False)
    applied = {}
    try:
        for use_case, exp in found:
            current = (None if a.dry_run else live_experiment(use_case)) or exp
            names = to_stop(current, reports[use_case])
            if not names:
                continue
            new = stop_arms(current, names)
            if not a.dry_run:
                push_experiment(use_case, new)
            shares = {arm.name: arm.share for arm in new.arms}
            applied[use_case] = {"stopped": names, "shares": shares, "dry_run": a.dry_run}
            logging.getLogger("unirank.experiments").warning(
                "experiment %s (%s): stopped %s; shares now %s", exp.id, use_case, names, shares
            )
            run_id = reports[use_case].get("mlflow_run_id")
            if run_id and not a.dry_run:
                from mlflow.tracking import MlflowClient

                for name in names:
                    MlflowClient(cfg.mlflow.tracking_uri).set_tag(
                        run_id, f"applied.{name}", "stopped"
                    )
    finally:
        if not a.dry_run:
            ray.shutdown()
    return applied


if __name__ == "__main__":
    raise SystemExit(main())
