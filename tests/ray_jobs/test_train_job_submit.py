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
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from model.config import load_config

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _head_processes(temp_dir: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in p.info["cmdline"] or []):
                out.append(p)
        except psutil.Error:
            pass
    return out


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
        procs = _head_processes(temp_dir)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray(env, *args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_ray_job_submit_trains_to_succeeded(ray_head, smoke_data, mlflow_server, train_args):
    address, env = ray_head
    run_name = f"submitted-{uuid.uuid4().hex[:6]}"
    overrides = train_args(
        smoke_data, run_name, mlflow_server, "train.epochs=1", "train.max_steps_per_epoch=4"
    )
    # Workers reach the MLflow artifact store (S3) with these; `ray job submit` passes them.
    runtime_env = {
        "env_vars": {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "AWS_"))}
    }
    job_id = f"unirank-train-{uuid.uuid4().hex[:8]}"
    submit = _ray(
        env, "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
        "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
        "--", "python", "-m", "ray_jobs.train", "configs/smoke.yaml", *overrides,
        timeout=120,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr
    deadline, status = time.monotonic() + 300, ""
    while time.monotonic() < deadline:
        out = _ray(env, "job", "status", "--address", address, job_id).stdout
        status = next((s for s in ("SUCCEEDED", "FAILED", "STOPPED") if s in out), "")
        if status:
            break
        time.sleep(2)
    logs = _ray(env, "job", "logs", "--address", address, job_id).stdout
    if not status:
        _ray(env, "job", "stop", "--address", address, job_id)
    assert status == "SUCCEEDED", f"job {job_id}: {status or 'timed out'}\n{logs[-4000:]}"
    assert "epoch 1/1" in logs and '"train":' in logs
    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides)
    assert (smoke_data / "runs" / run_name / "epoch_0001" / "state.json").is_file()
    assert cfg.train.run_name == run_name
