"""Model quality on generated data and on MovieLens: a script, not a test (minutes, not seconds).

    python benchmarks/train_quality.py [--quick] [--skip-movielens]

Synthetic ads: generate -> prepare -> train the multi-task ensemble -> evaluate with a
single-task checkout baseline (same budget). Every task x task_type cell of the test split
(``cells``) gets the model's AUC next to two yardsticks scored against the same labels and
weights (see ``use_case_cells``): the log reference (``ray_jobs.reference``: the generator's
formula fed from the logged columns, what a model with perfect item knowledge could score) and
the generator's oracle (true probabilities, which read the users' hidden interests), and the
model's share of the reference's lift, (AUC - 0.5) / (ref - 0.5). Quality is read within each
use-case; the pooled click AUC is printed only to show how base-rate gaps inflate it.
``--impressions N`` sets the generated size; ``--data ROOT`` reuses an existing generate +
prepare output instead (``ROOT/raw`` with its ``truth/``, ``ROOT/prepared``). MovieLens: build
-> train -> per use-case (task_type) AUC of click and engage; ``--movielens-data DIR`` reuses
an existing ``python -m ray_jobs.movielens`` output. Prints one JSON line.

The reuse options are how tests/benchmarks runs ``--quick`` on the session's data: generate +
prepare and the MovieLens build are tested on their own, and paying them again here would
only add minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402

from benchmarks._util import emit, start_ray  # noqa: E402
from model.config import load_config  # noqa: E402
from model.metrics import auc  # noqa: E402
from ray_jobs import evaluate, train  # noqa: E402
from ray_jobs.generate import generate  # noqa: E402
from ray_jobs.movielens import write_movielens  # noqa: E402
from ray_jobs.prepare import prepare  # noqa: E402
from ray_jobs.reference import lift_share  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = [
    "model.embedding_dim=16",
    "model.sequence.num_layers=1",
    "train.batch_size=512",
    "train.lr=0.005",
    "train.patience=2",
    "evaluate.bootstrap=200",
]


def _round(x: float | None, digits: int) -> float | None:
    """JSON-safe: None stays None (strict JSON has no NaN)."""
    return None if x is None else round(x, digits)


def use_case_cells(root: str, cfg, report: dict) -> dict:
    """Per task x task_type on the test split: the model's AUC (uncalibrated), the log
    reference's (``ray_jobs.reference``, computed by ``ray_jobs.evaluate``), the oracle's and
    the model's share of the reference's lift, all on the same rows, labels and weights.

    oracle: the generator's true probability of each impression (truth/impressions.p_<task>,
    joined on request_id = "r<impression_id>"). It reads every user's hidden interest, which no
    column reveals, so no model can reach it; ``oracle_share`` = how much of the oracle's lift
    the logs carry at all (reference vs oracle).
    """
    trained = evaluate.load_trained(cfg)
    proc = trained.processor
    pred = evaluate.predict_split(trained.model, proc, cfg, "test", with_ids=True)
    ids = pa.array([int(s[1:]) for s in pred["ids"]], type=pa.int64())
    tasks = list(proc.layout.task_names)
    truth = pq.read_table(
        f"{root}/raw/truth/impressions", columns=["impression_id", *(f"p_{t}" for t in tasks)]
    )
    rows = pc.index_in(ids, truth["impression_id"]).to_numpy()
    oracle = evaluate.split_metrics(
        pred, proc, {t: truth[f"p_{t}"].to_numpy()[rows] for t in tasks}
    )
    cells = {}
    for task, by_type in report["uncalibrated"].items():
        for tt, m in by_type.items():
            ref = report.get("reference", {}).get(task, {}).get(tt)
            if tt == "pooled" or ref is None:
                continue
            o = oracle[task][tt]["auc"]
            cells[f"{task}/{tt}"] = {
                "rows": m["count"],
                "auc": round(m["auc"], 4),
                "reference_auc": round(ref["reference_auc"], 4),
                "oracle_auc": round(o, 4),
                "share_of_reference": _round(ref["share"], 3),
                "oracle_share": _round(lift_share(ref["reference_auc"], o), 3),
            }
    return cells


def unseen_items(cfg) -> dict:
    """Per task, the model's AUC on test rows whose candidate item never occurs in the train
    split (cold-start items: only content features and the context can rank them)."""
    trained = evaluate.load_trained(cfg)
    proc = trained.processor
    pred = evaluate.predict_split(trained.model, proc, cfg, "test", with_ids=True)
    seen = pq.read_table(cfg.dataset.train[0], columns=["item_id"])["item_id"]
    test_items = pq.read_table(cfg.dataset.test[0], columns=["request_id", "item_id"])
    order = pc.index_in(pa.array(pred["ids"]), test_items["request_id"]).to_numpy()
    items = test_items["item_id"].to_numpy()[order]
    cold = ~pc.is_in(pa.array(items), value_set=pc.unique(seen)).to_numpy(zero_copy_only=False)
    out = {"rows": int(cold.sum())}
    for j, task in enumerate(proc.layout.task_names):
        m = pred["masks"][:, j] & cold
        y, w = pred["labels"][m, j], pred["weight"][m]
        if 0 < y.sum() < len(y):
            out[task] = round(auc(y, pred["preds"][task][m], w), 4)
    return out


def synthetic(tmp: str, impressions: int, epochs: int, data: str | None = None) -> dict:
    """``data``: an existing generate + prepare output to train on instead of generating
    ``impressions`` under ``tmp``."""
    root = data or tmp
    cfg = load_config(
        REPO / "configs" / "synthetic_ads.yaml",
        [
            *MODEL,
            f"generate.num_impressions={impressions}",
            f"generate.output={root}/raw",
            f"prepare.input={root}/raw",
            f"prepare.output={root}/prepared",
            f"dataset.train=[{root}/prepared/train]",
            f"dataset.validation=[{root}/prepared/validation]",
            f"dataset.test=[{root}/prepared/test]",
            f"train.storage_path={tmp}/runs",
            f"train.epochs={epochs}",
            "train.objective={click: 0.3, checkout: 0.7}",
            "evaluate.baseline_tasks=[checkout]",
            f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        ],
    )
    if data is None:
        generate(cfg)
        prepare(cfg)
    else:
        summary = json.loads(Path(root, "prepared", "reports", "summary.json").read_text())
        impressions = summary["rows_in"]
    result = train.run(cfg)
    report = evaluate.run(cfg, baselines=True)
    cells = use_case_cells(root, train.resolve_paths(cfg), report)
    b = report["baselines"]["checkout"]
    shares = [
        c["share_of_reference"] for c in cells.values() if c["share_of_reference"] is not None
    ]
    return {
        "impressions": impressions,
        "epochs_run": result.epochs,
        "objective": round(report["objective"], 4),
        "min_share_of_reference": min(shares) if shares else None,
        "cells": cells,
        "unseen_items_auc": unseen_items(train.resolve_paths(cfg)),
        "checkout_test_rows": cells["checkout/ads"]["rows"],
        "checkout_auc_mtl": round(b["mtl_auc"], 4),
        "checkout_auc_single_task": round(b["single_task_auc"], 4),
        "checkout_mtl_minus_single": round(b["delta"], 4),
        "checkout_delta_ci95": [round(v, 4) for v in b["ci95"]],
        "checkout_auc_oracle": cells["checkout/ads"]["oracle_auc"],
        "checkout_auc_reference": cells["checkout/ads"]["reference_auc"],
        "click_auc_pooled_not_an_objective": round(
            report["uncalibrated"]["click"]["pooled"]["auc"], 4
        ),
    }


def movielens(tmp: str, epochs: int, steps: int, data: str | None = None) -> dict:
    """``data``: an existing MovieLens build (its train/validation/test) instead of one under
    ``tmp``."""
    built = data or f"{tmp}/ml"
    cfg = load_config(
        REPO / "configs" / "movielens.yaml",
        [
            *MODEL,
            f"movielens.source={REPO}/data/ml-latest-small",
            f"movielens.output={built}",
            f"dataset.train=[{built}/train]",
            f"dataset.validation=[{built}/validation]",
            f"dataset.test=[{built}/test]",
            f"train.storage_path={tmp}/runs",
            "train.run_name=movielens",
            f"train.epochs={epochs}",
            f"train.max_steps_per_epoch={steps}",
            f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        ],
    )
    if data is None:
        write_movielens(cfg)
    result = train.run(cfg)
    report = evaluate.run(cfg)
    per_use_case = {
        task: {tt: round(m["auc"], 4) for tt, m in by.items() if m.get("auc") is not None}
        for task, by in report["uncalibrated"].items()
    }
    return {"epochs_run": result.epochs, "test_rows": report["rows"], "auc": per_use_case}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--quick", action="store_true", help="20k impressions, 2 epochs; MovieLens 20 steps/epoch"
    )
    p.add_argument("--skip-movielens", action="store_true")
    p.add_argument("--impressions", type=int, help="generated impressions (default 200k)")
    p.add_argument("--data", default=None, help="reuse ROOT/raw + ROOT/prepared, no generate")
    p.add_argument("--movielens-data", default=None, help="reuse a ray_jobs.movielens output")
    args = p.parse_args()
    impressions, epochs = (20_000, 2) if args.quick else (200_000, 6)
    impressions = args.impressions or impressions
    start_ray(num_cpus=2, object_store_memory=600 * 2**20, include_dashboard=True)
    out = {"benchmark": "train_quality", "quick": args.quick}
    with tempfile.TemporaryDirectory() as tmp:
        out["synthetic_ads"] = synthetic(f"{tmp}/syn", impressions, epochs, args.data)
        if not args.skip_movielens:
            steps = 20 if args.quick else 400
            out["movielens"] = movielens(f"{tmp}/ml", epochs, steps, args.movielens_data)
    ray.shutdown()
    emit(out)


if __name__ == "__main__":
    main()
