"""The training job on other sources without code changes: a bring-your-own parquet config
(configs/byo_example.yaml over the MovieLens examples) and splits + checkpoints on S3 (moto)."""

import math

import pyarrow.fs as pafs
import pytest

from model.config import load_config
from model.storage import resolve
from ray_jobs import evaluate, train

pytestmark = pytest.mark.e2e

BUDGET = ["train.epochs=1", "train.max_steps_per_epoch=8", "evaluate.bootstrap=0"]


def test_byo_parquet_config_trains_and_reports_per_use_case(
    ray_cluster, movielens_root, tmp_path, train_args
):
    root, _, _ = movielens_root
    cfg = load_config(
        "configs/byo_example.yaml",
        [
            *train_args(tmp_path, "byo", f"sqlite:///{tmp_path}/mlflow.db", *BUDGET),
            f"dataset.train=[{root}/train/*.parquet]",
            f"dataset.validation=[{root}/validation]",
            f"dataset.test=[{root}/test]",
            "train.objective={click: 0.3, engage: 0.7}",
        ],
    )
    result = train.run(cfg, track=False)
    assert result.epochs == 1 and result.checkpoint
    report = evaluate.run(cfg)
    # the foreign spec's tasks and use-cases, not the synthetic ones
    assert set(report["metrics"]) == {"click", "engage"}
    for task in ("click", "engage"):
        by_type = report["metrics"][task]
        assert {"notifications", "related_items", "search", "category"} <= set(by_type)
        assert all(math.isfinite(m["auc"]) for m in by_type.values() if m["count"] > 100)


def test_a_dataset_without_task_type_logs_valid_mlflow_names(
    ray_cluster, movielens_root, tmp_path, train_args
):
    """No task_type column: every row is one use-case, ``unknown``; MLflow accepts every
    epoch's metrics (it rejected ``val/click/<unknown>/auc``) and the objective is finite."""
    from mlflow.tracking import MlflowClient

    root, _, _ = movielens_root
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(
        "configs/byo_example.yaml",
        [
            *train_args(tmp_path, "no-type", tracking, *BUDGET),
            f"dataset.train=[{root}/train/*.parquet]",
            f"dataset.validation=[{root}/validation]",
            f"dataset.test=[{root}/test]",
            "dataset.features.task_type_column=null",
            "train.objective={click: 0.3, engage: 0.7}",
        ],
    )
    result = train.run(cfg)
    assert math.isfinite(result.best_objective)
    logged = MlflowClient(tracking).get_run(result.mlflow_run_id).data.metrics
    assert {"val/objective", "val/click/unknown/auc", "val/engage/unknown/auc"} <= set(logged)
    assert logged["val/objective"] == pytest.approx(
        0.3 * logged["val/click/unknown/auc"] + 0.7 * logged["val/engage/unknown/auc"]
    )
    report = evaluate.run(cfg)
    assert set(report["metrics"]["click"]) == {"pooled", "unknown"}


def test_train_and_evaluate_on_s3(ray_cluster, smoke_data, s3_bucket, tmp_path, train_args):
    bucket, storage = s3_bucket
    cfg = load_config(
        "configs/smoke.yaml",
        [
            *storage,
            *train_args(f"s3://{bucket}", "on-s3", f"sqlite:///{tmp_path}/mlflow.db", *BUDGET),
        ],
    )
    dest = resolve(f"s3://{bucket}/prepared", cfg.storage)
    pafs.copy_files(str(smoke_data / "prepared"), dest.path, destination_filesystem=dest.filesystem)
    result = train.run(cfg, track=False)
    assert result.checkpoint == f"s3://{bucket}/runs/on-s3/epoch_0001"
    fs = dest.filesystem
    state = fs.get_file_info(f"{bucket}/runs/on-s3/epoch_0001/state.json")
    assert state.type == pafs.FileType.File
    report = evaluate.run(cfg)
    assert report["output"] == f"s3://{bucket}/runs/on-s3/eval"
    assert fs.get_file_info(f"{bucket}/runs/on-s3/eval/report.json").type == pafs.FileType.File
    assert math.isfinite(report["metrics"]["click"]["pooled"]["auc"])
