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
    """Every step of `make demo`, on the tiny training recipe: generate -> prepare -> train ->
    evaluate -> register -> search -> serve."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_jobs.demo",
            "configs/train_smoke.yaml",
            f"generate.output={tmp_path / 'raw'}",
            f"prepare.output={tmp_path / 'prepared'}",
            "generate.num_impressions=6000",
            "dataset.train=[]",
            "dataset.validation=[]",
            "dataset.test=[]",
            f"train.storage_path={tmp_path / 'runs'}",
            "train.max_steps_per_epoch=8",
            "evaluate.bootstrap=0",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tune.storage_path={tmp_path / 'tune'}",
            "tune.num_samples=1",
            "--log",
            str(tmp_path / "demo.log"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    assert "[1/8] generate: 6000 impressions" in out
    for tt in ("ads", "notifications", "related_items", "search", "category"):
        assert re.search(rf"^{tt}\s+\d+\s+.*click=0\.\d+", out, re.M), tt
    assert (tmp_path / "raw" / "summary.json").exists()
    assert "prepare: 6000 rows in" in out
    assert list((tmp_path / "prepared" / "train").rglob("*.parquet"))
    assert re.search(r"\[4/8\] train: run smoke: 2 epochs, best objective 0\.\d+", out)
    assert list((tmp_path / "runs" / "smoke").glob("epoch_0002/state.json"))
    assert re.search(r"\[5/8\] evaluate: ", out)
    # the evaluate table: task, task_type, rows, auc, ...
    assert re.search(r"^  checkout\s+ads\s+\d+\s+0\.\d+", out, re.M)
    assert (tmp_path / "runs" / "smoke" / "eval" / "report.json").exists()
    assert "[6/8] register: registered unirank v1" in out and "first version -> @champion" in out
    # the search's best trial is registered as v2 through the champion rule
    assert "search unirank_search: 1 trial (" in out
    assert re.search(r"registered models:/unirank/2: (promoted to champion|champion kept)", out)
    assert (tmp_path / "tune" / "unirank_search" / "results" / "trials.csv").exists()
    assert "[8/8] serve: every use-case on Ray Serve with models:/unirank@champion" in out
    for tt in ("ads", "notifications", "related_items", "search", "category"):
        m = re.search(rf"^  {tt}\s+(\d+) items, top: .* fallback=None$", out, re.M)
        assert m and int(m.group(1)) > 0, (tt, out[-3000:])
    assert "demo finished" in out
    # quiet: Ray's / MLflow's logs, warnings, progress bars and worker output are in the log
    assert (
        out.splitlines()[0]
        == f"Ray and MLflow logs, warnings and progress bars: {tmp_path / 'demo.log'}"
    )
    noise = [
        line
        for line in out.splitlines()
        if re.search(r"\b(DEBUG|INFO|WARNING|ERROR)\b|Warning|\(pid=|\(\w+ pid=|%\||it/s\]", line)
    ]
    assert noise == [], noise[:20]
    log = (tmp_path / "demo.log").read_text()
    assert "[1/8] generate: 6000 impressions" in log and "demo finished" in log
    assert re.search(r"\b(INFO|WARNING)\b", log)  # what the terminal no longer shows


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
