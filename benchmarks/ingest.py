"""Label-pipeline and training-ingest throughput, and memory that must not grow with the data.

    python benchmarks/ingest.py [--quick] [--small N] [--large N]

Prints one JSON line:

``prepare``
    rows/s of ``ray_jobs.prepare`` (the real job) at a small and a 4x larger input, and the
    peak RSS of this process tree (driver + the Ray workers it started) for each, with
    large/small ratios. Joined to an existing cluster (RAY_ADDRESS), Ray's workers are not
    this process's children: the RSS figures then cover the driver only (``ray_cluster``
    says which).
``ingest``
    rows/s of the training workers' input path against one process reading the same files.

    Identical on both sides: the files (the large run's prepared train split), the columns
    (``train.needed_columns``), the fitted FeatureProcessor, the collate
    (``train_loop.ProcessorCollate``: an Arrow table in, a ``Batch`` out), the batch size
    (1024 rows, exactly, also at file boundaries) and the number of rows.
    Ray side: ``train.read_split`` (streamed from parquet, what an uncached split does every
    epoch) -> ``streaming_split(1, equal=True)`` as Ray Train's DataConfig does ->
    ``train_loop.batches`` (``iter_torch_batches`` with the ArrowBatchCollateFn, collate in
    Ray Data's prefetch thread, ``train.prefetch_batches`` ahead).
    Baseline: ``pyarrow.parquet`` reads the files one after the other in this process and
    calls the same collate inline, one thread.
    Not identical: Ray reads in separate worker processes (the second core) and overlaps
    reading with collate; the batches are consumed by this driver, not by a Train worker,
    and nothing trains meanwhile, so this is ingest capacity, the rate a trainer can at most
    be fed (compare it with benchmarks/train_throughput.py's training rows/s).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402

from benchmarks._util import PeakRSS, emit, start_ray  # noqa: E402
from model.config import load_config  # noqa: E402
from model.storage import list_parquet  # noqa: E402
from ray_jobs import train  # noqa: E402
from ray_jobs.generate import generate  # noqa: E402
from ray_jobs.prepare import prepare  # noqa: E402
from ray_jobs.train_loop import ProcessorCollate, batches  # noqa: E402

BATCH = 1024


def run_prepare(rows: int, root: str) -> tuple[dict, object]:
    cfg = load_config(
        None,
        [
            f"generate.num_impressions={rows}",
            f"generate.output={root}/raw",
            f"prepare.input={root}/raw",
            f"prepare.output={root}/prepared",
            f"dataset.train=[{root}/prepared/train]",
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


def exact_batches(files: list[str], fs, columns: list[str], size: int):
    """pyarrow record batches of ``files`` regrouped into tables of exactly ``size`` rows (the
    last one shorter), as Ray Data's batcher hands them over, file boundaries included."""
    buf: list[pa.RecordBatch] = []
    held = 0
    for path in files:
        for rb in pq.ParquetFile(path, filesystem=fs).iter_batches(size, columns=columns):
            buf.append(rb)
            held += rb.num_rows
            while held >= size:
                table = pa.Table.from_batches(buf)
                yield table.slice(0, size)
                rest = table.slice(size)
                buf, held = rest.to_batches(), rest.num_rows
    if held:
        yield pa.Table.from_batches(buf)


def run_ingest(cfg) -> dict:
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": BATCH})})
    ds = train.read_split(cfg, "train")
    collate = ProcessorCollate(train.fit_processor(cfg, ds))
    prefetch = cfg.train.prefetch_batches

    # Ray Data streaming ingest, as a training worker consumes its shard.
    shard = ds.streaming_split(1, equal=True)[0]
    t0 = time.perf_counter()
    n, first = 0, None
    for b in batches(shard, collate.processor, BATCH, pin_memory=False, prefetch=prefetch):
        if first is None:  # pipeline start-up: a fixed cost per epoch
            first, n_first = time.perf_counter() - t0, len(b)
        n += len(b)
    secs = time.perf_counter() - t0
    if first is None:
        raise RuntimeError(f"ingest: {cfg.dataset.train} gave no rows")
    ray_rows_s = n / secs
    ray_after_first = (n - n_first) / max(secs - first, 1e-9)

    # Baseline: one process, pyarrow reads the same files and columns, the same collate.
    fs, files = list_parquet(cfg.dataset.train, cfg.storage)
    columns = [c for c in train.needed_columns(cfg) if c in ds.columns()]
    t0 = time.perf_counter()
    m = 0
    for table in exact_batches(files, fs, columns, BATCH):
        m += len(collate(table))
    base_rows_s = m / (time.perf_counter() - t0)
    if m != n:
        raise RuntimeError(f"ingest: Ray Data delivered {n} rows, pyarrow read {m}")
    return {
        "rows": n,
        "batch_size": BATCH,
        "prefetch_batches": prefetch,
        "ray_data_rows_per_s": round(ray_rows_s, 1),
        "ray_data_first_batch_s": round(first, 2),
        "ray_data_rows_per_s_after_first_batch": round(ray_after_first, 1),
        "pyarrow_single_process_rows_per_s": round(base_rows_s, 1),
        "ratio_ray_vs_pyarrow": round(ray_rows_s / base_rows_s, 3),
        "ratio_ray_after_first_batch_vs_pyarrow": round(ray_after_first / base_rows_s, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="5k / 20k rows instead of 500k / 2M")
    p.add_argument("--small", type=int, default=None, help="impressions of the small run")
    p.add_argument("--large", type=int, default=None, help="impressions of the large run")
    args = p.parse_args()
    small, large = (5_000, 20_000) if args.quick else (500_000, 2_000_000)
    small, large = args.small or small, args.large or large
    own = start_ray(num_cpus=2, object_store_memory=600 * 2**20)
    with tempfile.TemporaryDirectory() as tmp:
        a, _ = run_prepare(small, f"{tmp}/small")
        b, cfg = run_prepare(large, f"{tmp}/large")
        ingest = run_ingest(cfg)
    ray.shutdown()
    emit(
        {
            "benchmark": "ingest",
            "quick": args.quick,
            "ray_cluster": "own" if own else "joined",
            "prepare": {"small": a, "large": b},
            "prepare_rows_per_s_ratio_large_vs_small": round(b["rows_per_s"] / a["rows_per_s"], 3),
            "prepare_peak_rss_single_ratio_large_vs_small": round(
                b["peak_rss_single_mb"] / a["peak_rss_single_mb"], 3
            ),
            "prepare_peak_rss_total_ratio_large_vs_small": round(
                b["peak_rss_total_mb"] / a["peak_rss_total_mb"], 3
            ),
            "ingest": ingest,
        }
    )


if __name__ == "__main__":
    main()
