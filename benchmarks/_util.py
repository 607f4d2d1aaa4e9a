"""Shared helpers for benchmarks: Ray start-up, peak memory of this process tree, the JSON line."""

from __future__ import annotations

import json
import math
import os
import threading
import time


def start_ray(**local) -> bool:
    """Join the cluster at RAY_ADDRESS when it is set, else start a local Ray with ``local``
    (num_cpus, object_store_memory, ...). Returns True when this process started the cluster.

    Joining is how tests/benchmarks runs every script inside the test session's cluster: one
    Ray on the 2 cores instead of two, and no start-up per script. A joined cluster keeps its
    own resources, so ``local`` is ignored then (ray.init refuses num_cpus when connecting).
    """
    from ray_jobs.common import init_ray

    if os.environ.get("RAY_ADDRESS"):
        init_ray()
        return False
    init_ray(**local)
    return True


BENCH_JSON = "BENCH_JSON"  # env: also write the line to this file (make bench, the CI test)


def emit(result: dict) -> None:
    """Print the benchmark's one JSON line, and write it to the file named by $BENCH_JSON when
    set (stdout also carries Ray's worker logs). A NaN or infinite figure is written as null
    (strict JSON) and then fails the script, naming the figure: the rest of a long run is
    kept."""
    bad: list[str] = []

    def clean(v, path: str):
        if isinstance(v, float) and not math.isfinite(v):
            bad.append(path)
            return None
        if isinstance(v, dict):
            return {k: clean(x, f"{path}.{k}") for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x, f"{path}[{i}]") for i, x in enumerate(v)]
        return v

    line = json.dumps(clean(result, str(result.get("benchmark", "result"))), allow_nan=False)
    print(line, flush=True)
    if os.environ.get(BENCH_JSON):
        with open(os.environ[BENCH_JSON], "w") as f:
            f.write(line + "\n")
    if bad:
        raise SystemExit(f"not a finite number: {', '.join(bad)}")


def _tree_rss() -> tuple[int, int]:
    """(total, largest) RSS in bytes of this process and its descendants, from /proc."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parent[int(entry)] = int(fields[1])
            rss[int(entry)] = int(fields[21]) * page
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        pid = frontier.pop()
        for child, ppid in parent.items():
            if ppid == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    sizes = [rss.get(p, 0) for p in tree]
    return sum(sizes), max(sizes)


class PeakRSS:
    """Samples RSS of this process and all its descendants (Ray workers included)."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.peak_total = 0
        self.peak_single = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total, single = _tree_rss()
            self.peak_total = max(self.peak_total, total)
            self.peak_single = max(self.peak_single, single)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
