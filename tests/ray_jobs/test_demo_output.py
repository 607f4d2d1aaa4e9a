"""`make demo`'s terminal shows the demo's own lines; everything else goes to the log file."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import logging, os, sys, warnings
from ray_jobs.demo import quiet_output

logging.basicConfig(level=logging.INFO, stream=sys.stdout)
with quiet_output(sys.argv[1]) as say:
    say("[1/8] generate: ours")
    print("a library's print")
    logging.getLogger("ray").warning("a library's warning")
    warnings.warn("a python warning")
    os.write(2, b"Downloading artifacts: 100%|##########| 3/3\\r\\n")  # C level, like tqdm
    sys.stderr.write("stderr text\\n")
    say("a table row")
    if len(sys.argv) > 2:
        raise RuntimeError("boom")
print("after: back on the terminal")
"""


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), str(tmp_path / "d" / "demo.log"), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_only_our_lines_reach_the_terminal(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "[1/8] generate: ours",
        "a table row",
        "after: back on the terminal",
    ]
    assert proc.stderr == ""
    log = (tmp_path / "d" / "demo.log").read_text()
    for text in (
        "[1/8] generate: ours",
        "a library's print",
        "a library's warning",
        "a python warning",
        "Downloading artifacts: 100%",
        "stderr text",
        "a table row",
    ):
        assert text in log, text
    assert "after: back on the terminal" not in log


def test_a_failure_reaches_the_terminal(tmp_path):
    proc = _run(tmp_path, "fail")
    assert proc.returncode == 1
    assert "demo failed: RuntimeError('boom')" in proc.stdout
    assert "RuntimeError: boom" in proc.stderr and "Traceback" in proc.stderr
    assert "RuntimeError: boom" in (tmp_path / "d" / "demo.log").read_text()
