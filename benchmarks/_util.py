"""Shared helpers for benchmarks: peak memory of this process tree, sampled in a thread."""

from __future__ import annotations

import os
import threading
import time


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
