"""Offline evaluation of a trained run: per task x task_type, calibrated, vs single-task models.

    python -m ray_jobs.evaluate [CONFIG] [section.field=value ...] [--baselines] [--checkpoint URI]

Loads the run's best weights (``train.run_name``'s latest checkpoint, or ``--checkpoint``),
fits calibrators on the validation split and reports on ``evaluate.split`` (test) per task x
task_type: AUC, logloss, normalized entropy, calibration error (ECE) and predicted/observed,
plus the correlation between task labels. Writes ``report.json`` and one plot per task (ROC
and reliability diagram) to ``evaluate.output`` (default ``<run dir>/eval``) and logs them to
the run's MLflow run.

``--baselines`` trains one single-task model per task (``evaluate.baseline_tasks``) with the
same budget (epochs, steps, batch size, early stopping) and reports each task's MTL minus
single-task AUC with a paired bootstrap 95% confidence interval over the evaluation rows.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from model.calibration import Calibrators
from model.config import UnirankConfig, config_from_dict
from model.ensemble import build_model
from model.features import FeatureProcessor
from model.metrics import POOLED, auc, evaluate
from model.storage import Location, resolve
from ray_jobs import registry
from ray_jobs.common import init_ray, job_parser, parse_job_args, setup_logging, write_json
from ray_jobs.train import (
    checkpoint_location,
    fetch_checkpoint,
    latest_checkpoint,
    read_split,
    resolve_paths,
)
from ray_jobs.train_loop import (
    BEST_MODEL_FILE,
    CONFIG_FILE,
    PROCESSOR_FILE,
    TrainState,
    flat_metrics,
    group_column,
    load_state,
    objective_value,
)

log = logging.getLogger("unirank.evaluate")


# --------------------------------------------------------------------------- loading


@dataclass
class Trained:
    """A run's best weights, ready to predict."""

    model: nn.Module
    processor: FeatureProcessor
    cfg: UnirankConfig  # the config it was trained with (from the checkpoint)
    checkpoint: Location
    state: TrainState


def load_trained(cfg: UnirankConfig, checkpoint: str | None = None) -> Trained:
    """The best weights of ``checkpoint`` (a checkpoint or run directory) or of the run's
    latest checkpoint."""
    loc = checkpoint_location(checkpoint, cfg) if checkpoint else latest_checkpoint(cfg)
    if loc is None:
        raise FileNotFoundError(
            f"run {cfg.train.run_name!r} has no checkpoint under {registry.run_dir(cfg).uri}; "
            f"train it first (python -m ray_jobs.train ...)"
        )
    d = fetch_checkpoint(loc)
    trained_cfg = config_from_dict(yaml.safe_load((d / CONFIG_FILE).read_text()), loc.uri)
    model = build_model(trained_cfg)
    model.load_state_dict(torch.load(d / BEST_MODEL_FILE, map_location="cpu"))
    processor = FeatureProcessor.from_state_dict(
        trained_cfg.dataset, json.loads((d / PROCESSOR_FILE).read_text())
    )
    return Trained(model.eval(), processor, trained_cfg, loc, load_state(d))


