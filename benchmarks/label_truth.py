"""The label pipeline scored against the generator's truth: noisy-advertiser flags, label rates,
lost conversions, label calibration.

    python benchmarks/label_truth.py [--quick] [--sizes N [N ...]] [--config YAML]
                                     [--data ROOT] [section.field=value ...]

For each size (full: 200k impressions, the ``make demo`` size, and 1M; ``--quick``: 10k),
runs ``ray_jobs.generate`` then ``ray_jobs.prepare`` (the real jobs, default config plus the
overrides) and scores prepare's output (all three splits) against ``truth/``:

``flags``
    precision and recall of ``reports/advertisers.json``'s flagged advertisers against
    ``truth/advertisers.parquet``'s ``noisy`` column (null when nothing is flagged / noisy);
    ``noisy_with_ad_clicks`` counts the noisy advertisers that had any clicked ad impression,
    the ones the logs can reveal.
``rates``
    per task x task_type: prepare's weighted label rate (sum(w y) / sum(w) over the rows whose
    label is not null, after negative sampling, stratification and advertiser down-weighting)
    against the true rate of the same impressions (every impression prepare did not
    quarantine) under the same attribution window and cut-off: a click or engage counts when
    it happened by the cut-off; a conversion counts when the generator says it happened, at
    most ``prepare.attribution_window_hours[task]`` after the click and by the cut-off; a
    conversion label is unobserved (left out of the true rate) while its window is still open
    at the cut-off without a conversion, as prepare masks it. ``rel_error`` = prepared / true
    - 1.
    ``rel_error_unflagged_advertisers`` is the same over the advertisers prepare did not flag
    only, which leaves out the down-weighting of the flagged ones.
``lost_conversions``
    per conversion task: output rows that truly converted inside the window by the cut-off
    but carry label 0 (the goal is 0), and their total sample weight, which estimates how
    many impressions of the unsampled population that is; also the positives that did not
    truly convert in the window (fabricated conversions prepare kept).
``ece``
    per task, the expected calibration error of the generator's true probability (p_<task>,
    the perfect model) against prepare's weighted labels: how far the labels a model is fit
    to sit from truth (10 equal-width bins, ``model.metrics.expected_calibration_error``). It
    is not a trained model's ECE after calibration: that needs training
    (benchmarks/train_quality.py trains).

Nothing here changes prepare; it only measures it. Prints one JSON line; the runs are named
``small`` (the first size) and ``large`` (the second, full mode only). ``--data ROOT`` scores
an existing generate + prepare output instead (``ROOT/raw``, ``ROOT/prepared``, made with
``--config`` and the overrides) as ``small``, without starting Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402

from benchmarks._util import emit, start_ray  # noqa: E402
from model.config import load_config  # noqa: E402
from model.metrics import expected_calibration_error  # noqa: E402
from model.storage import list_parquet  # noqa: E402
from ray_jobs.generate import generate  # noqa: E402
from ray_jobs.prepare import prepare  # noqa: E402

TASKS = ("click", "add_to_cart", "checkout", "engage")
CONVERSIONS = ("add_to_cart", "checkout")
ADS = "ads"
HOUR = 3600


def _ts(col) -> np.ndarray:
    """Epoch seconds (int64) of a timestamp column."""
    return pc.cast(col, pa.timestamp("s")).cast(pa.int64()).to_numpy(zero_copy_only=False)


def _read(uri: str, columns: list[str]) -> pa.Table:
    _, files = list_parquet(uri)
    return pa.concat_tables(pq.read_table(f, columns=columns) for f in files)


def first_event_times(raw: str, impression_ids: np.ndarray, event_type: str) -> np.ndarray:
    """Per impression (in ``impression_ids`` order): the first logged time of ``event_type``,
    or -1 when none was logged."""
    ev = _read(f"{raw}/events", ["impression_id", "event_type", "event_time"])
    ev = ev.filter(pc.equal(ev["event_type"], event_type))
    ids = ev["impression_id"].to_numpy()
    t = _ts(ev["event_time"])
    order = np.lexsort((t, ids))
    ids, t = ids[order], t[order]
    first = np.r_[True, ids[1:] != ids[:-1]]
    ids, t = ids[first], t[first]
    out = np.full(len(impression_ids), -1, dtype=np.int64)
    pos = positions(impression_ids, ids)
    found = pos >= 0
    out[found] = t[pos[found]]
    return out


def positions(values: np.ndarray, among: np.ndarray) -> np.ndarray:
    """Index of each value in ``among``, -1 where absent."""
    return pc.index_in(pa.array(values), pa.array(among)).fill_null(-1).to_numpy()


def true_labels(raw: str, cfg, cutoff: int, quarantined: set[str]) -> dict:
    """The population prepare labelled and its true labels as of ``cutoff`` (NaN = unobserved,
    as prepare would mask it), plus the true probabilities."""
    truth = _read(
        f"{raw}/truth/impressions",
        ["impression_id", "task_type", "advertiser_id", *(f"p_{t}" for t in TASKS),
         "true_add_to_cart", "true_checkout", "atc_delay_h", "checkout_delay_h"],
    )  # fmt: skip
    ids = truth["impression_id"].to_numpy()
    if quarantined:
        keep = ~np.isin(np.char.add("r", ids.astype(str)), list(quarantined))
        truth, ids = truth.filter(pa.array(keep)), ids[keep]
    tt = np.asarray(truth["task_type"].to_pylist(), dtype=object)
    is_ads = tt == ADS
    click_t = first_event_times(raw, ids, "click")
    engage_t = first_event_times(raw, ids, "engage")
    clicked = (click_t >= 0) & (click_t <= cutoff)
    y = {
        "click": clicked.astype(float),
        "engage": np.where(is_ads, np.nan, (engage_t >= 0) & (engage_t <= cutoff)),
    }
    delays = {"add_to_cart": "atc_delay_h", "checkout": "checkout_delay_h"}
    in_window = {}
    for task in CONVERSIONS:
        w_s = cfg.prepare.attribution_window_hours[task] * HOUR
        delay_s = np.nan_to_num(
            truth[delays[task]].to_numpy(zero_copy_only=False).astype(float) * HOUR, nan=np.inf
        )
        happened = truth[f"true_{task}"].to_numpy(zero_copy_only=False)
        conv = clicked & happened & (delay_s <= w_s) & (click_t + delay_s <= cutoff)
        closed = click_t + w_s <= cutoff
        label = np.where(conv, 1.0, np.where(~clicked | closed, 0.0, np.nan))
        y[task] = np.where(is_ads, label, np.nan)
        in_window[task] = conv & is_ads
    p = {t: truth[f"p_{t}"].to_numpy().astype(float) for t in TASKS}
    return {
        "ids": ids,
        "task_type": tt,
        "advertiser_id": truth["advertiser_id"].to_numpy(),
        "y": y,
        "p": p,
        "in_window": in_window,
    }


def score(root: str, cfg, summary: dict) -> dict:
    raw, out = f"{root}/raw", f"{root}/prepared"
    cutoff = int(datetime.fromisoformat(summary["cutoff"]).timestamp())
    quarantined: set[str] = set()
    with contextlib.suppress(FileNotFoundError):  # no quarantined rows: no files
        quarantined = set(_read(f"{out}/quarantine", ["request_id"])["request_id"].to_pylist())
    truth = true_labels(raw, cfg, cutoff, quarantined)

    # ---- noisy-advertiser flags
    adv = pq.read_table(f"{raw}/truth/advertisers.parquet").to_pandas()
    noisy = set(adv.loc[adv["noisy"], "advertiser_id"].astype(int))
    report = Path(out, "reports", "advertisers.json")
    flagged = (
        {int(r["advertiser_id"]) for r in json.loads(report.read_text())["flagged"]}
        if report.exists()
        else set()
    )
    ads_clicks = _read(f"{raw}/impressions", ["impression_id", "task_type", "advertiser_id"])
    ads_clicks = ads_clicks.filter(pc.equal(ads_clicks["task_type"], ADS))
    pos = positions(ads_clicks["impression_id"].to_numpy(), truth["ids"])
    ok = pos >= 0
    clicked_ads = truth["y"]["click"][pos[ok]] == 1.0
    advertisers_clicked = set(
        ads_clicks["advertiser_id"].to_numpy()[np.flatnonzero(ok)[clicked_ads]].astype(int)
    )
    tp = len(flagged & noisy)
    flags = {
        "advertisers": len(adv),
        "noisy": len(noisy),
        "noisy_with_ad_clicks": len(noisy & advertisers_clicked),
        "flagged": len(flagged),
        "true_positives": tp,
        "precision": round(tp / len(flagged), 4) if flagged else None,
        "recall": round(tp / len(noisy), 4) if noisy else None,
        "recall_of_noisy_with_ad_clicks": (
            round(len(flagged & noisy & advertisers_clicked) / len(noisy & advertisers_clicked), 4)
            if noisy & advertisers_clicked
            else None
        ),
    }

    # ---- prepared rows, matched to the truth by request_id = "r<impression_id>"
    cols = ["request_id", "task_type", "sample_weight", *TASKS]
    prepared = pa.concat_tables(_read(f"{out}/{s}", cols) for s in ("train", "validation", "test"))
    pid = np.array([int(r[1:]) for r in prepared["request_id"].to_pylist()], dtype=np.int64)
    row = positions(pid, truth["ids"])
    if (row < 0).any():
        raise RuntimeError(f"{out}: {int((row < 0).sum())} prepared rows are not in the truth")
    w = prepared["sample_weight"].to_numpy().astype(float)
    ptt = np.asarray(prepared["task_type"].to_pylist(), dtype=object)
    # rows of advertisers prepare did not flag, on both sides (separates the down-weighting
    # of flagged advertisers from the other causes of a rate gap)
    unflagged_truth = ~np.isin(truth["advertiser_id"], list(flagged))
    unflagged = unflagged_truth[row]

    rates: dict = {}
    ece: dict = {}
    lost: dict = {}
    for task in TASKS:
        y = prepared[task].to_numpy(zero_copy_only=False).astype(float)
        obs = ~np.isnan(y)
        ty = truth["y"][task]
        for tt in sorted(set(ptt[obs])):
            m = obs & (ptt == tt)
            t_obs = ~np.isnan(ty) & (truth["task_type"] == tt)
            if not m.any() or not t_obs.any():
                continue
            prep_rate = float((w[m] * y[m]).sum() / w[m].sum())
            true_rate = float(ty[t_obs].mean())
            mu, tu = m & unflagged, t_obs & unflagged_truth
            prep_u = float((w[mu] * y[mu]).sum() / w[mu].sum()) if w[mu].sum() > 0 else None
            true_u = float(ty[tu].mean()) if tu.any() else None
            rates[f"{task}/{tt}"] = {
                "prepared_rows": int(m.sum()),
                "true_rows": int(t_obs.sum()),
                "prepared_weighted_rate": round(prep_rate, 6),
                "true_rate": round(true_rate, 6),
                "rel_error": round(prep_rate / true_rate - 1, 4) if true_rate > 0 else None,
                "rel_error_unflagged_advertisers": (
                    round(prep_u / true_u - 1, 4) if prep_u is not None and true_u else None
                ),
            }
        if obs.any():
            ece[task] = round(
                expected_calibration_error(y[obs], truth["p"][task][row[obs]], w[obs]), 5
            )
        if task in CONVERSIONS:
            neg = obs & (y == 0.0) & truth["in_window"][task][row]
            fake = obs & (y == 1.0) & ~truth["in_window"][task][row]
            lost[task] = {
                "rows": int(neg.sum()),
                "weight": round(float(w[neg].sum()), 1),
                "in_window_conversions": int(truth["in_window"][task].sum()),
                "positives_not_truly_converted": int(fake.sum()),
                "positives_not_truly_converted_weight": round(float(w[fake].sum()), 1),
            }
    errors = [abs(r["rel_error"]) for r in rates.values() if r["rel_error"] is not None]
    return {
        "flags": flags,
        "rates": rates,
        "max_abs_rate_rel_error": round(max(errors), 4) if errors else None,
        "lost_conversions": lost,
        "lost_conversion_rows": sum(v["rows"] for v in lost.values()),
        "ece": ece,
    }


def run(config: str | None, size: int | None, root: str, overrides: list[str]) -> dict:
    """generate + prepare ``size`` impressions under ``root`` and score them; with ``size``
    None, score what is already there."""
    paths = [f"generate.output={root}/raw", f"prepare.input={root}/raw",
             f"prepare.output={root}/prepared"]  # fmt: skip
    sized = [f"generate.num_impressions={size}"] if size else []
    cfg = load_config(config, [*sized, *paths, *overrides])
    t0 = time.perf_counter()
    if size:
        generate(cfg)
        summary = prepare(cfg)
    else:
        summary = json.loads(Path(root, "prepared", "reports", "summary.json").read_text())
    secs = time.perf_counter() - t0
    t1 = time.perf_counter()
    scored = score(root, cfg, summary)
    return {
        "impressions": cfg.generate.num_impressions,
        "rows_out": summary["rows_out"],
        "generate_prepare_s": round(secs, 1),
        "score_s": round(time.perf_counter() - t1, 1),
        **scored,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="10k impressions (200k and 1M)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="impressions per run")
    p.add_argument("--config", default=None, help="a configs/*.yaml (default: built-in)")
    p.add_argument("--data", default=None, help="score ROOT/raw + ROOT/prepared as they are")
    p.add_argument("overrides", nargs="*", help="section.field=value for generate and prepare")
    args = p.parse_args()
    sizes = args.sizes or ([10_000] if args.quick else [200_000, 1_000_000])
    # Scoring needs no Ray: only generate + prepare do.
    own = None if args.data else start_ray(num_cpus=2, object_store_memory=600 * 2**20)
    out: dict = {
        "benchmark": "label_truth",
        "quick": args.quick,
        "ray_cluster": "none" if own is None else "own" if own else "joined",
        "overrides": args.overrides,
    }
    out["data"] = args.data or "generated"
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            out["small"] = run(args.config, None, args.data, args.overrides)
        else:
            for name, size in zip(("small", "large"), sizes[:2], strict=False):
                out[name] = run(args.config, size, f"{tmp}/{name}", args.overrides)
    ray.shutdown()
    emit(out)


if __name__ == "__main__":
    main()
