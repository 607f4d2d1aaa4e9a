"""ray_jobs.evaluate on the shared trained run: calibrated report, plots, MLflow, baselines."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from ray_jobs import evaluate

pytestmark = pytest.mark.integration


def test_report_per_task_and_task_type_with_a_single_task_baseline(
    trained_run, train_cfg, smoke_data, mlflow_server
):
    _, r = trained_run
    cfg = train_cfg(
        smoke_data, "base", mlflow_server,
        "train.epochs=2", "train.num_workers=2", "train.resources_per_worker={CPU: 0.4}",
        "evaluate.baseline_tasks=[checkout]",
    )  # fmt: skip
    report = evaluate.run(cfg, baselines=True)

    assert report["split"] == "test" and report["rows"] > 1000
    assert report["checkpoint"] == r.checkpoint
    assert set(report["metrics"]) == {"click", "add_to_cart", "checkout", "engage"}
    click = report["metrics"]["click"]
    assert {"pooled", "ads", "notifications", "related_items", "search", "category"} <= set(click)
    assert set(report["metrics"]["checkout"]) == {"pooled", "ads"}  # observed for ads only
    for key in ("auc", "logloss", "ne", "ece", "pred_obs", "count"):
        assert key in click["pooled"]
    # grouped AUC (per user) within each use-case, with the number of users it averages
    assert 0 < click["ads"]["gauc"] < 1 and click["ads"]["gauc_groups"] > 10
    assert "gauc" not in click["pooled"]
    assert click["pooled"]["auc"] > 0.55  # learned something in a few dozen steps
    # calibrated on validation: predicted / observed close to 1 on test
    assert 0.7 < click["pooled"]["pred_obs"] < 1.3
    # the objective is the within-use-case mean, not the pooled AUC
    per_task = [  # on the raw scores: isotonic calibration adds ties that blur the ranking
        np.mean([m["auc"] for tt, m in report["uncalibrated"][t].items() if tt != "pooled"])
        for t in ("click", "checkout")
    ]
    assert report["objective"] == pytest.approx(np.mean(per_task))
    # synthetic data: every cell next to the log reference and the model's share of its lift
    ref = report["reference"]["click"]["ads"]
    assert 0.55 < ref["reference_auc"] < 1
    raw_auc = report["uncalibrated"]["click"]["ads"]["auc"]
    assert ref["share"] == pytest.approx((raw_auc - 0.5) / (ref["reference_auc"] - 0.5))
    assert set(report["reference"]["checkout"]) == {"ads"}
    table = evaluate.format_report(report)
    assert "ref_auc  share" in table
    assert "click        ads" in table and "pooled across use-cases" in table
    corr = report["label_correlation"]
    assert corr["tasks"] == ["click", "add_to_cart", "checkout", "engage"]
    assert corr["corr"][0][0] == 1.0 and corr["rows"][1][3] == 0  # never both observed

    b = report["baselines"]["checkout"]
    assert b["run"] == "base-single-checkout" and b["rows"] > 100
    lo, hi = b["ci95"]
    assert math.isfinite(b["single_task_auc"]) and lo <= b["delta"] <= hi
    assert b["delta"] == pytest.approx(b["mtl_auc"] - b["single_task_auc"])

    out = Path(report["output"])
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["objective"] == pytest.approx(report["objective"])
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == [
        "add_to_cart.png", "checkout.png", "click.png", "engage.png",
    ]  # fmt: skip
    client = MlflowClient(cfg.mlflow.tracking_uri)
    names = {a.path for a in client.list_artifacts(r.mlflow_run_id, "eval")}
    assert {"eval/report.json", "eval/plots"} <= names
    logged = client.get_run(r.mlflow_run_id).data.metrics
    assert logged["test/click/pooled/auc"] == pytest.approx(click["pooled"]["auc"])
    assert logged["test/click/ads/gauc"] == pytest.approx(click["ads"]["gauc"])