def predict_split(
    model: nn.Module | None,
    processor: FeatureProcessor,
    cfg: UnirankConfig,
    split: str,
    run_fn=None,
    batch_size: int = 4096,
    with_ids: bool = False,
    score_table=None,
    extra: list[str] | None = None,
) -> dict:
    """Stream a split through the feature path and the model (driver side).

    Returns preds {task: probabilities}, labels (n, T), masks (n, T), task_type ids (n,),
    weight (n,), group (n,) = ids of ``evaluate.group_by`` (for grouped AUC) when the dataset
    has that feature, and ids (n,) = request_id with ``with_ids``.
    ``run_fn(batch) -> {task: probs}`` replaces the eager model (e.g. an exported predictor's
    ``run``); ``score_table(table) -> {task: probs}`` scores from the raw columns instead
    (e.g. the log reference), with ``extra`` columns read besides the model's.
    """
    extra = [*(extra or []), *(["request_id"] if with_ids else [])]
    ds = read_split(cfg, split, validate=False, extra=extra)
    group_col = group_column(processor, cfg.evaluate.group_by)
    preds: dict[str, list] = {}
    keys = ("labels", "masks", "task_type", "weight", "ids", "group")
    parts: dict[str, list] = {k: [] for k in keys}
    for table in ds.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        b = processor(table)
        if score_table is not None:
            out = score_table(table)
        elif run_fn is not None:
            out = run_fn(b)
        else:
            with torch.inference_mode():
                out = {t: torch.sigmoid(z).numpy() for t, z in model(*b.inputs()).items()}
        for t, p in out.items():
            preds.setdefault(t, []).append(np.asarray(p, dtype=np.float64))
        parts["labels"].append(b.labels.numpy())
        parts["masks"].append(b.label_mask.numpy())
        parts["task_type"].append(b.task_type.numpy())
        parts["weight"].append(b.weight.numpy())
        if group_col is not None:
            parts["group"].append(b.sparse[:, group_col].numpy())
        if with_ids and "request_id" in table.column_names:
            parts["ids"].append(table.column("request_id").to_numpy(zero_copy_only=False))
    if not parts["weight"]:
        raise ValueError(f"dataset.{split}: no rows")
    return {
        "preds": {t: np.concatenate(v) for t, v in preds.items()},
        **{k: np.concatenate(v) for k, v in parts.items() if v},
    }


def reference_metrics(cfg: UnirankConfig, processor: FeatureProcessor, split: str) -> dict | None:
    """Per task x task_type metrics of the log reference (``ray_jobs.reference``) on the same
    rows, for synthetic data only (the generator's world is rebuilt from ``cfg.generate``,
    which must be the config the data was generated with); None for other sources."""
    if cfg.dataset.source != "synthetic":
        return None
    from model.synthetic import World
    from ray_jobs.reference import COLUMNS, log_reference

    world = World.build(cfg.generate)
    names = processor.layout.task_names

    def score(table) -> dict:
        ref = log_reference(world, table)
        return {t: ref.get(t, np.full(table.num_rows, np.nan)) for t in names}

    pred = predict_split(None, processor, cfg, split, score_table=score, extra=list(COLUMNS))
    return split_metrics(pred, processor)


def reference_shares(metrics: dict, reference: dict) -> dict:
    """{task: {task_type: {"reference_auc", "share"}}}: the model's share of the reference's
    lift over chance in every within-use-case cell."""
    from ray_jobs.reference import lift_share

    out: dict = {}
    for task, by_type in metrics.items():
        for tt, m in by_type.items():
            ref = reference.get(task, {}).get(tt, {}).get("auc")
            if tt != POOLED and ref is not None:
                out.setdefault(task, {})[tt] = {
                    "reference_auc": ref,
                    "reference_gauc": reference[task][tt].get("gauc"),
                    "share": lift_share(m.get("auc"), ref),
                }
    return out


def fit_calibrators(cfg: UnirankConfig, processor: FeatureProcessor, val: dict) -> Calibrators:
    """Calibrators on validation predictions. Sample weights undo negative down-sampling,
    so no extra r-correction is needed."""
    e = cfg.evaluate
    tasks = list(processor.layout.task_names)
    if e.calibration == "none":
        return Calibrators.identity(tasks)
    names = np.asarray(processor.layout.task_types, dtype=object)[val["task_type"]]
    return Calibrators.fit(
        val["preds"], val["labels"], val["masks"], tasks, method=e.calibration,
        task_type=names, per_task_type=e.per_task_type_calibration, weight=val["weight"],
    )  # fmt: skip


