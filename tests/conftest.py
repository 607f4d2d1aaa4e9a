"""Session fixtures: one local Ray cluster, real services on 127.0.0.1.

Services are reused when .ci/run (or you) started them and exported their address
(UNIRANK_TEST_S3_ENDPOINT, UNIRANK_TEST_MLFLOW_URI, UNIRANK_TEST_REDIS_URL); otherwise the
fixture starts its own and stops it at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
S3_KEY = "testing"
MLFLOW_BUCKET = "mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@pytest.fixture
def refuse_ray():
    """Starting or joining Ray fails the test, even when the session's cluster is already up
    in this process (then ``ray.is_initialized()`` alone would say nothing): for code paths
    that must not touch Ray, such as every job's ``--dry-run``."""
    from unittest import mock

    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("this code path started or joined Ray")

    with (
        mock.patch.object(ray, "is_initialized", return_value=False),
        mock.patch.object(ray, "init", side_effect=refuse),
    ):
        yield


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session: 2 CPUs, a small object store."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            object_store_memory=400 * 1024 * 1024,
            # The dashboard serves the State API, which Ray Train's PlacementGroupCleaner
            # needs: without it a trainer killed mid-run (a trial ASHA stops) leaks its
            # placement group, and the next job on these 2 CPUs waits forever.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
        )
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real moto S3 server on 127.0.0.1; yields its endpoint URL."""
    endpoint = os.environ.get("UNIRANK_TEST_S3_ENDPOINT")
    proc = None
    if not endpoint:
        port = free_port()
        proc = subprocess.Popen(
            [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(port, proc=proc)
        endpoint = f"http://127.0.0.1:{port}"
    yield endpoint
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket; yields (bucket, storage overrides for the config tree)."""
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_KEY,
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=bucket)
    overrides = [
        f"storage.endpoint_url={s3_endpoint}",
        f"storage.access_key_id={S3_KEY}",
        f"storage.secret_access_key={S3_KEY}",
        "storage.region=us-east-1",
    ]
    yield bucket, overrides


@pytest.fixture
def workdir(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint, tmp_path_factory):
    """Tracking URI of a real MLflow server whose artifacts live in the moto S3 server."""
    env_before = dict(os.environ)
    uri = os.environ.get("UNIRANK_TEST_MLFLOW_URI")
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or s3_endpoint
    os.environ.update(
        {
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", S3_KEY),
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", S3_KEY),
            "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        }
    )
    proc, log = None, None
    if not uri:
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=MLFLOW_BUCKET)
        workdir = tmp_path_factory.mktemp("mlflow")
        port = free_port()
        log = open(workdir / "server.log", "w")  # noqa: SIM115 - closed at teardown
        proc = subprocess.Popen(
            [
                str(VENV_BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{workdir}/mlflow.db",
                "--default-artifact-root",
                f"s3://{MLFLOW_BUCKET}/artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],  # fmt: skip
            stdout=log,
            stderr=subprocess.STDOUT,
            # No job runner: it forks a dozen huey consumers that eat this 2-core machine.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not _healthy(uri):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"mlflow server did not become healthy; see {log.name}")
            time.sleep(0.5)
    yield uri
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    os.environ.clear()
    os.environ.update(env_before)


@pytest.fixture(scope="session")
def smoke_data(ray_cluster, tmp_path_factory):
    """~20k generated impressions, prepared with default settings; returns the root."""
    from model.config import load_config
    from ray_jobs.generate import generate
    from ray_jobs.prepare import prepare

    root = tmp_path_factory.mktemp("train_data")
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        [
            f"generate.output={root}/raw",
            f"prepare.input={root}/raw",
            f"prepare.output={root}/prepared",
        ],
    )
    generate(cfg)
    prepare(cfg)
    return root


@pytest.fixture(scope="session")
def redis_url():
    """A real redis-server on 127.0.0.1 (UNIRANK_TEST_REDIS_URL when CI started one)."""
    url = os.environ.get("UNIRANK_TEST_REDIS_URL")
    if url:
        yield url
        return
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: apt-get install -y redis-server")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"redis-server did not start on port {port}")
        time.sleep(0.1)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def movielens_root(tmp_path_factory):
    """The vendored MovieLens data as unified examples (python -m ray_jobs.movielens)."""
    from model.config import load_config
    from ray_jobs.movielens import write_movielens

    out = tmp_path_factory.mktemp("ml") / "movielens"
    cfg = load_config(REPO / "configs" / "movielens.yaml", [f"movielens.output={out}"])
    return out, cfg, write_movielens(cfg)
