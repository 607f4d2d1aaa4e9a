"""Generation throughput and memory at two sizes: rows/s must stay flat, memory bounded.

    python benchmarks/generate.py [--quick]

Prints one JSON line: rows/s and peak RSS (whole process tree and largest single process) for a
small and a 4x larger run through the real Ray Data job, and large/small ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from benchmarks._util import PeakRSS, emit, start_ray  # noqa: E402
from model.config import load_config  # noqa: E402
from ray_jobs.generate import generate  # noqa: E402


def run(rows: int, out: str) -> dict:
    cfg = load_config(None, [f"generate.num_impressions={rows}", f"generate.output={out}"])
    with PeakRSS() as mem:
        counts = generate(cfg)
    return {
        "rows": rows,
        "rows_per_s": counts["rows_per_s"],
        "seconds": counts["seconds"],
        "peak_rss_total_mb": round(mem.peak_total / 2**20),
        "peak_rss_single_mb": round(mem.peak_single / 2**20),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="20k / 80k rows instead of 1M / 4M")
    args = p.parse_args()
    small, large = (20_000, 80_000) if args.quick else (1_000_000, 4_000_000)
    own = start_ray(num_cpus=2, object_store_memory=500 * 2**20)
    with tempfile.TemporaryDirectory() as tmp:
        run(5_000 if args.quick else 40_000, f"{tmp}/warm")  # start-up out of the measurement
        a = run(small, f"{tmp}/small")
        b = run(large, f"{tmp}/large")
    ray.shutdown()
    emit(
        {
            "benchmark": "generate",
            "quick": args.quick,
            "ray_cluster": "own" if own else "joined",
            "small": a,
            "large": b,
            "rows_per_s_ratio_large_vs_small": round(b["rows_per_s"] / a["rows_per_s"], 3),
            "peak_rss_single_ratio_large_vs_small": round(
                b["peak_rss_single_mb"] / a["peak_rss_single_mb"], 3
            ),
            "peak_rss_total_ratio_large_vs_small": round(
                b["peak_rss_total_mb"] / a["peak_rss_total_mb"], 3
            ),
        }
    )


if __name__ == "__main__":
    main()
