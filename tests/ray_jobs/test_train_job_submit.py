"""The documented cluster route: `ray start --head`, then `ray job submit --working-dir . --
python -m ray_jobs.train ...` (docs/training.md), against a second local head on 127.0.0.1.

The session cluster (ray.init) keeps running meanwhile, so this head gets its own free ports
and temp dir; it is stopped by ending exactly its own processes (``ray stop`` would end every
Ray on the machine). Ray 2.60 clients need RAY_AUTH_MODE=token (the token is ~/.ray/auth_token).
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from model.config import load_config

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _head_pids(temp_dir: str) -> list[int]:
    """Every process of the head started with ``temp_dir`` (its path is in their command
    lines), read from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if temp_dir.encode() in f.read():
                    out.append(int(entry))
        except OSError:
            continue
    return out


def _stop_head(temp_dir: str, grace: float = 15.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _head_pids(temp_dir):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while _head_pids(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.3)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A `ray start --head` cluster on 127.0.0.1 with its own ports; yields (address, env)."""
    temp_dir = tempfile.mkdtemp(prefix="ur-head-", dir="/tmp")  # short: socket paths
    dash = free_port()
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_ADDRESS": f"http://127.0.0.1:{dash}",
    }
    env.pop("RAY_ADDRESS_GCS", None)
    ports = {
        "--port": free_port(),
        "--dashboard-port": dash,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--num-cpus=2",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
           f"--temp-dir={temp_dir}", "--object-store-memory=200000000", "--disable-usage-stats",
           *[f"{k}={v}" for k, v in ports.items()]]  # fmt: skip
    start_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(cmd, env=start_env, capture_output=True, text=True, timeout=120)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield env["RAY_ADDRESS"], env
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray(env, *args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _submit_and_wait(env, address: str, name: str, command: list[str], timeout: float = 300):
    """`ray job submit --no-wait` a module of this repo, poll until the job ends; returns
    (final status, logs)."""
    # Workers reach the MLflow artifact store (S3) with these; `ray job submit` passes them.
    runtime_env = {
        "env_vars": {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "AWS_"))}
    }
    job_id = f"unirank-{name}-{uuid.uuid4().hex[:8]}"
    submit = _ray(
        env, "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
        "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
        "--", "python", "-m", *command,
        timeout=120,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr
    deadline, status = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        done = _ray(env, "job", "status", "--address", address, job_id)
        # The CLI logs "Job '<id>' succeeded" / "failed" / "was stopped" (to stderr) once
        # the job is over, and "Status for job '<id>': RUNNING" before.
        out = (done.stdout + done.stderr).lower()
        ends = {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}
        status = next((v for k, v in ends.items() if f"job '{job_id}' {k}" in out), "")
        if status:
            break
        time.sleep(2)
    shown = _ray(env, "job", "logs", "--address", address, job_id)
    logs = shown.stdout + shown.stderr
    if not status:
        _ray(env, "job", "stop", "--address", address, job_id)
    assert status == "SUCCEEDED", f"job {job_id}: {status or 'timed out'}\n{logs[-4000:]}"
    return status, logs


def test_ray_job_submit_trains_to_succeeded(ray_head, smoke_data, mlflow_server, train_args):
    address, env = ray_head
    run_name = f"submitted-{uuid.uuid4().hex[:6]}"
    overrides = train_args(
        smoke_data, run_name, mlflow_server, "train.epochs=1", "train.max_steps_per_epoch=4"
    )
    _, logs = _submit_and_wait(
        env, address, "train", ["ray_jobs.train", "configs/smoke.yaml", *overrides]
    )
    assert "epoch 1/1" in logs and '"train":' in logs
    assert (smoke_data / "runs" / run_name / "epoch_0001" / "state.json").is_file()
    # the submitted job tracked into the same MLflow server (rank 0 from the cluster's worker)
    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides)
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "val/objective" in runs[0].data.metrics


def test_ray_job_submit_runs_a_search_and_registers_its_winner(
    ray_head, smoke_data, mlflow_server, train_args
):
    address, env = ray_head
    name = f"submitted-search-{uuid.uuid4().hex[:6]}"
    overrides = [
        o
        for o in train_args(smoke_data, "unused", mlflow_server)
        if not o.startswith(("train.run_name=", "train.storage_path="))
    ] + [
        f"mlflow.registered_model=unirank-{name}",
        f"tune.storage_path={smoke_data}/tune",
        f"tune.name={name}",
        "tune.search_alg=grid",
        "tune.num_samples=1",
        "tune.space={model.fusion: {grid: [gating]}}",
        "train.epochs=1",
        "train.max_steps_per_epoch=4",
    ]
    _, logs = _submit_and_wait(
        env, address, "search", ["tuning.search", "configs/tune_smoke.yaml", *overrides], 420
    )
    assert f"search {name}: 1 trial (" in logs, logs[-3000:]
    assert "first version" in logs or "promoted to champion" in logs
    results = smoke_data / "tune" / name / "results" / "trials.csv"
    assert results.is_file() and len(results.read_text().splitlines()) == 2
    client = MlflowClient(mlflow_server)
    mv = client.get_model_version_by_alias(f"unirank-{name}", "champion")
    assert mv.version == "1" and name in mv.tags["run_name"]
