"""A `ray start` cluster beside the test session's own (ray.init) one, driven only through the
CLI: `ray start --head`, `ray start --address` for more nodes, `ray job submit`.

Every node gets its own free ports and its own ``--temp-dir``, so nothing collides with the
session cluster (GCS, dashboard, agents, metrics, object manager, session directories). A node
is stopped by ending exactly the processes whose command line names its temp dir: `ray stop`
would end every Ray process on the machine, the session cluster's included.
Ray 2.60 clients need RAY_AUTH_MODE=token (the token is read from ~/.ray/auth_token).
"""

from __future__ import annotations

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
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_pids(*temp_dirs: str, name: str | None = None) -> list[int]:
    """Processes of the nodes started with ``temp_dirs`` (the path is in their command
    lines), read from /proc; ``name``: only those whose executable's base name is ``name``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        line = b" ".join(argv)
        if any(d.encode() in line for d in temp_dirs) and (
            name is None or os.path.basename(argv[0]).decode(errors="replace") == name
        ):
            out.append(int(entry))
    return out


def stop_node(*temp_dirs: str, grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL, every process of the nodes started with ``temp_dirs``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in node_pids(*temp_dirs):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while node_pids(*temp_dirs) and time.monotonic() < deadline:
            time.sleep(0.3)


@dataclass
class LocalCluster:
    """A head (and later worker nodes) on 127.0.0.1; ``env`` is a client's environment."""

    env: dict[str, str]
    dashboard: str  # http://127.0.0.1:PORT: job submission, state and Train APIs
    gcs: str = ""  # 127.0.0.1:PORT: what `ray start --address` joins
    temp_dirs: list[str] = field(default_factory=list)

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "ray"), *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip

    def start_node(self, head: bool, num_cpus: int, resources: dict | None = None) -> str:
        """`ray start` one node with its own ports and temp dir; returns the temp dir."""
        temp_dir = tempfile.mkdtemp(prefix="ur-head-" if head else "ur-node-", dir="/tmp")
        self.temp_dirs.append(temp_dir)  # short paths: unix socket names have a length limit
        ports = {
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--metrics-export-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }
        if head:
            ports.update({
                "--port": self.gcs.rsplit(":", 1)[1],
                "--dashboard-port": self.dashboard.rsplit(":", 1)[1],
                "--ray-client-server-port": free_port(),
            })  # fmt: skip
            where = ["--head", "--dashboard-host=127.0.0.1", "--include-dashboard=true"]
        else:
            where = [f"--address={self.gcs}"]
        cmd = [str(VENV_BIN / "ray"), "start", *where, f"--num-cpus={num_cpus}",
               "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
               "--object-store-memory=200000000", "--disable-usage-stats",
               f"--resources={json.dumps(resources or {})}",
               *[f"{k}={v}" for k, v in ports.items()]]  # fmt: skip
        start_env = {k: v for k, v in self.env.items() if k != "RAY_ADDRESS"}
        proc = subprocess.run(cmd, env=start_env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
        return temp_dir

    def stop(self) -> None:
        stop_node(*self.temp_dirs)

    def api(self, path: str) -> dict | list:
        """GET a dashboard API path with the cluster's auth token."""
        token = (
            os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").read_text()
        )
        req = urllib.request.Request(f"{self.dashboard}{path}",
                                     headers={"Authorization": f"Bearer {token.strip()}"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def alive_nodes(self) -> list[dict]:
        """Alive nodes as the state API lists them (node_id, resources_total, ...)."""
        shown = self.ray("list", "nodes", "--address", self.dashboard, "--format", "json",
                         "--filter", "state=ALIVE", "--detail")  # fmt: skip
        assert shown.returncode == 0, shown.stdout + shown.stderr
        return json.loads(shown.stdout)

    def submit(self, name: str, command: list[str], env_vars: dict | None = None) -> str:
        """`ray job submit --no-wait --working-dir <repo>` of ``python -m <command>``; returns
        the job id. Workers reach the MLflow artifact store (S3) with the MLFLOW_* / AWS_*
        variables of this process, passed in the job's runtime_env."""
        runtime_env = {"env_vars": {
            **{k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "AWS_"))},
            **(env_vars or {}),
        }}  # fmt: skip
        job_id = f"unirank-{name}-{uuid.uuid4().hex[:8]}"
        submit = self.ray(
            "job", "submit", "--address", self.dashboard, "--submission-id", job_id, "--no-wait",
            "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
            "--", "python", "-m", *command,
            timeout=120,
        )  # fmt: skip
        assert submit.returncode == 0, submit.stdout + submit.stderr
        return job_id

    def status(self, job_id: str) -> str:
        """SUCCEEDED / FAILED / STOPPED once the job is over, else ''."""
        done = self.ray("job", "status", "--address", self.dashboard, job_id)
        # The CLI logs "Job '<id>' succeeded" / "failed" / "was stopped" (to stderr) once
        # the job is over, and "Status for job '<id>': RUNNING" before.
        out = (done.stdout + done.stderr).lower()
        ends = {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}
        return next((v for k, v in ends.items() if f"job '{job_id}' {k}" in out), "")

    def logs(self, job_id: str) -> str:
        shown = self.ray("job", "logs", "--address", self.dashboard, job_id)
        return shown.stdout + shown.stderr

    def wait(self, job_id: str, timeout: float = 300) -> str:
        """Poll until the job ends; asserts it SUCCEEDED; returns its logs."""
        deadline, status = time.monotonic() + timeout, ""
        while not status and time.monotonic() < deadline:
            time.sleep(2)
            status = self.status(job_id)
        logs = self.logs(job_id)
        if not status:
            self.ray("job", "stop", "--address", self.dashboard, job_id)
        assert status == "SUCCEEDED", f"job {job_id}: {status or 'timed out'}\n{logs[-4000:]}"
        return logs

    def run_job(self, name: str, command: list[str], timeout: float = 300, **kw) -> str:
        return self.wait(self.submit(name, command, **kw), timeout)


@contextlib.contextmanager
def local_cluster(head_cpus: int = 2, head_resources: dict | None = None):
    """A `ray start --head` on 127.0.0.1 (more nodes: ``start_node(head=False, ...)``); every
    node it started is stopped on exit, also when the test failed."""
    dash = f"http://127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_ADDRESS": dash,
    }
    env.pop("RAY_ADDRESS_GCS", None)
    cluster = LocalCluster(env=env, dashboard=dash, gcs=f"127.0.0.1:{free_port()}")
    try:
        cluster.start_node(True, head_cpus, head_resources)
        yield cluster
    finally:
        cluster.stop()
        for temp_dir in cluster.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)