def split_metrics(pred: dict, processor: FeatureProcessor, preds: dict | None = None) -> dict:
    lay = processor.layout
    return evaluate(
        preds if preds is not None else pred["preds"],
        pred["labels"],
        pred["masks"],
        lay.task_names,
        pred["task_type"],
        lay.task_types,
        pred["weight"],
        pred.get("group"),
    )


# --------------------------------------------------------------------------- report pieces


def label_correlation(pred: dict, task_names: list[str]) -> dict:
    """Pearson (phi for binary labels) correlation of each task pair on rows with both."""
    y, m = pred["labels"].astype(np.float64), pred["masks"]
    n = len(task_names)
    matrix = [[None] * n for _ in range(n)]
    rows = [[0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            both = m[:, i] & m[:, j]
            rows[i][j] = int(both.sum())
            a, b = y[both, i], y[both, j]
            if both.sum() > 2 and a.std() > 0 and b.std() > 0:
                matrix[i][j] = round(float(np.corrcoef(a, b)[0, 1]), 4)
    return {"tasks": task_names, "corr": matrix, "rows": rows}


def bootstrap_delta(
    y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, w: np.ndarray, n: int, seed: int
) -> dict:
    """AUC(a) - AUC(b) on the same rows, with a paired bootstrap 95% interval."""
    delta = auc(y, p_a, w) - auc(y, p_b, w)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        d = auc(y[idx], p_a[idx], w[idx]) - auc(y[idx], p_b[idx], w[idx])
        if math.isfinite(d):
            draws.append(d)
    lo, hi = np.percentile(draws, [2.5, 97.5]).tolist() if draws else [None, None]
    return {"delta": delta, "ci95": [lo, hi], "bootstrap": len(draws)}


def plot_task(task: str, y: np.ndarray, p: np.ndarray, w: np.ndarray, path: Path) -> None:
    """ROC curve and reliability diagram (10 equal-width bins) of one task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 4))
    order = np.argsort(-p, kind="mergesort")
    ys, ws = y[order], w[order]
    tp = np.concatenate([[0], np.cumsum(ws * ys)])
    fp = np.concatenate([[0], np.cumsum(ws * (1 - ys))])
    if tp[-1] > 0 and fp[-1] > 0:
        ax1.plot(fp / fp[-1], tp / tp[-1], label=f"AUC {auc(y, p, w):.3f}")
    ax1.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax1.set(title=f"{task}: ROC", xlabel="false positive rate", ylabel="true positive rate")
    ax1.legend(loc="lower right")
    bins = np.clip((p * 10).astype(int), 0, 9)
    wb = np.bincount(bins, weights=w, minlength=10)
    ok = wb > 0
    mp = np.bincount(bins, weights=w * p, minlength=10)[ok] / wb[ok]
    my = np.bincount(bins, weights=w * y, minlength=10)[ok] / wb[ok]
    ax2.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax2.plot(mp, my, "o-")
    ax2.set(title=f"{task}: reliability", xlabel="mean prediction", ylabel="observed rate")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _clean(x):
    """JSON-safe: NaN / inf -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


# --------------------------------------------------------------------------- baselines


def baseline_config(cfg: UnirankConfig, task: str) -> UnirankConfig:
    """Same data, model and budget; only ``task`` is trained (and is the objective)."""
    d = cfg.model_dump(mode="json")
    d["dataset"]["tasks"] = [t for t in d["dataset"]["tasks"] if t["name"] == task]
    d["train"]["objective"] = {task: 1.0}
    d["train"]["run_name"] = f"{cfg.train.run_name}-single-{task}"
    d["train"]["init_from"] = None
    return config_from_dict(d, f"<baseline {task}>")


def run_baselines(cfg: UnirankConfig, mtl: dict, processor: FeatureProcessor) -> dict:
    from ray_jobs import train

    tasks = cfg.evaluate.baseline_tasks or [t.name for t in cfg.dataset.tasks]
    names = list(processor.layout.task_names)
    out = {}
    for task in tasks:
        if task not in names:
            raise ValueError(f"evaluate.baseline_tasks: {task!r} is not a task of this model")
        bcfg = baseline_config(cfg, task)
        train.run(bcfg)
        single = load_trained(bcfg)
        pred = predict_split(single.model, single.processor, bcfg, cfg.evaluate.split)
        j = names.index(task)
        m = mtl["masks"][:, j]
        y, w = mtl["labels"][m, j].astype(np.float64), mtl["weight"][m].astype(np.float64)
        p_mtl, p_single = mtl["preds"][task][m], pred["preds"][task][m]
        delta = bootstrap_delta(y, p_mtl, p_single, w, cfg.evaluate.bootstrap, cfg.evaluate.seed)
        out[task] = {
            "mtl_auc": auc(y, p_mtl, w),
            "single_task_auc": auc(y, p_single, w),
            **delta,
            "rows": int(m.sum()),
            "run": bcfg.train.run_name,
        }
        log.info(
            "%s: MTL AUC %.4f vs single-task %.4f: delta %+.4f (95%% CI %s)",
            task, out[task]["mtl_auc"], out[task]["single_task_auc"], delta["delta"],
            [None if v is None else round(v, 4) for v in delta["ci95"]],
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------- the job


def output_location(cfg: UnirankConfig) -> Location:
    if cfg.evaluate.output:
        return resolve(cfg.evaluate.output, cfg.storage)
    return registry.run_dir(cfg).join("eval")


def run(
    cfg: UnirankConfig,
    baselines: bool = False,
    checkpoint: str | None = None,
    address: str | None = None,
) -> dict:
    """Evaluate the run's best checkpoint; returns the report (also written as JSON)."""
    cfg = resolve_paths(cfg)
    init_ray(address)
    trained = load_trained(cfg, checkpoint)
    proc, names = trained.processor, list(trained.processor.layout.task_names)
    # Data locations come from the current config; the model from its checkpoint.
    val = predict_split(trained.model, proc, cfg, "validation")
    calibrators = fit_calibrators(cfg, proc, val)
    split = cfg.evaluate.split
    pred = predict_split(trained.model, proc, cfg, split)
    type_names = np.asarray(proc.layout.task_types, dtype=object)[pred["task_type"]]
    calibrated = calibrators.apply(pred["preds"], type_names)
    raw = split_metrics(pred, proc)
    reference = reference_metrics(cfg, proc, split)
    report = {
        "run": cfg.train.run_name,
        "checkpoint": trained.checkpoint.uri,
        "best_epoch": trained.state.best_epoch,
        "split": split,
        "rows": int(len(pred["weight"])),
        "objective": objective_value(raw, trained.cfg.train),
        "objective_definition": objective_definition(trained.cfg),
        "calibration": {
            "method": cfg.evaluate.calibration,
            "per_task_type": cfg.evaluate.per_task_type_calibration,
            "fitted_on": "validation",
            "rows": int(len(val["weight"])),
        },
        "metrics": split_metrics(pred, proc, calibrated),
        "uncalibrated": raw,
        **({} if reference is None else {"reference": reference_shares(raw, reference)}),
        "label_correlation": label_correlation(pred, names),
    }
    if baselines:
        report["baselines"] = run_baselines(cfg, pred, proc)
    report = _clean(report)

    out = output_location(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        plots = Path(tmp) / "plots"
        plots.mkdir()
        for j, task in enumerate(names):
            m = pred["masks"][:, j]
            if m.any():
                y, w = pred["labels"][m, j].astype(np.float64), pred["weight"][m]
                plot_task(task, y, calibrated[task][m], w, plots / f"{task}.png")
        report["plots"] = sorted(f"plots/{p.name}" for p in plots.iterdir())
        (Path(tmp) / "report.json").write_text(json.dumps(report, indent=1))
        out.filesystem.create_dir(out.path, recursive=True)
        import pyarrow.fs as pafs

        pafs.copy_files(tmp, out.path, destination_filesystem=out.filesystem)
        run_id = registry.run_id_of(cfg)
        if run_id:
            registry.log_artifacts(run_id, tmp, "eval")
            flat = flat_metrics(split, report["metrics"])
            flat[f"{split}/objective"] = report["objective"]
            registry.log_metrics(run_id, flat)
    report["output"] = out.uri
    report["mlflow_run_id"] = registry.run_id_of(cfg)
    write_json(out.join("report.json").uri, report, cfg.storage)
    return report


def objective_definition(cfg: UnirankConfig) -> dict:
    """What ``objective`` means in a report or a registry tag (``train.objective*``)."""
    t = cfg.train
    return {
        "metric": f"within-use-case {t.objective_metric}",
        "task_weights": t.objective,
        "task_type_weights": t.objective_task_types or "equal",
    }


def _f(v, spec: str) -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, spec)


def format_report(r: dict) -> str:
    """The within-use-case table (one row per task x task_type, with the log reference and
    the model's share of its lift when the data is synthetic), then the pooled rows."""
    head = f"{r['run']} on {r['split']} ({r['rows']} rows)"
    refs = r.get("reference") or {}
    lines = [
        f"{head}, objective {_f(r['objective'], '.4f')} "
        f"(mean {r['objective_definition']['metric']} over task x task_type)",
        f"  {'task':<12} {'task_type':<14} {'rows':>7} {'auc':>6} {'gauc':>6} {'users':>6} "
        f"{'ne':>6} {'ece':>6} {'pred/obs':>8}" + ("  ref_auc  share" if refs else ""),
    ]

    raw = r.get("uncalibrated") or r["metrics"]

    def row(task: str, tt: str, m: dict) -> str:
        ref = refs.get(task, {}).get(tt)
        tail = f"  {_f(ref['reference_auc'], '7.3f')} {_f(ref['share'], '6.2f')}" if ref else ""
        rank = raw.get(task, {}).get(tt, m)  # ranking from raw scores (no isotonic ties)
        return (
            f"  {task:<12} {tt:<14} {m['count']:>7} {_f(rank['auc'], '6.3f')} "
            f"{_f(rank.get('gauc'), '6.3f')} {rank.get('gauc_groups') or '-':>6} "
            f"{_f(m['ne'], '6.3f')} {_f(m['ece'], '6.4f')} {_f(m['pred_obs'], '8.3f')}" + tail
        )

    for task, by in r["metrics"].items():
        lines += [row(task, tt, m) for tt, m in by.items() if tt != POOLED]
    lines.append("  auc / gauc from raw scores; ne / ece / pred/obs after calibration")
    if refs:
        lines.append(
            "  share = (auc - 0.5) / (ref_auc - 0.5); ref_auc = the generator's formula fed "
            "from the logged columns (ray_jobs.reference)"
        )
    lines.append("  pooled across use-cases (base-rate gaps inflate it; not an objective):")
    lines += [row(task, POOLED, by[POOLED]) for task, by in r["metrics"].items() if POOLED in by]
    for task, b in r.get("baselines", {}).items():
        lo, hi = b["ci95"]
        lines.append(
            f"  MTL - single-task {task}: {b['delta']:+.4f} (95% CI {lo:+.4f} .. {hi:+.4f})"
            if lo is not None
            else f"  MTL - single-task {task}: {b['delta']}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    setup_logging()
    parser = job_parser(__doc__.split("\n\n")[0], job="evaluate")
    parser.add_argument("--baselines", action="store_true", help="train single-task baselines")
    parser.add_argument("--checkpoint", default=None, help="checkpoint or run directory")
    args, cfg = parse_job_args(parser, argv)
    report = run(cfg, baselines=args.baselines, checkpoint=args.checkpoint, address=args.address)
    print(format_report(report))
    print(json.dumps({"evaluate": {"output": report["output"], "objective": report["objective"]}}))


if __name__ == "__main__":
    main()
