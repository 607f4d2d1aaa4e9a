"""--dry-run of the job CLIs: resolved locations as one JSON line, a clear error on an empty
one, and Ray never started."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ray_jobs import dry_run

# Any attempt to start or join Ray during a test fails it (tests/conftest.py: refuse_ray).
pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("refuse_ray")]
REPO = Path(__file__).resolve().parents[2]

MODULES = {
    "generate": "ray_jobs.generate",
    "prepare": "ray_jobs.prepare",
    "movielens": "ray_jobs.movielens",
    "train": "ray_jobs.train",
    "evaluate": "ray_jobs.evaluate",
    "export": "ray_jobs.export",
    "user_embeddings": "ray_jobs.user_embeddings",
    "tune": "tuning.search",
    "flush_log": "ray_jobs.flush_log",
    # module, then the arguments before the config
    "promote": "ray_jobs.registry promote --version 3",
    "rollback": "ray_jobs.registry rollback",
}
SPLITS = [
    "dataset.train=[s3://b/prepared/train]",
    "dataset.validation=[s3://b/prepared/validation]",
    "dataset.test=[s3://b/prepared/test]",
    "serve.model_uri=models:/unirank@champion",
]


def _dry_run(module: str, argv: list[str], capsys) -> tuple[int, dict | None, str]:
    module, *command = module.split()
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main([*command, *argv, "--dry-run"])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return exit_.value.code or 0, json.loads(lines[-1])["dry_run"] if lines else None, err


def test_every_job_declares_its_locations():
    assert set(dry_run.JOBS) == set(MODULES)


@pytest.mark.parametrize("job", sorted(MODULES))
def test_every_job_cli_prints_resolved_locations(job, capsys):
    code, report, err = _dry_run(MODULES[job], SPLITS, capsys)
    assert code == 0, err
    assert report["job"] == job
    assert report["outputs"], "every job writes something"
    for value in [*report["inputs"].values(), *report["outputs"].values()]:
        assert value and all(value) if isinstance(value, list) else value


def test_train_reports_splits_run_dir_and_tracking(capsys):
    code, report, _ = _dry_run(
        "ray_jobs.train",
        [*SPLITS, "train.storage_path=s3://b/runs", "train.run_name=r1",
         "mlflow.tracking_uri=http://mlflow:5000", "storage.endpoint_url=http://minio:9000"],
        capsys,
    )  # fmt: skip
    assert code == 0
    assert report["inputs"] == {
        "dataset.train": ["s3://b/prepared/train"],
        "dataset.validation": ["s3://b/prepared/validation"],
    }
    assert report["outputs"] == {"train.storage_path/train.run_name": "s3://b/runs/r1"}
    assert report["endpoints"] == {
        "mlflow.tracking_uri": "http://mlflow:5000",
        "storage.endpoint_url": "http://minio:9000",
    }


@pytest.mark.parametrize(
    ("module", "field"),
    [
        ("ray_jobs.train", "dataset.train"),
        ("ray_jobs.evaluate", "dataset.validation"),
        ("ray_jobs.export", "dataset.validation"),
        ("tuning.search", "dataset.train"),
        ("ray_jobs.user_embeddings", "user_embeddings.input"),
    ],
)
def test_empty_location_exits_2_naming_the_field(module, field, capsys):
    # the embedded defaults have no dataset splits
    code, report, err = _dry_run(module, ["serve.model_uri=models:/m@champion"], capsys)
    assert code == 2 and report is None
    assert f"input {field} is empty" in err and "--dry-run" in err


def test_evaluate_checkpoint_argument_replaces_the_run_dir(capsys):
    code, report, _ = _dry_run("ray_jobs.evaluate", [*SPLITS, "--checkpoint", "s3://b/c"], capsys)
    assert code == 0
    assert report["inputs"]["--checkpoint"] == "s3://b/c"
    assert "train.storage_path/train.run_name" not in report["inputs"]


def test_dry_run_through_python_m():
    """The real entrypoint form a RayJob runs."""
    proc = subprocess.run(
        [sys.executable, "-m", "ray_jobs.prepare", "prepare.input=", "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "error: --dry-run: prepare: input prepare.input is empty" in proc.stderr
