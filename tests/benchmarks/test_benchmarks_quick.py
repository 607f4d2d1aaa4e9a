"""Every benchmark runs with --quick, as `make bench` runs it, and prints its documented keys.

Each script runs as a subprocess that joins the session's Ray cluster through RAY_ADDRESS
(benchmarks/_util.start_ray): one cluster on the 2 cores, no start-up per script. Its JSON
line is read from the file $BENCH_JSON names, as `make bench` does. The keys each script must
print are the ones docs/benchmarks.md lists for it, so the page that quotes the figures and
the scripts that produce them cannot drift apart.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "benchmarks.md"
SCRIPTS = sorted(p.stem for p in (REPO / "benchmarks").glob("[!_]*.py"))


def bench_line(path: Path) -> dict:
    """The benchmark's one JSON line from ``path``; strict JSON: NaN or Infinity fail."""
    assert path.exists(), f"{path.name} was not written"
    lines = path.read_text().splitlines()
    assert len(lines) == 1, f"{path.name}: {len(lines)} lines, expected one"

    def reject(constant: str):
        raise AssertionError(f"{path.name}: {constant} is not a finite number")

    return json.loads(lines[0], parse_constant=reject)


def documented_keys(name: str) -> list[str]:
    """Dotted keys of the ``Keys:`` paragraph of the benchmark's section in docs/benchmarks.md."""
    text = DOC.read_text()
    m = re.search(rf"^### `{name}`\n(.*?)(?=^### |^## |\Z)", text, re.M | re.S)
    assert m, f"docs/benchmarks.md has no section ### `{name}`"
    keys = re.search(r"^Keys:(.*?)(?:\n\n|\Z)", m.group(1), re.M | re.S)
    assert keys, f"docs/benchmarks.md: section `{name}` has no 'Keys:' paragraph"
    return re.findall(r"`([^`]+)`", keys.group(1))


def lookup(d: dict, dotted: str):
    for part in dotted.split("."):
        assert isinstance(d, dict) and part in d, f"missing key {dotted!r}"
        d = d[part]
    return d


def numbers(v, path: str = ""):
    """(path, value) of every number in a JSON tree (booleans are not numbers here)."""
    if isinstance(v, bool):
        return
    if isinstance(v, int | float):
        yield path, v
    elif isinstance(v, dict):
        for k, x in v.items():
            yield from numbers(x, f"{path}.{k}")
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from numbers(x, f"{path}[{i}]")


@pytest.mark.unit
def test_make_bench_runs_every_script_and_the_docs_cover_each():
    makefile = (REPO / "Makefile").read_text()
    bench = re.search(r"^bench:.*?\n((?:\t.*\n)+)", makefile, re.M)
    assert bench, "Makefile: no bench target"
    recipe = bench.group(1)
    assert "benchmarks/[!_]*.py" in recipe and "BENCH_JSON=out/bench/$$n.json" in recipe
    assert "exit 1" in recipe  # a failed script fails the target (after the others ran)
    assert len(SCRIPTS) >= 8
    for name in SCRIPTS:
        assert documented_keys(name), name


@pytest.mark.unit
def test_bench_line_and_key_lookup_reject_what_they_should(tmp_path):
    line = tmp_path / "x.json"
    line.write_text('{"benchmark": "x", "a": {"b": 1}}\n')
    assert bench_line(line) == {"benchmark": "x", "a": {"b": 1}}
    line.write_text('{"benchmark": "x", "a": NaN}\n')
    with pytest.raises(AssertionError, match="NaN"):
        bench_line(line)
    with pytest.raises(AssertionError, match="not written"):
        bench_line(tmp_path / "missing.json")
    with pytest.raises(AssertionError, match="a.c"):
        lookup({"a": {"b": 1}}, "a.c")
    assert dict(numbers({"a": [1.5, {"b": 2}], "c": "s", "d": True})) == {
        ".a[0]": 1.5,
        ".a[1].b": 2,
    }


@pytest.mark.e2e
@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_quick_prints_its_documented_keys(name, ray_cluster, request, tmp_path):
    extra = []
    # The session's generated + prepared smoke data (configs/smoke.yaml) instead of a generate
    # + prepare of their own: prepare's start-up (~20 s at any size on 2 cores) would blow the
    # budget; ingest runs prepare itself, twice (measuring it is its point).
    if name == "train_throughput":  # generates with configs/smoke.yaml itself otherwise
        extra = ["--data", str(request.getfixturevalue("smoke_data"))]
    elif name == "train_quality":  # and the session's MovieLens build (tests/conftest.py)
        ml_out, _, _ = request.getfixturevalue("movielens_root")
        extra = [
            "--data",
            str(request.getfixturevalue("smoke_data")),
            "--movielens-data",
            str(ml_out),
        ]
    elif name == "label_truth":
        smoke = REPO / "configs" / "smoke.yaml"
        extra = ["--data", str(request.getfixturevalue("smoke_data")), "--config", str(smoke)]
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
        "BENCH_JSON": str(tmp_path / f"{name}.json"),
    }
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--quick", *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = bench_line(tmp_path / f"{name}.json")
    assert result["benchmark"] == name
    assert result["quick"] is True
    for key in documented_keys(name):
        assert lookup(result, key) is not None, f"{name}: {key} is null"
    bad = [p for p, v in numbers(result) if not math.isfinite(v)]
    assert not bad, f"{name}: not finite: {bad}"
