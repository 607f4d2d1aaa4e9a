"""Label-pipeline and training-ingest throughput, and memory that must not grow with the data.

    python benchmarks/ingest.py [--quick]

Prints one JSON line:
  prepare        rows/s of ray_jobs.prepare (the real job) at a small and a 4x larger input, and
                 the peak RSS of the process tree (driver + Ray workers) for each, with ratios;
  ingest         rows/s of ray.data.read_parquet -> iter_torch_batches (collate = the model's
                 FeatureProcessor) over the prepared train split, against a single-process
                 pyarrow read + the same FeatureProcessor over the same files, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402

from benchmarks._util import PeakRSS  # noqa: E402
from model.config import load_config  # noqa: E402
from model.features import FeatureProcessor  # noqa: E402
from model.storage import list_parquet  # noqa: E402
from ray_jobs.common import init_ray, read_parquet  # noqa: E402
from ray_jobs.generate import generate  # noqa: E402
from ray_jobs.prepare import prepare  # noqa: E402

BATCH = 1024


def run_prepare(rows: int, root: str) -> dict:
    cfg = load_config(
        None,
        [
            f"generate.num_impressions={rows}",
            f"generate.output={root}/raw",
            f"prepare.input={root}/raw",
            f"prepare.output={root}/prepared",
        ],
    )
    generate(cfg)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        summary = prepare(cfg)
        secs = time.perf_counter() - t0
    return {
        "rows_in": rows,
        "rows_out": summary["rows_out"],
        "seconds": round(secs, 1),
        "rows_per_s": round(rows / secs, 1),
        "peak_rss_total_mb": round(mem.peak_total / 2**20),
        "peak_rss_single_mb": round(mem.peak_single / 2**20),
    }, cfg


def run_ingest(cfg, train_dir: str) -> dict:
    fs, files = list_parquet(train_dir, cfg.storage)
    proc = FeatureProcessor(cfg.dataset).fit([pq.read_table(files[0], filesystem=fs)])

    # Ray Data streaming ingest, as the training workers consume it.
    ds = read_parquet(train_dir, cfg.storage)
    t0 = time.perf_counter()
    n = 0
    for batch in ds.iter_torch_batches(batch_size=BATCH, collate_fn=proc, prefetch_batches=4):
        n += batch.weight.shape[0]
    ray_rows_s = n / (time.perf_counter() - t0)

    # Baseline: one process, pyarrow reads the same files, same FeatureProcessor.
    t0 = time.perf_counter()
    m = 0
    for path in files:
        for rb in pq.ParquetFile(path, filesystem=fs).iter_batches(batch_size=BATCH):
            m += proc(rb).weight.shape[0]
    base_rows_s = m / (time.perf_counter() - t0)
    assert m == n, (m, n)
    return {
        "rows": n,
        "ray_data_rows_per_s": round(ray_rows_s, 1),
        "pyarrow_single_process_rows_per_s": round(base_rows_s, 1),
        "ratio_ray_vs_pyarrow": round(ray_rows_s / base_rows_s, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="100k / 400k rows instead of 500k / 2M")
    args = p.parse_args()
    small, large = (100_000, 400_000) if args.quick else (500_000, 2_000_000)
    init_ray(num_cpus=2, object_store_memory=600 * 2**20)
    with tempfile.TemporaryDirectory() as tmp:
        a, _ = run_prepare(small, f"{tmp}/small")
        b, cfg = run_prepare(large, f"{tmp}/large")
        ingest = run_ingest(cfg, f"{tmp}/large/prepared/train")
    ray.shutdown()
    print(
        json.dumps(
            {
                "benchmark": "ingest",
                "prepare": {"small": a, "large": b},
                "prepare_rows_per_s_ratio_large_vs_small": round(
                    b["rows_per_s"] / a["rows_per_s"], 3
                ),
                "prepare_peak_rss_single_ratio_large_vs_small": round(
                    b["peak_rss_single_mb"] / a["peak_rss_single_mb"], 3
                ),
                "prepare_peak_rss_total_ratio_large_vs_small": round(
                    b["peak_rss_total_mb"] / a["peak_rss_total_mb"], 3
                ),
                "ingest": ingest,
            }
        )
    )


if __name__ == "__main__":
    main()
