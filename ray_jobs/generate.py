"""Generate synthetic raw logs with Ray Data.

    python -m ray_jobs.generate [CONFIG] [section.field=value ...]

Writes under ``generate.output`` (local path or s3://):
    impressions/part-NNNNN.parquet   one row per impression (IMPRESSIONS_SCHEMA)
    events/part-NNNNN.parquet        click / add_to_cart / checkout / engage events (EVENTS_SCHEMA)
    truth/impressions/...            true probabilities, labels and delays (TRUTH_SCHEMA)
    truth/advertisers.parquet        which advertisers are noisy
    _SUCCESS.json                    the resolved generate config and row counts
Truth never goes into the features: prepare reads only impressions/ and events/.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow.parquet as pq
import ray

from model.config import GenerateConfig, StorageConfig, UnirankConfig
from model.storage import resolve
from model.synthetic import World, generate_chunk, num_chunks
from ray_jobs.common import (
    init_ray,
    job_parser,
    parse_job_args,
    read_parquet,
    setup_logging,
    write_json,
)

PARTS = ("impressions", "events", "truth/impressions")


class _ChunkWriter:
    """Ray Data map_batches callable: each input row is a chunk id; writes that chunk's files."""

    def __init__(self, gen: GenerateConfig, storage: StorageConfig):
        self.gen = gen
        self.storage = storage
        self.world = World.build(gen)
        self.root = resolve(gen.output, storage)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"chunk": [], "impressions": [], "events": []}
        for chunk in batch["id"]:
            tables = generate_chunk(self.world, int(chunk))
            for part, key in zip(PARTS, ("impressions", "events", "truth"), strict=True):
                path = self.root.join(part, f"part-{int(chunk):05d}.parquet").path
                pq.write_table(tables[key], path, filesystem=self.root.filesystem)
            out["chunk"].append(int(chunk))
            out["impressions"].append(tables["impressions"].num_rows)
            out["events"].append(tables["events"].num_rows)
        return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}


def generate(cfg: UnirankConfig) -> dict:
    """Run the generation job; returns counts. Replaces whatever was at generate.output."""
    gen, storage = cfg.generate, cfg.storage
    root = resolve(gen.output, storage)
    fs = root.filesystem
    if _is_dir(fs, root.path):
        fs.delete_dir_contents(root.path)
    for part in PARTS:
        fs.create_dir(root.join(part).path, recursive=True)
    pq.write_table(
        World.build(gen).advertiser_table(),
        root.join("truth", "advertisers.parquet").path,
        filesystem=fs,
    )
    chunks = num_chunks(gen)
    t0 = time.perf_counter()
    ds = ray.data.range(chunks, override_num_blocks=gen.num_blocks or min(chunks, 64))
    stats = ds.map_batches(
        _ChunkWriter,
        fn_constructor_args=(gen, storage),
        batch_size=1,
        concurrency=(1, 64),
        num_cpus=1,
    ).take_all()
    elapsed = time.perf_counter() - t0
    counts = {
        "chunks": chunks,
        "impressions": int(sum(r["impressions"] for r in stats)),
        "events": int(sum(r["events"] for r in stats)),
        "seconds": round(elapsed, 2),
    }
    counts["rows_per_s"] = round(counts["impressions"] / max(elapsed, 1e-9), 1)
    write_json(
        root.join("_SUCCESS.json").uri, {"generate": gen.model_dump(mode="json"), **counts}, storage
    )
    return counts


def _is_dir(fs, path: str) -> bool:
    from pyarrow.fs import FileType

    return fs.get_file_info(path).type == FileType.Directory


# --------------------------------------------------------------------------- read back + summary


def _impression_stats(batch: dict[str, np.ndarray], max_len: int) -> dict[str, np.ndarray]:
    lengths = np.array([len(x) for x in batch["seq_item_ids"]], dtype=np.int64)
    tts = batch["task_type"].astype(str)
    names, inv = np.unique(tts, return_inverse=True)
    hist = np.zeros((len(names), max_len + 1), dtype=np.int64)
    np.add.at(hist, (inv, np.minimum(lengths, max_len)), 1)
    return {"task_type": names, "rows": np.bincount(inv), "seq_hist": hist}


