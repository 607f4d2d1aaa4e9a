"""Hyperparameter search on Ray Tune over the real training job.

    python -m tuning.search [CONFIG] [section.field=value ...] [--address ADDR]

Each trial runs ``ray_jobs.train`` (its TorchTrainer, its train_func) with the trial's point
applied to the config as overrides (``tuning.space``): the Ray Train V2 + Tune pattern, a trial
function that builds and fits the TorchTrainer, with ``TuneReportCallback`` forwarding the
per-epoch validation metrics to Tune. ASHA stops weak trials early on ``val/objective``: the
within-use-case objective (``train.objective``: per task, the mean AUC within each task_type,
weighted over tasks), never an AUC pooled across use-cases, which mostly rewards their
different base rates. One MLflow parent run per search, a child run per
trial. Results (CSV + JSON table, plots) go to ``tune.storage_path/tune.name/results`` and to
the parent run; the best trial's checkpoint is exported and registered through the training
job's own code path (``ray_jobs.export.run``), champion rule included.

Running the same command again resumes an interrupted search (``Tuner.restore``) without
rerunning finished trials.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import ray
from ray import tune

from model.config import UnirankConfig, config_from_dict
from model.storage import is_s3, resolve, write_text
from ray_jobs import registry
from ray_jobs.common import init_ray, job_parser, parse_job_args, setup_logging
from tuning.space import decode, param_space, trial_config

log = logging.getLogger("unirank.tune")
METRIC = "val/objective"


def trial_run_name(cfg: UnirankConfig, trial_id: str) -> str:
    return f"{cfg.tune.name}-{trial_id}"


def run_trial(
    config: dict, base_config: dict, parent_run_id: str | None, env: dict | None = None
) -> None:
    """The Tune trainable: one trial = one run of the training job with the point applied.

    ``env``: the search driver's MLFLOW_* / AWS_* variables. The trial's process logs to MLflow
    itself (and uploads artifacts straight to the artifact store), but a Ray worker process
    only has the environment its node started with.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_jobs import train

    os.environ.update(env or {})

    base = config_from_dict(base_config, "tune base config")
    point = {k: v for k, v in config.items() if k in base.tune.space}
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, point)
    search_root = f"{base.tune.storage_path.rstrip('/')}/{base.tune.name}"
    cfg = config_from_dict(
        cfg.model_dump(mode="json"),
        "tune trial",
        [
            f"train.run_name={trial_run_name(base, trial_id)}",
            f"train.storage_path={search_root}/runs",
        ],
    )
    before = _live_placement_groups()
    train.run(
        cfg,
        callbacks=[TuneReportCallback()],
        mlflow_tags={"mlflow.parentRunId": parent_run_id, "unirank.tune.trial_id": trial_id}
        if parent_run_id
        else None,
    )
    _release_placement_groups(before, sole_trial=base.tune.max_concurrent_trials == 1)


def _live_placement_groups() -> set[str]:
    from ray.util import placement_group_table

    return {k for k, v in placement_group_table().items() if v["state"] != "REMOVED"}


def _release_placement_groups(before: set[str], sole_trial: bool, wait_s: float = 30.0) -> None:
    """Make sure the trainer's placement group is gone before the trial ends.

    Tune ends a trial as soon as its function returns; a Train controller still shutting down
    then dies with its placement group alive, and on a small cluster the next trial's Ray Data
    read tasks wait forever for the CPU it holds. Wait for the controller to release it; when
    this is the only trial running, whatever placement group is left over is ours: remove it.
    """
    from ray.util import placement_group_table
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    deadline = time.monotonic() + wait_s
    while True:
        leftover = _live_placement_groups() - before
        if not leftover or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if leftover and sole_trial:
        table = placement_group_table()
        for pg_id in leftover:
            log.warning("removing placement group %s left behind by the trial's trainer", pg_id)
            remove_placement_group(
                PlacementGroup(
                    ray.PlacementGroupID(bytes.fromhex(table[pg_id]["placement_group_id"]))
                )
            )


def _search_alg(cfg: UnirankConfig):
    t = cfg.tune
    if t.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=METRIC, mode="max", seed=cfg.train.seed)
    from ray.tune.search import BasicVariantGenerator

    # random / grid, seeded so that a search is repeatable.
    # (An explicit generator does not inherit TuneConfig.max_concurrent_trials: pass it here.)
    return BasicVariantGenerator(
        random_state=cfg.train.seed, max_concurrent=t.max_concurrent_trials
    )


def _scheduler(cfg: UnirankConfig):
    t = cfg.tune
    if t.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=cfg.train.epochs,
        grace_period=t.grace_period,
        reduction_factor=t.reduction_factor,
    )


