"""Fixtures of the training tests: a real MLflow server, small prepared data, one trained run.

``mlflow_server`` reuses the server .ci/run started (UNIRANK_TEST_MLFLOW_URI, with
MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and a bucket ``mlflow`` on
UNIRANK_TEST_S3_ENDPOINT) or starts ``mlflow server`` itself: sqlite backend, artifacts in the
moto S3 server. Clients (this process and every Ray worker) then need MLFLOW_S3_ENDPOINT_URL
and AWS credentials in their environment: they are set here for the session and reach the
workers through the jobs' runtime_env (ray_jobs.registry.worker_env).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
S3_KEY = "testing"

# A tiny model and a few steps: each training run takes seconds (plus Ray Train start-up).
TINY = [
    "model.embedding_dim=8",
    "model.bottom_dims=[32,16]",
    "model.tower_dims=[16]",
    "model.sequence.num_layers=1",
    "model.attention.num_layers=1",
    "train.batch_size=256",
    "train.max_steps_per_epoch=30",
    "train.lr=0.01",
    "train.objective={click: 0.5, checkout: 0.5}",
    "evaluate.bootstrap=50",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_overrides(root, run_name: str, tracking_uri: str, *extra: str) -> list[str]:
    """Overrides of a test run: the smoke data, its own run directory, the test MLflow."""
    return [
        *TINY,
        f"dataset.train=[{root}/prepared/train]",
        f"dataset.validation=[{root}/prepared/validation]",
        f"dataset.test=[{root}/prepared/test]",
        f"train.storage_path={root}/runs",
        f"train.run_name={run_name}",
        f"mlflow.tracking_uri={tracking_uri}",
        f"mlflow.experiment=unirank-tests-{os.getpid()}",
        f"mlflow.registered_model=unirank-test-{os.getpid()}",
        *extra,
    ]


def run_config(root, run_name: str, tracking_uri: str, *extra: str):
    from model.config import load_config

    return load_config(
        REPO / "configs" / "smoke.yaml", train_overrides(root, run_name, tracking_uri, *extra)
    )


# Tests reach the helpers through fixtures ("import conftest" would be ambiguous).
@pytest.fixture(scope="session")
def train_cfg():
    """train_cfg(root, run_name, tracking_uri, *overrides) -> UnirankConfig of a test run."""
    return run_config


@pytest.fixture(scope="session")
def train_args():
    """train_args(root, run_name, tracking_uri, *overrides) -> the command-line overrides."""
    return train_overrides


@pytest.fixture(scope="session")
def trained_run(smoke_data, mlflow_server):
    """One 2-epoch run with 2 DDP workers (fractional CPUs: Ray Data's read tasks need a free
    CPU of the 2), shared by the train, evaluate and export tests."""
    from ray_jobs import train

    cfg = run_config(
        smoke_data,
        "base",
        mlflow_server,
        "train.epochs=2",
        "train.num_workers=2",
        "train.resources_per_worker={CPU: 0.4}",
    )
    return cfg, train.run(cfg)
