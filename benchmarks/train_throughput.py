"""Training throughput: the real train_func through Ray Train vs a plain PyTorch loop.

    python benchmarks/train_throughput.py [--quick]

Generates and prepares synthetic data, then trains the default (full-size) model on it three
ways and prints one JSON line with training rows/s (validation excluded, first epoch = warm-up
excluded) and the ratios:

* ``ray_train_1_worker``: ``ray_jobs.train.run`` -> TorchTrainer, 1 worker (1 CPU), the
  train split streamed by Ray Data (iter_torch_batches, FeatureProcessor collate, prefetch);
* ``ray_train_2_workers``: the same with 2 DDP workers of 0.4 CPU each (fractional, so Ray
  Data's read tasks keep a free CPU on this 2-CPU cluster);
* ``ray_train_1_worker_no_cache``: 1 worker with ``train.cache_datasets=false``: every epoch
  streams the parquet again (what splits too large for the object store do);
* ``ray_train_1_worker_deterministic``: 1 worker with ``train.deterministic=true`` (Ray Data
  keeps block order, torch deterministic kernels): the price of bit-for-bit reruns;
* ``plain_loop``: one process, the same split read into memory up front, the same
  FeatureProcessor, model, optimizer and batch size, no Ray at all.

Every trainer gets one intra-op thread (a Ray worker with <= 1 CPU gets OMP_NUM_THREADS=1),
so the ratio measures the cost of the distributed plumbing, not thread counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from model.config import load_config  # noqa: E402
from model.ensemble import build_model  # noqa: E402
from model.losses import MultiTaskLoss  # noqa: E402
from model.storage import list_parquet  # noqa: E402
from ray_jobs import train  # noqa: E402
from ray_jobs.common import init_ray  # noqa: E402
from ray_jobs.generate import generate  # noqa: E402
from ray_jobs.prepare import prepare  # noqa: E402
from ray_jobs.train_loop import build_optimizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_data(root: str, impressions: int) -> None:
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        [
            f"generate.num_impressions={impressions}",
            f"generate.output={root}/raw",
            f"prepare.input={root}/raw",
            f"prepare.output={root}/prepared",
        ],
    )
    generate(cfg)
    prepare(cfg)


def steady_rows_per_s(result: train.TrainResult, exclude_start: bool = False) -> float:
    """Rows / training seconds over the epochs after the first (warm-up); with
    ``exclude_start``, without each epoch's wait for its first batch (Ray Data pipeline
    start-up, a fixed cost per epoch that long epochs amortize)."""
    hist = result.history[1:] or result.history
    secs = sum(h["train/seconds"] - exclude_start * h["train/first_batch_s"] for h in hist)
    return sum(h["train/rows"] for h in hist) / secs


def stalls(result: train.TrainResult) -> dict:
    hist = result.history[1:] or result.history
    secs = sum(h["train/seconds"] for h in hist)
    return {
        "first_batch_s_per_epoch": round(
            sum(h["train/first_batch_s"] for h in hist) / len(hist), 2
        ),
        "data_wait_share": round(sum(h["train/data_wait_s"] for h in hist) / secs, 3),
        "validation_s_per_epoch": round(sum(h["val/seconds"] for h in hist) / len(hist), 2),
        "train_plus_validation_s_per_epoch": round(
            sum(h["train/seconds"] + h["val/seconds"] for h in hist) / len(hist), 2
        ),
    }


def plain_loop(cfg, epochs: int) -> float:
    """The same training step in one process: in-memory table -> FeatureProcessor -> model."""
    cfg = train.resolve_paths(cfg)
    torch.set_num_threads(1)
    torch.manual_seed(cfg.train.seed)
    fs, files = list_parquet(cfg.dataset.train, cfg.storage)
    table = pa.concat_tables(
        pq.read_table(f, filesystem=fs, columns=train.needed_columns(cfg)) for f in files
    ).combine_chunks()
    proc = train.fit_processor(cfg, train.read_split(cfg, "train"))
    model = build_model(cfg)
    criterion = MultiTaskLoss.from_config(cfg)
    bs = cfg.train.batch_size
    opt, sched = build_optimizer(model, cfg.train, epochs * (len(table) // bs + 1))
    rows = seconds = 0.0
    for epoch in range(epochs):
        t0, n = time.perf_counter(), 0
        for start in range(0, len(table), bs):
            b = proc(table.slice(start, bs))
            loss, _ = criterion(model(*b.inputs()), b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or 1e9)
            opt.step()
            sched.step()
            n += len(b)
        if epoch > 0 or epochs == 1:  # the first epoch is warm-up, as for Ray Train
            rows, seconds = rows + n, seconds + time.perf_counter() - t0
    return rows / seconds


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="60k impressions instead of 200k")
    p.add_argument("--impressions", type=int, default=None)
    args = p.parse_args()
    # Epochs must be long enough that Ray Data's per-epoch pipeline start (a few seconds
    # here) does not stand in for steady-state throughput: tens of thousands of rows.
    impressions, epochs = (60_000, 3) if args.quick else (200_000, 3)
    impressions = args.impressions or impressions
    init_ray(num_cpus=2, object_store_memory=500 * 2**20, include_dashboard=True)
    with tempfile.TemporaryDirectory() as tmp:
        make_data(tmp, impressions)
        common = [
            f"dataset.train=[{tmp}/prepared/train]",
            f"dataset.validation=[{tmp}/prepared/validation]",
            f"train.storage_path={tmp}/runs",
            f"train.epochs={epochs}",
            "train.batch_size=1024",
            "train.patience=100",
            f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        ]
        base = REPO / "configs" / "synthetic_ads.yaml"
        one = train.run(
            load_config(base, [*common, "train.run_name=w1", "train.num_workers=1"]), track=False
        )
        two = train.run(
            load_config(
                base,
                [
                    *common,
                    "train.run_name=w2",
                    "train.num_workers=2",
                    "train.resources_per_worker={CPU: 0.4}",
                ],
            ),  # fmt: skip
            track=False,
        )
        nocache = train.run(
            load_config(
                base,
                [
                    *common,
                    "train.run_name=w1s",
                    "train.num_workers=1",
                    "train.cache_datasets=false",
                ],
            ),  # fmt: skip
            track=False,
        )
        exact = train.run(
            load_config(
                base,
                [*common, "train.run_name=w1d", "train.num_workers=1", "train.deterministic=true"],
            ),
            track=False,
        )
        plain = plain_loop(load_config(base, common), epochs)
        rows_per_epoch = one.history[-1]["train/rows"]
    ray.shutdown()
    r1, r2 = steady_rows_per_s(one), steady_rows_per_s(two)
    r1_run = steady_rows_per_s(one, exclude_start=True)
    r1_nocache = steady_rows_per_s(nocache)
    r1_exact = steady_rows_per_s(exact)
    print(
        json.dumps(
            {
                "benchmark": "train_throughput",
                "model": "configs/synthetic_ads.yaml (default model)",
                "impressions": impressions,
                "train_rows_per_epoch": int(rows_per_epoch),
                "epochs": epochs,
                "batch_size": 1024,
                "torch_threads_per_trainer": 1,
                "ray_train_1_worker_rows_per_s": round(r1),
                "ray_train_2_workers_rows_per_s": round(r2),
                "plain_loop_rows_per_s": round(plain),
                "ratio_1_worker_vs_plain": round(r1 / plain, 3),
                "ratio_2_workers_vs_plain": round(r2 / plain, 3),
                "ray_train_1_worker_rows_per_s_after_first_batch": round(r1_run),
                "ratio_1_worker_after_first_batch_vs_plain": round(r1_run / plain, 3),
                "ray_train_1_worker_no_cache_rows_per_s": round(r1_nocache),
                "ratio_1_worker_no_cache_vs_plain": round(r1_nocache / plain, 3),
                "ray_train_1_worker_deterministic_rows_per_s": round(r1_exact),
                "ratio_1_worker_deterministic_vs_plain": round(r1_exact / plain, 3),
                "ratio_1_worker_deterministic_vs_1_worker": round(r1_exact / r1, 3),
                "ray_train_1_worker_stalls": stalls(one),
                "ray_train_1_worker_no_cache_stalls": stalls(nocache),
                "ray_train_2_workers_stalls": stalls(two),
            }
        )
    )


if __name__ == "__main__":
    main()
