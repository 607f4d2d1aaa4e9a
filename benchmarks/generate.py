"""Generation throughput and memory at two sizes: rows/s must stay flat, memory bounded.

    python benchmarks/generate.py [--quick]

Prints one JSON line: rows/s and peak RSS (whole process tree and largest single process) for a
small and a 4x larger run through the real Ray Data job, and large/small ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from benchmarks._util import PeakRSS  # noqa: E402
from model.config import load_config  # noqa: E402
from ray_jobs.common import init_ray  # noqa: E402
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
    p.add_argument("--quick", action="store_true", help="200k / 800k rows instead of 1M / 4M")
    args = p.parse_args()
    small, large = (200_000, 800_000) if args.quick else (1_000_000, 4_000_000)
    init_ray(num_cpus=2, object_store_memory=500 * 2**20)
    with tempfile.TemporaryDirectory() as tmp:
        run(40_000, f"{tmp}/warm")  # actor start-up and imports out of the measurement
        a = run(small, f"{tmp}/small")
        b = run(large, f"{tmp}/large")
    ray.shutdown()
    print(
        json.dumps(
            {
                "benchmark": "generate",
                "small": a,
                "large": b,
                "rows_per_s_ratio_large_vs_small": round(b["rows_per_s"] / a["rows_per_s"], 3),
                "peak_rss_single_ratio_large_vs_small": round(
                    b["peak_rss_single_mb"] / a["peak_rss_single_mb"], 3
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