def build_space(cfg: UnirankConfig) -> dict:
    space = param_space(cfg)
    if cfg.tune.search_alg == "grid":
        # grid: every choice becomes a grid axis; continuous domains are still sampled.
        space = {
            k: tune.grid_search(v.categories) if hasattr(v, "categories") else v
            for k, v in space.items()
        }
    elif cfg.tune.search_alg == "optuna" and any(isinstance(v, dict) for v in space.values()):
        raise ValueError("tune.space: grid entries cannot be searched with tune.search_alg=optuna")
    return space


def _storage(cfg: UnirankConfig):
    loc = resolve(cfg.tune.storage_path, cfg.storage)
    fs = None if isinstance(loc.filesystem, pafs.LocalFileSystem) else loc.filesystem
    return loc, fs


def make_tuner(cfg: UnirankConfig, parent_run_id: str | None) -> tune.Tuner:
    """A new Tuner, or the restored one when this search was interrupted."""
    t = cfg.tune
    loc, fs = _storage(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base_config=cfg.model_dump(mode="json"),
            parent_run_id=parent_run_id,
            env=registry.worker_env(),
        ),
        {"CPU": t.trial_driver_cpus},
    )
    path = loc.join(t.name).path if fs is not None else str(Path(loc.path) / t.name)
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        log.info("resuming search %s from %s", t.name, path)
        return tune.Tuner.restore(
            path, trainable=trainable, resume_errored=True, storage_filesystem=fs
        )
    return tune.Tuner(
        trainable,
        param_space=build_space(cfg),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            search_alg=_search_alg(cfg),
            scheduler=_scheduler(cfg),
            num_samples=t.num_samples,
            max_concurrent_trials=t.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(name=t.name, storage_path=loc.path, storage_filesystem=fs),
    )


def _parent_run(cfg: UnirankConfig) -> str:
    """The search's MLflow parent run: reused when a search with this name is resumed."""
    c = registry.client(cfg)
    exp = registry.experiment_id(cfg)
    found = c.search_runs([exp], f"tags.`unirank.tune.search` = '{cfg.tune.name}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = c.create_run(
        exp, run_name=f"search-{cfg.tune.name}", tags={"unirank.tune.search": cfg.tune.name}
    )
    registry.log_params(
        run.info.run_id, {f"tune.{k}": v for k, v in cfg.tune.model_dump(mode="json").items()}
    )
    return run.info.run_id


def results_table(grid, cfg: UnirankConfig) -> pd.DataFrame:
    """One row per trial: its point, status, epochs, final and best objective, per-task AUCs."""
    rows = []
    for r in grid:
        point = {k: decode(v) for k, v in (r.config or {}).items() if k in cfg.tune.space}
        m = r.metrics or {}
        row = {
            "trial_id": m.get("trial_id") or Path(r.path).name,
            "status": "ERROR" if r.error else "TERMINATED",
            "epochs": m.get("training_iteration"),
            "objective": m.get(METRIC),
            "best_objective": m.get("best_objective"),
            **{
                f"param.{k}": (json.dumps(v) if isinstance(v, list) else v)
                for k, v in point.items()
            },
            **{k: v for k, v in m.items() if k.startswith("val/") and k.endswith("/auc")},
        }
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df["stopped_early"] = df["epochs"].fillna(0) < cfg.train.epochs
    return df.sort_values("best_objective", ascending=False, na_position="last").reset_index(
        drop=True
    )


