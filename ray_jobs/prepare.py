"""The label pipeline: raw logs -> training-ready unified examples, as a streaming Ray Data job.

    python -m ray_jobs.prepare [CONFIG] [section.field=value ...]

Reads ``prepare.input``/impressions and /events (the raw-log schema of model/schema.py, as
written by ray_jobs.generate or ray_jobs.movielens) and writes under ``prepare.output``:

    {train,validation,test}/date=YYYY-MM-DD/*.parquet   unified examples, split by event time
    quarantine/                                          bad rows with a `bad_reason` column
    reports/summary.json, reports/advertisers.json,
    reports/delays.json, reports/delays.png              what happened, and why

Nothing is collected on the driver but small aggregates (per advertiser, per task_type, per
day). Output date partitions are replaced whole, so re-running prepare with newer conversion
events updates the labels of older dates without duplicating or losing rows.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.expressions import col

from model.config import PrepareConfig, UnirankConfig
from model.schema import PROFILE_COLUMNS, PROFILE_LISTS, UNIFIED_SCHEMA, placeholder
from model.storage import Location, list_parquet, resolve
from ray_jobs import labels as L
from ray_jobs.common import (
    init_ray,
    job_parser,
    parse_job_args,
    read_parquet,
    setup_logging,
    write_json,
)

log = logging.getLogger("unirank.prepare")
SPLITS = ("train", "validation", "test")
ADS = {"ads"}
TASKS = ("click", "add_to_cart", "checkout", "engage")
OPTIONAL = frozenset([*PROFILE_COLUMNS, *PROFILE_LISTS])  # placeholders when not logged
ROWS_PER_PARTITION = 50_000  # impressions per hash partition of the events/impressions join


class PrepareError(RuntimeError):
    """The input cannot be prepared (e.g. too many bad rows); nothing was written."""


def _seconds(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if pa.types.is_timestamp(col.type):
        return pc.divide(pc.cast(pc.cast(col, pa.timestamp("us", tz="UTC")), pa.int64()), 1_000_000)
    return pc.cast(col, pa.int64())


def _parse_time(text: str) -> int:
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


# --------------------------------------------------------------------------- Ray Data UDFs


def _events_seconds(batch: pa.Table) -> pa.Table:
    return batch.append_column("event_time_s", _seconds(batch["event_time"]))


def _scalars(batch: pa.Table, columns) -> pd.DataFrame:
    """The scalar columns of a batch as pandas (list columns stay in arrow, untouched)."""
    names = [c for c in dict.fromkeys(columns) if c in batch.column_names]
    return batch.select(names).to_pandas()


def _set(batch: pa.Table, name: str, values) -> pa.Table:
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
    if name in batch.column_names:
        return batch.set_column(batch.column_names.index(name), name, arr)
    return batch.append_column(name, arr)


def _check_impressions(
    batch: pa.Table, task_types: list[str], cutoff: int, min_time: int
) -> pa.Table:
    batch = _set(batch, "event_time_s", _seconds(batch["event_time"]))
    df = _scalars(batch, ["task_type", "event_time_s", *L.ID_COLUMNS])
    return _set(batch, "bad_reason", L.bad_reasons(df, task_types, cutoff, min_time).astype(str))


def _aggregate_events(df: pd.DataFrame, cfg: PrepareConfig) -> pd.DataFrame:
    return L.aggregate_events(df, cfg)


LABEL_INPUTS = (
    "click_ts",
    "engage_ts",
    "add_to_cart_ts",
    "checkout_ts",
    "add_to_cart_conf",
    "add_to_cart_low",
    "checkout_low",
    "n_duplicates",
    "n_low_confidence",
)


def _label(batch: pa.Table, cfg: PrepareConfig, cutoff: int) -> pa.Table:
    df = _scalars(batch, ["task_type", *LABEL_INPUTS])
    for name in LABEL_INPUTS:
        if name not in df:
            df[name] = np.nan
    labels = L.attribute(df, cfg, cutoff, ADS)
    for name in (*TASKS, "sample_weight"):
        batch = _set(batch, name, labels[name].to_numpy(dtype=np.float32))
    for name in LABEL_INPUTS:
        values = df[name].to_numpy(dtype=float)
        if name.startswith("n_"):
            values = np.nan_to_num(values).astype(np.int64)
        batch = _set(batch, name, values)
    return batch.drop_columns([c for c in ("bad_reason",) if c in batch.column_names])


def _partials(batch: pa.Table, cfg: PrepareConfig, full: bool) -> dict[str, np.ndarray]:
    """Small per-batch aggregates (label-rate terms per task_type; with full=True also per
    advertiser conversion stats and delay histograms), one JSON row per batch, summed on the
    driver. Much cheaper than a shuffle for aggregates this small."""
    df = _scalars(
        batch,
        ["task_type", "advertiser_id", "sample_weight", "add_to_cart_conf", *TASKS, *LABEL_INPUTS],
    )
    w = df["sample_weight"].to_numpy(dtype=float)
    out: dict = {"rates": {}}
    for tt, idx in df.groupby("task_type").indices.items():
        terms = {"rows": len(idx), "weight": float(w[idx].sum())}
        for t in TASKS:
            y = df[t].to_numpy(dtype=float)[idx]
            obs = ~np.isnan(y)
            terms[f"wy_{t}"] = float((w[idx] * np.nan_to_num(y))[obs].sum())
            terms[f"wo_{t}"] = float(w[idx][obs].sum())
            terms[f"pos_{t}"] = int((y == 1.0).sum())
        out["rates"][tt] = terms
    if full:
        ads = df[df["task_type"].isin(ADS) & (df["advertiser_id"] > 0)]
        converted = (ads["add_to_cart"] == 1.0).to_numpy()
        adv = (
            pd.DataFrame(
                {
                    "advertiser_id": ads["advertiser_id"].to_numpy(),
                    "clicks": ads["click"].to_numpy(dtype=float),
                    "conversions": converted.astype(float),
                    "conf_sum": np.where(converted, ads["add_to_cart_conf"].fillna(1.0), 0.0),
                }
            )
            .groupby("advertiser_id")
            .sum()
        )
        out["advertisers"] = {
            str(k): list(v) for k, v in zip(adv.index, adv.to_numpy().tolist(), strict=True)
        }
        out["delays"] = {
            t: {d: h.tolist() for d, h in per.items()}
            for t, per in L.conversion_delays(df, cfg).items()
        }
        out["n_duplicates"] = int(df["n_duplicates"].sum())
        out["n_low_confidence"] = int(df["n_low_confidence"].sum())
    return {"json": np.array([json.dumps(out)], dtype=object)}


def _reduce_partials(ds: ray.data.Dataset, cfg: PrepareConfig, full: bool) -> dict:
    total: dict = {
        "rates": {},
        "advertisers": {},
        "delays": {},
        "n_duplicates": 0,
        "n_low_confidence": 0,
    }
    for row in ds.map_batches(
        _partials, fn_kwargs={"cfg": cfg, "full": full}, batch_format="pyarrow"
    ).iter_rows():
        part = json.loads(row["json"])
        for tt, terms in part["rates"].items():
            acc = total["rates"].setdefault(tt, dict.fromkeys(terms, 0.0))
            for k, v in terms.items():
                acc[k] += v
        for a, v in part.get("advertisers", {}).items():
            acc = total["advertisers"].setdefault(a, [0.0, 0.0, 0.0])
            total["advertisers"][a] = [x + y for x, y in zip(acc, v, strict=True)]
        for t, per in part.get("delays", {}).items():
            for d, h in per.items():
                tot = total["delays"].setdefault(t, {})
                tot[int(d)] = tot.get(int(d), 0) + np.asarray(h)
        total["n_duplicates"] += part.get("n_duplicates", 0)
        total["n_low_confidence"] += part.get("n_low_confidence", 0)
    return total


def _bad_counts(batch: pa.Table) -> dict[str, np.ndarray]:
    reasons, counts = np.unique(
        batch["bad_reason"].to_numpy(zero_copy_only=False).astype(str), return_counts=True
    )
    return {"reason": reasons, "n": counts}


def _finalize(
    batch: pa.Table,
    cfg: PrepareConfig,
    adv: dict[int, tuple[float, str]],
    strat: dict[str, float],
    bounds: tuple[int, int],
) -> pa.Table:
    """Outlier action, reliability feature, sampling weights, split and date; unified columns."""
    df = _scalars(
        batch,
        ["impression_id", "task_type", "advertiser_id", "event_time_s", "sample_weight", *TASKS],
    )
    known = [
        adv.get(int(a), (1.0, "none")) if a > 0 else (0.0, "none") for a in df["advertiser_id"]
    ]
    reliability = np.array([k[0] for k in known], dtype=np.float32)
    action = np.array([k[1] for k in known])
    w = df["sample_weight"].to_numpy(dtype=np.float32)
    w = np.where(action == "downweight", w * cfg.outlier_weight, w)
    keep, mult = L.sample_rows(
        df[list(TASKS)], df["impression_id"].to_numpy(), df["task_type"].to_numpy(), cfg, strat
    )
    keep &= action != "drop"
    t = df["event_time_s"].to_numpy()
    t_val, t_test = bounds
    split = np.where(t >= t_test, "test", np.where(t >= t_val, "validation", "train"))
    date = np.asarray(pd.to_datetime(t, unit="s", utc=True).strftime("%Y-%m-%d"))
    batch = _set(batch, "advertiser_reliability", reliability)
    batch = _set(batch, "sample_weight", (w * mult).astype(np.float32))
    # Content / profile columns that the raw logs do not carry hold their placeholder.
    arrays = [
        batch[f.name].cast(f.type)
        if f.name in batch.column_names or f.name not in OPTIONAL
        else placeholder(f.name, batch.num_rows)
        for f in UNIFIED_SCHEMA
    ]
    out = pa.Table.from_arrays(
        [*arrays, pa.array(split.astype(str)), pa.array(date.astype(str))],
        schema=UNIFIED_SCHEMA.append(pa.field("split", pa.string())).append(
            pa.field("date", pa.string())
        ),
    )
    return out.filter(pa.array(keep))


# --------------------------------------------------------------------------- the job


def prepare(cfg: UnirankConfig) -> dict:
    p, storage = cfg.prepare, cfg.storage
    t_start = time.perf_counter()
    out = resolve(p.output, storage)
    inp = p.input.rstrip("/")

    events = read_parquet(f"{inp}/events", storage).map_batches(
        _events_seconds, batch_format="pyarrow"
    )
    cutoff = _parse_time(p.cutoff_time) if p.cutoff_time else _default_cutoff(inp, storage)
    task_types = cfg.dataset.task_types

    imps = read_parquet(f"{inp}/impressions", storage).map_batches(
        _check_impressions,
        fn_kwargs={
            "task_types": task_types,
            "cutoff": cutoff,
            "min_time": _parse_time(p.min_event_time),
        },
        batch_format="pyarrow",
    )
    # ---- pass 1: count bad rows; fail before anything is written when there are too many
    reasons: dict[str, int] = {}
    for r in imps.map_batches(_bad_counts, batch_format="pyarrow").iter_rows():
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + int(r["n"])
    rows_in = sum(reasons.values())
    quarantined = {k: v for k, v in reasons.items() if k}
    bad_fraction = sum(quarantined.values()) / max(rows_in, 1)
    if rows_in == 0:
        raise PrepareError(f"{inp}/impressions: no rows")
    if bad_fraction > p.max_bad_fraction:
        raise PrepareError(
            f"{inp}/impressions: {bad_fraction:.2%} of {rows_in} rows are bad {quarantined}, "
            f"more than prepare.max_bad_fraction={p.max_bad_fraction:.2%}; nothing was written"
        )
    work = out.join("_work")
    _clear(work)
    if quarantined:
        imps.filter(expr=col("bad_reason") != "").write_parquet(
            work.join("quarantine").path, filesystem=out.filesystem
        )

    # ---- events -> one row per impression (duplicates counted once), joined to impressions
    # Shuffle partitions grow with the input, so each join partition stays about the same size
    # and memory per worker does not grow with the data.
    cpus = int(ray.cluster_resources().get("CPU", 2))
    nparts = max(2 * cpus, -(-rows_in // ROWS_PER_PARTITION))
    # Events after the cut-off are not visible "as of" the cut-off.
    events = events.filter(expr=col("event_time_s") <= cutoff)
    per_imp = events.repartition(nparts, keys=["impression_id"]).map_batches(
        _aggregate_events, fn_kwargs={"cfg": p}, batch_size=None, batch_format="pandas"
    )
    good = imps.filter(expr=col("bad_reason") == "")
    labelled = good.join(
        per_imp, "left_outer", num_partitions=nparts, on=("impression_id",)
    ).map_batches(_label, fn_kwargs={"cfg": p, "cutoff": cutoff}, batch_format="pyarrow")
    labelled.write_parquet(work.join("labelled").path, filesystem=out.filesystem)
    labelled = ray.data.read_parquet(work.join("labelled").path, filesystem=out.filesystem)

    # ---- pass 2: small aggregates
    agg = _reduce_partials(labelled, p, full=True)
    adv_stats = pd.DataFrame(
        [(int(a), *v) for a, v in agg["advertisers"].items()],
        columns=["advertiser_id", "clicks", "conversions", "conf_sum"],
    )
    verdict = L.detect_noisy_advertisers(adv_stats, p) if len(adv_stats) else None
    adv_map = (
        {
            int(r.advertiser_id): (float(r.reliability), str(r.action))
            for r in verdict.table.itertuples()
        }
        if verdict is not None
        else {}
    )
    before = agg["rates"]
    strat = L.stratify_rates({tt: int(v["rows"]) for tt, v in before.items()}, p.task_type_mix)
    delays = _delay_report(agg["delays"], p)

    # ---- pass 3: outlier action, reliability feature, sampling, split, write, publish
    cutoff_day = cutoff // L.DAY * L.DAY
    t_test = int(cutoff_day + L.DAY - round(p.test_days) * L.DAY)
    t_val = int(t_test - round(p.validation_days) * L.DAY)
    final = labelled.map_batches(
        _finalize,
        fn_kwargs={"cfg": p, "adv": adv_map, "strat": strat, "bounds": (t_val, t_test)},
        batch_format="pyarrow",
    )
    final.write_parquet(
        work.join("staged").path, filesystem=out.filesystem, partition_cols=["split", "date"]
    )
    published = _publish(work.join("staged"), out)
    _replace_dir(work.join("quarantine"), out.join("quarantine"), keep_empty=True)

    after = _reduce_partials(_read_splits(cfg, out), p, full=False)["rates"]
    rows_out = sum(int(v["rows"]) for v in after.values())
    summary = {
        "input": inp,
        "output": p.output,
        "cutoff": _iso(cutoff),
        "split_boundaries": {"validation_start": _iso(t_val), "test_start": _iso(t_test)},
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_quarantined": quarantined,
        "bad_fraction": round(bad_fraction, 6),
        "duplicate_events_removed": agg["n_duplicates"],
        "low_confidence_conversions": agg["n_low_confidence"],
        "low_confidence_action": p.low_confidence_action,
        "advertisers_flagged": int(verdict.table["flagged"].sum()) if verdict is not None else 0,
        "outlier_action": p.outlier_action,
        "stratify_keep_rate": {k: round(v, 4) for k, v in strat.items()},
        "negative_rate": p.negative_rate,
        "label_rates_before_sampling": _rate_table(before),
        "label_rates": _rate_table(after),
        "partitions_written": published,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    reports = out.join("reports")
    write_json(reports.join("summary.json").uri, summary, storage)
    write_json(reports.join("delays.json").uri, delays, storage)
    if verdict is not None:
        write_json(reports.join("advertisers.json").uri, _advertiser_report(verdict), storage)
    _plot_delays(delays, reports, storage)
    _clear(work)
    return summary


def _default_cutoff(inp: str, storage) -> int:
    """The newest logged time: the last event, or the last impression if later by less than a
    day (impressions further in the future are impossible timestamps, quarantined)."""
    last_event = _newest(f"{inp}/events", storage)
    if last_event is None:
        raise PrepareError(f"{inp}/events: no event_time values; set prepare.cutoff_time")
    last_imp = _newest(f"{inp}/impressions", storage, ceiling=last_event + L.DAY)
    return max(last_event, last_imp or 0)


def _newest(uri: str, storage, ceiling: int | None = None) -> int | None:
    """The largest event_time (epoch seconds) of the parquet files at ``uri`` that is at most
    ``ceiling``, or None when there is none.

    Row-group statistics in the file footers answer without reading data, so this costs one
    footer read per file instead of a scan of the column; a row group without statistics, or
    whose maximum lies above the ceiling, has just its event_time column read. Files are
    split into Ray tasks, so footers are read in parallel across the cluster."""
    fs, files = list_parquet(uri, storage)
    step = max(1, -(-len(files) // (4 * int(ray.cluster_resources().get("CPU", 1)))))
    refs = [
        _newest_in_files.remote(fs, files[i : i + step], ceiling)
        for i in range(0, len(files), step)
    ]
    try:
        found = [t for t in ray.get(refs) if t is not None]
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, PrepareError):
            raise exc.cause from None  # a bad file: its own message, not a remote traceback
        raise
    return max(found) if found else None


@ray.remote(num_cpus=0.25)
def _newest_in_files(fs, paths: list[str], ceiling: int | None) -> int | None:
    best = None
    for path in paths:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if "event_time" not in names:
                raise PrepareError(f"{path}: no event_time column (has {names})")
            j = names.index("event_time")
            kind = pf.schema_arrow.field("event_time").type
            for i in range(pf.metadata.num_row_groups):
                stats = pf.metadata.row_group(i).column(j).statistics
                t = _stat_seconds(stats.max, kind) if stats and stats.has_min_max else None
                if t is None or (ceiling is not None and t > ceiling):
                    t = _column_max(pf.read_row_group(i, ["event_time"])["event_time"], ceiling)
                if t is not None and (best is None or t > best):
                    best = t
    return best


def _stat_seconds(value, kind: pa.DataType) -> int | None:
    """A footer's max statistic as epoch seconds (naive timestamps are UTC, integers are
    seconds), or None when it cannot be read that way."""
    if pa.types.is_timestamp(kind) and isinstance(value, datetime):
        return int((value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp())
    if pa.types.is_integer(kind) and isinstance(value, int):
        return value
    return None


def _column_max(col: pa.ChunkedArray, ceiling: int | None) -> int | None:
    seconds = _seconds(col)
    if ceiling is not None:
        seconds = pc.filter(seconds, pc.less_equal(seconds, ceiling))
    top = pc.max(seconds).as_py()
    return None if top is None else int(top)


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat()


def _rate_table(agg: dict[str, dict[str, float]]) -> dict:
    table = {}
    for tt, v in sorted(agg.items()):
        rates = {t: round(v[f"wy_{t}"] / v[f"wo_{t}"], 6) for t in TASKS if v[f"wo_{t}"] > 0}
        positives = {t: int(v[f"pos_{t}"]) for t in TASKS if v[f"wo_{t}"] > 0}
        table[tt] = {
            "rows": int(v["rows"]),
            "weight": round(v["weight"], 2),
            "rates": rates,
            "positives": positives,
        }
    return table


def _read_splits(cfg: UnirankConfig, out: Location) -> ray.data.Dataset:
    paths = [out.join(s).uri for s in SPLITS if _files(out.join(s))]
    return read_parquet(paths, cfg.storage)


def _delay_report(per: dict[str, dict[int, np.ndarray]], p: PrepareConfig) -> dict:
    report: dict = {"bins_hours": L.DELAY_BINS_H.round(4).tolist(), "tasks": {}}
    for task, days in per.items():
        window = p.attribution_window_hours[task]
        total = sum(days.values())
        report["tasks"][task] = {
            "window_hours": window,
            "conversions": int(total.sum()),
            "percentiles_hours": _hist_pct(total, (50, 90, 95, 99)),
            "fraction_outside_window": _outside(total, window),
            "histogram": total.tolist(),
            "per_day": {
                _iso(d * L.DAY)[:10]: {
                    "conversions": int(h.sum()),
                    "fraction_outside_window": _outside(h, window),
                }
                for d, h in sorted(days.items())
            },
        }
    return report


def _hist_pct(hist: np.ndarray, qs) -> dict[str, float]:
    cdf = np.cumsum(hist) / max(hist.sum(), 1)
    edges = np.append(L.DELAY_BINS_H, L.DELAY_BINS_H[-1])
    return {
        f"p{q}": round(float(edges[min(np.searchsorted(cdf, q / 100) + 1, len(edges) - 1)]), 3)
        for q in qs
    }


def _outside(hist: np.ndarray, window_h: float) -> float:
    over = window_h <= L.DELAY_BINS_H  # bins starting at or beyond W
    return round(float(hist[over].sum() / max(hist.sum(), 1)), 5)


def _plot_delays(report: dict, reports: Location, storage) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    if not tasks:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    edges = np.array(report["bins_hours"])
    for task, r in tasks.items():
        h = np.array(r["histogram"], dtype=float)
        axes[0].plot(np.maximum(edges, 1 / 60), np.cumsum(h) / max(h.sum(), 1), label=task)
        axes[0].axvline(r["window_hours"], ls="--", lw=0.8)
        days = list(r["per_day"])
        axes[1].plot(
            days, [r["per_day"][d]["fraction_outside_window"] for d in days], marker="o", label=task
        )
    axes[0].set(
        xscale="log",
        xlabel="click -> conversion delay (hours)",
        ylabel="CDF",
        title="Delay distribution (dashed: W)",
    )
    axes[1].set(xlabel="click date", ylabel="fraction outside W", title="Late conversions per day")
    axes[1].tick_params(axis="x", rotation=60, labelsize=7)
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    loc = reports.join("delays.png")
    loc.filesystem.create_dir(reports.path, recursive=True)
    with loc.filesystem.open_output_stream(loc.path) as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


def _advertiser_report(verdict: L.AdvertiserVerdict) -> dict:
    t = verdict.table
    cols = [
        "advertiser_id",
        "clicks",
        "conversions",
        "cvr",
        "cvr_shrunk",
        "match_quality",
        "z_cvr",
        "z_match",
        "score",
        "action",
        "reliability",
    ]
    flagged = t[t["flagged"]].sort_values("score", ascending=False)[cols]
    return {
        "advertisers": len(t),
        "flagged": json.loads(flagged.to_json(orient="records")),
        "median_cvr_shrunk": float(t["cvr_shrunk"].median()),
        "median_match_quality": float(t["match_quality"].median()),
    }


# --------------------------------------------------------------------------- files


def _isdir(loc: Location) -> bool:
    return loc.filesystem.get_file_info(loc.path).type == pafs.FileType.Directory


def _clear(loc: Location) -> None:
    if _isdir(loc):
        loc.filesystem.delete_dir(loc.path)


def _files(loc: Location) -> list[str]:
    if not _isdir(loc):
        return []
    sel = pafs.FileSelector(loc.path, recursive=True)
    return [i.path for i in loc.filesystem.get_file_info(sel) if i.type == pafs.FileType.File]


def _replace_dir(src: Location, dest: Location, keep_empty: bool = False) -> list[str]:
    """Make dest hold exactly src's files: copy the new ones in first, then delete the old
    ones, so a crash half-way leaves extra files, never a partition with rows missing."""
    fs = src.filesystem
    old = set(_files(dest))
    new = []
    fs.create_dir(dest.path, recursive=True)
    for path in _files(src):
        target = dest.path + path[len(src.path) :]
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        fs.copy_file(path, target)
        new.append(target)
    for path in old - set(new):
        fs.delete_file(path)
    if not new and not keep_empty and _isdir(dest):
        fs.delete_dir(dest.path)
    return new


def _publish(staged: Location, out: Location) -> dict[str, list[str]]:
    """Replace each (split, date) partition of the output whole with its staged version; a date
    that moved to another split is removed from its old split."""
    written: dict[str, list[str]] = {}
    fs = staged.filesystem
    for split_info in fs.get_file_info(pafs.FileSelector(staged.path)) if _isdir(staged) else []:
        split = split_info.base_name.split("=", 1)[1]
        for date_info in fs.get_file_info(pafs.FileSelector(split_info.path)):
            date_dir = date_info.base_name
            for other in SPLITS:
                if other != split:
                    _clear(out.join(other, date_dir))
            src = Location(staged.uri, fs, date_info.path)
            _replace_dir(src, out.join(split, date_dir))
            written.setdefault(split, []).append(date_dir.split("=", 1)[1])
    return {k: sorted(v) for k, v in written.items()}


def format_summary(s: dict) -> str:
    lines = [
        f"prepare: {s['rows_in']} rows in, {s['rows_out']} rows out, quarantined {s['rows_quarantined'] or 0}",
        f"  duplicates removed {s['duplicate_events_removed']}, low-confidence conversions "
        f"{s['low_confidence_conversions']} ({s['low_confidence_action']}), advertisers flagged "
        f"{s['advertisers_flagged']} ({s['outlier_action']})",
        f"  splits: validation from {s['split_boundaries']['validation_start']}, test from "
        f"{s['split_boundaries']['test_start']} (cut-off {s['cutoff']})",
        f"  {'task_type':<15}{'rows':>8}  weighted label rates",
    ]
    for tt, e in s["label_rates"].items():
        rates = " ".join(f"{k}={v:.4f}" for k, v in e["rates"].items())
        lines.append(f"  {tt:<15}{e['rows']:>8}  {rates}")
    return "\n".join(lines)


def main(argv=None) -> None:
    setup_logging()
    args, cfg = parse_job_args(job_parser(__doc__.split("\n\n")[0], job="prepare"), argv)
    init_ray(args.address)
    try:
        summary = prepare(cfg)
    except PrepareError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(format_summary(summary))


if __name__ == "__main__":
    main()
