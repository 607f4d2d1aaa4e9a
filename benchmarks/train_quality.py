"""Model quality on generated data and on MovieLens: a script, not a test (minutes, not seconds).

    python benchmarks/train_quality.py [--quick] [--skip-movielens]

Synthetic ads: generate -> prepare -> train the multi-task ensemble -> evaluate with a
single-task checkout baseline (same budget), next to two yardsticks scored against the same
labels and weights (see ``checkout_references``): the generator's oracle (true P(checkout),
which knows the users' hidden interests) and the sequence reference (the same formula with the
interest estimated from the user's sequence, as a model with perfect item vectors could).
``--impressions N`` sets the generated size. MovieLens: build -> train -> per use-case
(task_type) AUC of click and engage. Prints one JSON line.
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

from model.config import load_config  # noqa: E402
from model.metrics import auc  # noqa: E402
from ray_jobs import evaluate, train  # noqa: E402
from ray_jobs.common import init_ray  # noqa: E402
from ray_jobs.generate import generate  # noqa: E402
from ray_jobs.movielens import write_movielens  # noqa: E402
from ray_jobs.prepare import prepare  # noqa: E402
from ray_jobs.synthetic import World  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = [
    "model.embedding_dim=16",
    "model.sequence.num_layers=1",
    "train.batch_size=512",
    "train.lr=0.005",
    "train.patience=2",
    "evaluate.bootstrap=200",
]


def checkout_references(root: str, cfg) -> dict:
    """Two yardsticks for the model's checkout AUC on the test rows that carry the label.

    oracle: the generator's true P(checkout) (truth/impressions.p_checkout, joined on
    request_id = "r<impression_id>"). It knows every user's hidden interest vector, which no
    column reveals, so no model can reach it.
    sequence_reference: ``World.sequence_reference``, the same formula with the one hidden
    input replaced by what the logs show: the user's interest is estimated as the mean true
    vector of the items in their sequence (the candidate's, advertiser's and price effects stay
    exact). A model that had learned every item's vector perfectly and pooled the sequence by
    its mean scores this. benchmarks/generator_ceiling.py scores both without a model.
    """
    trained = evaluate.load_trained(cfg)
    pred = evaluate.predict_split(trained.model, trained.processor, cfg, "test", with_ids=True)
    j = list(trained.processor.layout.task_names).index("checkout")
    m = pred["masks"][:, j]
    labels, weight = pred["labels"][m, j], pred["weight"][m]
    ids = pa.array([int(s[1:]) for s in pred["ids"][m]], type=pa.int64())
    truth = pq.read_table(f"{root}/raw/truth/impressions", columns=["impression_id", "p_checkout"])
    p_true = truth["p_checkout"].to_numpy()[pc.index_in(ids, truth["impression_id"]).to_numpy()]
    oracle = auc(labels, p_true, weight)

    cols = ["impression_id", "task_type", "item_id", "advertiser_id", "device", "hour", "price",
            "seq_item_ids"]  # fmt: skip
    raw = pq.read_table(f"{root}/raw/impressions", columns=cols)
    raw = raw.take(pc.index_in(ids, raw["impression_id"]))
    reference = auc(labels, World.build(cfg.generate).sequence_reference(raw), weight)
    return {"oracle": oracle, "sequence_reference": reference, "rows": int(m.sum())}


def synthetic(tmp: str, impressions: int, epochs: int) -> dict:
    cfg = load_config(
        REPO / "configs" / "synthetic_ads.yaml",
        [
            *MODEL,
            f"generate.num_impressions={impressions}",
            f"generate.output={tmp}/raw",
            f"prepare.input={tmp}/raw",
            f"prepare.output={tmp}/prepared",
            f"dataset.train=[{tmp}/prepared/train]",
            f"dataset.validation=[{tmp}/prepared/validation]",
            f"dataset.test=[{tmp}/prepared/test]",
            f"train.storage_path={tmp}/runs",
            f"train.epochs={epochs}",
            "train.objective={click: 0.3, checkout: 0.7}",
            "evaluate.baseline_tasks=[checkout]",
            f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        ],
    )
    generate(cfg)
    prepare(cfg)
    result = train.run(cfg)
    report = evaluate.run(cfg, baselines=True)
    refs = checkout_references(tmp, train.resolve_paths(cfg))
    b = report["baselines"]["checkout"]
    return {
        "impressions": impressions,
        "epochs_run": result.epochs,
        "checkout_test_rows": refs["rows"],
        "checkout_auc_mtl": round(b["mtl_auc"], 4),
        "checkout_auc_single_task": round(b["single_task_auc"], 4),
        "checkout_mtl_minus_single": round(b["delta"], 4),
        "checkout_delta_ci95": [round(v, 4) for v in b["ci95"]],
        "checkout_auc_oracle": round(refs["oracle"], 4),
        "checkout_auc_sequence_reference": round(refs["sequence_reference"], 4),
        "click_auc_mtl": round(report["uncalibrated"]["click"]["pooled"]["auc"], 4),
    }


def movielens(tmp: str, epochs: int, steps: int) -> dict:
    cfg = load_config(
        REPO / "configs" / "movielens.yaml",
        [
            *MODEL,
            f"movielens.source={REPO}/data/ml-latest-small",
            f"movielens.output={tmp}/ml",
            f"dataset.train=[{tmp}/ml/train]",
            f"dataset.validation=[{tmp}/ml/validation]",
            f"dataset.test=[{tmp}/ml/test]",
            f"train.storage_path={tmp}/runs",
            "train.run_name=movielens",
            f"train.epochs={epochs}",
            f"train.max_steps_per_epoch={steps}",
            f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        ],
    )
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
        "--quick", action="store_true", help="50k impressions, 3 epochs; MovieLens 100 steps/epoch"
    )
    p.add_argument("--skip-movielens", action="store_true")
    p.add_argument("--impressions", type=int, help="generated impressions (default 200k)")
    args = p.parse_args()
    impressions, epochs = (50_000, 3) if args.quick else (200_000, 6)
    impressions = args.impressions or impressions
    init_ray(num_cpus=2, object_store_memory=600 * 2**20, include_dashboard=True)
    out = {"benchmark": "train_quality"}
    with tempfile.TemporaryDirectory() as tmp:
        out["synthetic_ads"] = synthetic(f"{tmp}/syn", impressions, epochs)
        if not args.skip_movielens:
            out["movielens"] = movielens(f"{tmp}/ml", epochs, 100 if args.quick else 400)
    ray.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