def plot_results(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    weights = [c for c in df.columns if c.startswith("param.loss_weight.")]
    if weights:
        fig, axes = plt.subplots(1, len(weights), figsize=(4 * len(weights), 3.5), squeeze=False)
        for ax, c in zip(axes[0], weights, strict=True):
            ax.scatter(df[c], df["best_objective"])
            ax.set(xscale="log", xlabel=c.removeprefix("param."), ylabel="best val objective")
        fig.tight_layout()
        paths.append(out_dir / "objective_vs_loss_weights.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    if "param.model.fusion" in df:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        groups = df.groupby("param.model.fusion")["best_objective"]
        names = list(groups.groups)
        ax.boxplot([groups.get_group(n).dropna().to_numpy() for n in names], tick_labels=names)
        ax.set(xlabel="fusion", ylabel="best val objective", title="Objective per fusion mode")
        fig.tight_layout()
        paths.append(out_dir / "objective_per_fusion.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths


def best_trial_config(cfg: UnirankConfig, grid) -> tuple[UnirankConfig, str]:
    """The best trial's resolved config (its run name and storage) and its trial id."""
    best = grid.get_best_result(metric="best_objective", mode="max", filter_nan_and_inf=True)
    point = {k: v for k, v in best.config.items() if k in cfg.tune.space}
    trial_id = best.metrics.get("trial_id") or Path(best.path).name
    trial = trial_config(cfg, point)
    root = f"{cfg.tune.storage_path.rstrip('/')}/{cfg.tune.name}"
    trial = config_from_dict(
        trial.model_dump(mode="json"),
        "best trial",
        [f"train.run_name={trial_run_name(cfg, trial_id)}", f"train.storage_path={root}/runs"],
    )
    return trial, trial_id


def warn_without_state_api() -> bool:
    """Ray Train's PlacementGroupCleaner removes the placement group of a trainer whose
    controller died (a trial the scheduler stopped) by watching it through the State API,
    which the Ray dashboard serves. Without it those placement groups stay until the job ends
    and later trials wait for their CPUs. Returns True when the State API answers."""
    from ray.util.state import list_actors

    try:
        list_actors(limit=1, raise_on_missing_output=False)
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing here
        log.warning(
            "the Ray State API is not available (%s): start Ray with the dashboard "
            "(ray start --head --include-dashboard=true, or ray.init(include_dashboard=True)); "
            "without it trials stopped early leak their trainers' placement groups",
            type(exc).__name__,
        )
        return False


def search(cfg: UnirankConfig, register: bool = True) -> dict:
    t0 = time.perf_counter()
    warn_without_state_api()
    from ray_jobs.train import resolve_paths

    cfg = resolve_paths(cfg)
    if not is_s3(cfg.tune.storage_path):
        # Trials run in their own working directories: every path they see must be absolute.
        tune_cfg = cfg.tune.model_copy(
            update={"storage_path": str(Path(cfg.tune.storage_path).resolve())}
        )
        cfg = cfg.model_copy(update={"tune": tune_cfg})
    parent = _parent_run(cfg)
    grid = make_tuner(cfg, parent).fit()
    df = results_table(grid, cfg)
    loc, _ = _storage(cfg)
    results_uri = loc.join(cfg.tune.name, "results").uri
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        df.to_csv(out / "trials.csv", index=False)
        (out / "trials.json").write_text(df.to_json(orient="records", indent=2))
        plots = plot_results(df, out)
        for f in out.iterdir():
            if f.suffix in (".csv", ".json"):
                write_text(f"{results_uri}/{f.name}", f.read_text(), cfg.storage)
            else:
                dest = resolve(f"{results_uri}/{f.name}", cfg.storage)
                dest.filesystem.create_dir(dest.path.rsplit("/", 1)[0], recursive=True)
                with dest.filesystem.open_output_stream(dest.path) as o:
                    o.write(f.read_bytes())
        registry.log_artifacts(parent, str(out), "search")
    summary: dict = {
        "name": cfg.tune.name,
        "trials": len(df),
        "errored": int((df["status"] == "ERROR").sum()) if len(df) else 0,
        "stopped_early": int(df["stopped_early"].sum()) if len(df) else 0,
        "results": results_uri,
        "plots": [p.name for p in plots],
        "mlflow_parent_run_id": parent,
    }
    if len(df) and df["best_objective"].notna().any():
        best_cfg, trial_id = best_trial_config(cfg, grid)
        summary["best"] = {"trial_id": trial_id, **df.iloc[0].dropna().to_dict()}
        registry.log_metrics(parent, {"best_objective": float(df["best_objective"].iloc[0])})
        registry.log_dict(parent, summary["best"], "search/best_trial.json")
        if register:
            from ray_jobs import export

            summary["registration"] = export.run(best_cfg)
    registry.end_run(parent, "FINISHED")
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def format_summary(s: dict) -> str:
    lines = [
        f"search {s['name']}: {s['trials']} trial{'' if s['trials'] == 1 else 's'} ({s['stopped_early']} stopped early by ASHA, "
        f"{s['errored']} errored) in {s['seconds']} s -> {s['results']}"
    ]
    if "best" in s:
        b = s["best"]
        params = ", ".join(
            f"{k.removeprefix('param.')}={v}" for k, v in b.items() if k.startswith("param.")
        )
        lines.append(f"best trial {b['trial_id']}: objective {b['best_objective']:.4f} ({params})")
    if "registration" in s:
        r = s["registration"]
        lines.append(
            f"registered {r['model_uri']}: {'promoted to champion' if r['promoted'] else 'champion kept'} "
            f"(winner {r['winner']})"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    setup_logging()
    parser = job_parser(__doc__.split("\n\n")[0], job="tune")
    parser.add_argument("--no-register", action="store_true", help="skip export + registration")
    args, cfg = parse_job_args(parser, argv)
    init_ray(args.address)
    summary = search(cfg, register=not args.no_register)
    print(format_summary(summary))
    print(json.dumps({k: v for k, v in summary.items() if k != "registration"}, default=str))
    ray.shutdown()


if __name__ == "__main__":
    main()
