"""Training throughput: the real train_func through Ray Train vs a plain PyTorch loop.

    python benchmarks/train_throughput.py [--quick] [--impressions N] [--data ROOT]

Generates and prepares synthetic data (or reuses ``--data ROOT``: ``ROOT/prepared/{train,
validation}`` as ``configs/smoke.yaml``'s generate + prepare write them), then trains the
default (full-size) model of ``configs/synthetic_ads.yaml`` on it and prints one JSON line
with training rows/s (validation excluded, the first epoch excluded as warm-up) and ratios:

* ``ray_train_1_worker``: ``ray_jobs.train.run`` -> TorchTrainer, 1 worker (1 CPU), the
  cached train split (object store) streamed by Ray Data: ``train_loop.batches``
  (iter_torch_batches, ``ProcessorCollate`` in Ray Data's prefetch thread,
  ``train.prefetch_batches`` ahead);
* ``ray_train_2_workers``: the same with 2 DDP workers of 0.4 CPU each (fractional, so Ray
  Data's read tasks keep a free CPU on this 2-CPU cluster; full mode only);
* ``plain_loop_prefetch``: one process, no Ray: the train split read into memory up front
  (what the cache gives Ray), a background thread collating with the same
  ``ProcessorCollate`` the same number of batches ahead, the training step on the main
  thread; the baseline of ``ratio_1_worker_vs_plain``;
* ``plain_loop_inline``: the same loop collating inline on the training thread (no
  prefetch), so the reader sees what the prefetch thread is worth;
* full mode only (``--quick`` runs 1 worker and the plain loops): ``ray_train_2_workers``,
  ``ray_train_1_worker_no_cache`` (``train.cache_datasets=false``: every epoch streams the
  parquet again) and ``ray_train_1_worker_deterministic`` (``train.deterministic=true``: block
  order kept, deterministic kernels, the price of bit-for-bit reruns).

Identical on both sides: the rows (the prepared train split), the fitted FeatureProcessor
(``train.fit_processor``), the collate (``ProcessorCollate``: an Arrow table in, a Batch out),
the batch size (1024), the model, loss, optimizer and LR schedule (``build_model``,
``MultiTaskLoss``, ``train_loop.build_optimizer`` with the same total steps), the step
(forward, masked weighted loss, backward, clip when ``train.grad_clip`` is set, step, the
per-step loss read-out), the seed, one torch intra-op thread per trainer (a Ray worker with
<= 1 CPU gets OMP_NUM_THREADS=1; the plain loop calls ``torch.set_num_threads(1)``) and the
prefetch depth.
Not identical: Ray's side runs the trainer in a worker actor fed through
``streaming_split`` by Ray Data (its blocks come from the object store, in a new order each
epoch, with read and split tasks in other processes that may use the second core); the plain
loop slices one in-memory table in order, and its collate thread shares its process.
"""

from __future__ import annotations

import argparse
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from benchmarks._util import emit, start_ray  # noqa: E402
from model.config import load_config  # noqa: E402
from model.ensemble import build_model  # noqa: E402
from model.losses import MultiTaskLoss  # noqa: E402
from model.storage import list_parquet  # noqa: E402
from ray_jobs import train  # noqa: E402
from ray_jobs.generate import generate  # noqa: E402
from ray_jobs.prepare import prepare  # noqa: E402
from ray_jobs.train_loop import ProcessorCollate, build_optimizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BATCH = 1024


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


