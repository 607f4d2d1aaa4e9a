"""The README's main command: `make demo` runs `python -m ray_jobs.demo` (smaller here)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def test_readme_commands_are_the_make_targets():
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo: venv\n\t\$\(PY\) -m ray_jobs\.demo$", makefile, re.M)
    assert re.search(r"^test: venv\n\t\$\(VENV\)/bin/pytest", makefile, re.M)
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_demo_runs_end_to_end(ray_cluster, tmp_path):
    out = tmp_path / "raw"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_jobs.demo",
            "configs/smoke.yaml",
            f"generate.output={out}",
            f"prepare.output={tmp_path / 'prepared'}",
            "generate.num_impressions=6000",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "generate: 6000 impressions" in proc.stdout
    for tt in ("ads", "notifications", "related_items", "search", "category"):
        assert re.search(rf"^{tt}\s+\d+\s+.*click=0\.\d+", proc.stdout, re.M), tt
    assert (out / "summary.json").exists()
    assert "prepare: 6000 rows in" in proc.stdout
    assert (tmp_path / "prepared" / "reports" / "summary.json").exists()
    assert list((tmp_path / "prepared" / "train").rglob("*.parquet"))


def test_bad_override_fails_fast_naming_the_field():
    proc = subprocess.run(
        [sys.executable, "-m", "ray_jobs.demo", "generate.num_impressions=lots"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "generate.num_impressions" in proc.stderr