def summarize(cfg: UnirankConfig) -> dict:
    """Read the raw logs back with Ray Data; per task_type rows, label rates, seq-length pctiles."""
    root = cfg.generate.output.rstrip("/")
    max_len = cfg.generate.max_seq_len
    imps = read_parquet(f"{root}/impressions", cfg.storage, columns=["task_type", "seq_item_ids"])
    per_tt: dict[str, dict] = {}
    hists: dict[str, np.ndarray] = {}
    for row in imps.map_batches(
        _impression_stats, fn_kwargs={"max_len": max_len}, batch_format="numpy"
    ).iter_rows():
        tt = str(row["task_type"])
        per_tt.setdefault(tt, {"rows": 0})["rows"] += int(row["rows"])
        hists[tt] = hists.get(tt, 0) + np.asarray(row["seq_hist"])
    events = read_parquet(
        f"{root}/events", cfg.storage, columns=["task_type", "event_type", "event_id"]
    )
    # Distinct event ids per (task_type, event_type): duplicates are logged, counted once.
    distinct = events.groupby(["task_type", "event_type"]).map_groups(
        lambda g: {
            "task_type": g["task_type"][:1],
            "event_type": g["event_type"][:1],
            "n": np.array([len(np.unique(g["event_id"]))]),
            "raw": np.array([len(g["event_id"])]),
        },
        batch_format="numpy",
    )
    for row in distinct.iter_rows():
        tt = str(row["task_type"])
        entry = per_tt.setdefault(tt, {"rows": 0})
        entry.setdefault("label_rates", {})[str(row["event_type"])] = int(row["n"])
        entry.setdefault("duplicate_events", 0)
        entry["duplicate_events"] += int(row["raw"]) - int(row["n"])
    for tt, entry in per_tt.items():
        rows = max(entry["rows"], 1)
        entry["label_rates"] = {
            k: round(v / rows, 5) for k, v in sorted(entry.get("label_rates", {}).items())
        }
        entry["seq_len_pctiles"] = _hist_percentiles(
            hists.get(tt, np.zeros(max_len + 1)), (50, 90, 99)
        )
    return {
        "task_types": dict(sorted(per_tt.items())),
        "rows": sum(e["rows"] for e in per_tt.values()),
    }


def _hist_percentiles(hist: np.ndarray, qs: tuple[int, ...]) -> dict[str, int]:
    cdf = np.cumsum(hist)
    total = cdf[-1] if len(cdf) else 0
    if total == 0:
        return {f"p{q}": 0 for q in qs}
    return {f"p{q}": int(np.searchsorted(cdf, q / 100 * total)) for q in qs}


def format_summary(summary: dict) -> str:
    lines = [f"{'task_type':<15}{'rows':>9}  label rates{'':<49}seq len p50/p90/p99"]
    for tt, e in summary["task_types"].items():
        rates = " ".join(f"{k}={v:.4f}" for k, v in e["label_rates"].items())
        p = e["seq_len_pctiles"]
        lines.append(f"{tt:<15}{e['rows']:>9}  {rates:<60}{p['p50']}/{p['p90']}/{p['p99']}")
    lines.append(f"{'total':<15}{summary['rows']:>9}")
    return "\n".join(lines)


def main(argv=None) -> None:
    setup_logging()
    args, cfg = parse_job_args(job_parser(__doc__.split("\n\n")[0], job="generate"), argv)
    init_ray(args.address)
    counts = generate(cfg)
    print(
        f"generated {counts['impressions']} impressions, {counts['events']} events "
        f"in {counts['seconds']} s ({counts['rows_per_s']:.0f} rows/s) -> {cfg.generate.output}"
    )
    summary = summarize(cfg)
    print(format_summary(summary))
    write_json(f"{cfg.generate.output.rstrip('/')}/summary.json", summary, cfg.storage)


if __name__ == "__main__":
    main()