def prefetched(it, depth: int):
    """``it`` produced by a background thread, up to ``depth`` items ahead (Ray Data's
    ``prefetch_batches`` for the plain loop). Errors in the thread re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    done = object()

    def work() -> None:
        try:
            for x in it:
                q.put(x)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    threading.Thread(target=work, daemon=True).start()
    while (x := q.get()) is not done:
        if isinstance(x, BaseException):
            raise x
        yield x


def plain_loop(cfg, epochs: int, prefetch: bool) -> dict:
    """The training step of ``train_loop.train_func`` in one process, no Ray in the loop."""
    cfg = train.resolve_paths(cfg)
    t = cfg.train
    torch.set_num_threads(1)
    torch.manual_seed(t.seed)
    fs, files = list_parquet(cfg.dataset.train, cfg.storage)
    table = pa.concat_tables(
        pq.read_table(f, filesystem=fs, columns=train.needed_columns(cfg)) for f in files
    ).combine_chunks()
    collate = ProcessorCollate(train.fit_processor(cfg, train.read_split(cfg, "train")))
    model = build_model(cfg)
    criterion = MultiTaskLoss.from_config(cfg)
    steps_per_epoch = -(-len(table) // t.batch_size)
    opt, sched = build_optimizer(model, t, epochs * steps_per_epoch)
    rows = seconds = 0.0
    for epoch in range(epochs):
        model.train()
        t0, n, loss_sum, task_sums = time.perf_counter(), 0, 0.0, {}
        it = (collate(table.slice(s, t.batch_size)) for s in range(0, len(table), t.batch_size))
        for b in prefetched(it, t.prefetch_batches) if prefetch else it:
            logits = model(*b.inputs())
            loss, per_task = criterion({k: v.float() for k, v in logits.items()}, b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            sched.step()
            n += len(b)
            loss_sum += float(loss.detach())
            for k, v in per_task.items():
                task_sums[k] = task_sums.get(k, 0.0) + float(v)
        if epoch > 0 or epochs == 1:  # the first epoch is warm-up, as for Ray Train
            rows, seconds = rows + n, seconds + time.perf_counter() - t0
    return {"rows_per_s": rows / seconds, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="20k impressions, 2 epochs, 1-worker run only (200k, 3 epochs, every variant)",
    )
    p.add_argument("--impressions", type=int, default=None)
    p.add_argument("--data", default=None, help="reuse ROOT/prepared instead of generating")
    args = p.parse_args()
    # Epochs must be long enough that Ray Data's per-epoch pipeline start (a few seconds
    # here) does not stand in for steady-state throughput: tens of thousands of rows.
    impressions, epochs = (20_000, 2) if args.quick else (200_000, 3)
    impressions = args.impressions or impressions
    own = start_ray(num_cpus=2, object_store_memory=500 * 2**20, include_dashboard=True)
    runs: dict[str, train.TrainResult] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or tmp
        if args.data is None:
            make_data(tmp, impressions)
        common = [
            f"dataset.train=[{root}/prepared/train]",
            f"dataset.validation=[{root}/prepared/validation]",
            f"train.storage_path={tmp}/runs",
            f"train.epochs={epochs}",
            f"train.batch_size={BATCH}",
            "train.patience=100",
            f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        ]
        base = REPO / "configs" / "synthetic_ads.yaml"
        variants = {"1_worker": ["train.num_workers=1"]}
        if not args.quick:
            variants["2_workers"] = ["train.num_workers=2", "train.resources_per_worker={CPU: 0.4}"]
            variants["1_worker_no_cache"] = ["train.num_workers=1", "train.cache_datasets=false"]
            variants["1_worker_deterministic"] = [
                "train.num_workers=1",
                "train.deterministic=true",
            ]
        for name, extra in variants.items():
            cfg = load_config(base, [*common, f"train.run_name={name}", *extra])
            runs[name] = train.run(cfg, track=False)
        cfg = load_config(base, common)
        plain_pre = plain_loop(cfg, epochs, prefetch=True)
        plain_inline = plain_loop(cfg, epochs, prefetch=False)
        rows_per_epoch = runs["1_worker"].history[-1]["train/rows"]
    ray.shutdown()

    plain = plain_pre["rows_per_s"]
    rates = {name: steady_rows_per_s(r) for name, r in runs.items()}
    r1 = rates["1_worker"]
    r1_run = steady_rows_per_s(runs["1_worker"], exclude_start=True)
    out = {
        "benchmark": "train_throughput",
        "quick": args.quick,
        "ray_cluster": "own" if own else "joined",
        "model": "configs/synthetic_ads.yaml (default model)",
        "data": args.data or f"generated: {impressions} impressions",
        "train_rows_per_epoch": int(rows_per_epoch),
        "epochs": epochs,
        "batch_size": BATCH,
        "torch_threads_per_trainer": plain_pre["threads"],
        "prefetch_batches": cfg.train.prefetch_batches,
        "plain_loop_prefetch_rows_per_s": round(plain),
        "plain_loop_inline_rows_per_s": round(plain_inline["rows_per_s"]),
        "ratio_plain_prefetch_vs_inline": round(plain / plain_inline["rows_per_s"], 3),
    }
    for name, rate in rates.items():
        out[f"ray_train_{name}_rows_per_s"] = round(rate)
        out[f"ratio_{name}_vs_plain"] = round(rate / plain, 3)
        out[f"ratio_{name}_vs_plain_inline"] = round(rate / plain_inline["rows_per_s"], 3)
    out["ray_train_1_worker_rows_per_s_after_first_batch"] = round(r1_run)
    out["ratio_1_worker_after_first_batch_vs_plain"] = round(r1_run / plain, 3)
    if "1_worker_deterministic" in rates:
        out["ratio_1_worker_deterministic_vs_1_worker"] = round(
            rates["1_worker_deterministic"] / r1, 3
        )
    for name, r in runs.items():
        out[f"ray_train_{name}_stalls"] = stalls(r)
    emit(out)


if __name__ == "__main__":
    main()
