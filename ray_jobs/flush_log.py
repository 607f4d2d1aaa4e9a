"""Move the exposure log from Redis to parquet (local or s3://).

    python -m ray_jobs.flush_log CONFIG [key=value ...] [--batch N] [--dry-run]
    ray job submit --working-dir . -- python -m ray_jobs.flush_log CONFIG

For every use-case stream in ``serve.redis_url`` (``unirank:log:<use_case>``,
model.exposure_log) the entries are read in batches of ``--batch`` entries. Each batch is written as

    <serve.exposure_log_output>/<use_case>/exposures/part-<first>-<last>.parquet
    <serve.exposure_log_output>/<use_case>/outcomes/part-<first>-<last>.parquet
    <serve.exposure_log_output>/<use_case>/bad/part-<first>-<last>.jsonl  (unreadable entries)

(``first``/``last`` = the batch's stream ids) and only then deleted from the stream. A job
that dies between the two steps writes the same entries again on its next run: readers drop
duplicate ``stream_id`` values (serve_apps.experiments.read_log). Nothing is deleted that is
not written.
"""

from __future__ import annotations

import io
import json
import logging

import pyarrow.parquet as pq

from model.config import UnirankConfig
from model.exposure_log import RECORD_FIELD, BadRecord, decode, stream_key, to_tables
from model.storage import resolve, write_text
from ray_jobs.common import job_parser, parse_job_args, setup_logging

log = logging.getLogger("unirank.flush_log")


def _write_table(table, uri: str, cfg: UnirankConfig) -> None:
    loc = resolve(uri, cfg.storage)
    loc.filesystem.create_dir(loc.path.rsplit("/", 1)[0], recursive=True)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with loc.filesystem.open_output_stream(loc.path) as out:
        out.write(buf.getvalue())


def flush_use_case(client, cfg: UnirankConfig, use_case: str, batch: int) -> dict[str, int]:
    """Flush one use-case's stream; returns counts written."""
    key = stream_key(use_case)
    root = f"{cfg.serve.exposure_log_output.rstrip('/')}/{use_case}"
    counts = {"exposures": 0, "outcomes": 0, "bad": 0}
    while True:
        entries = client.xrange(key, "-", "+", count=batch)
        if not entries:
            return counts
        good, bad = [], []
        for sid, fields in entries:
            sid = sid.decode()
            raw = fields.get(RECORD_FIELD.encode(), b"")
            try:
                good.append((sid, decode(raw)))
            except BadRecord as exc:
                bad.append(
                    {"stream_id": sid, "error": str(exc), "raw": raw.decode(errors="replace")}
                )
        first, last = entries[0][0].decode(), entries[-1][0].decode()
        part = f"part-{first}-{last}"
        exposures, outcomes = to_tables(good)
        if exposures.num_rows:
            _write_table(exposures, f"{root}/exposures/{part}.parquet", cfg)
        if outcomes.num_rows:
            _write_table(outcomes, f"{root}/outcomes/{part}.parquet", cfg)
        if bad:
            lines = "\n".join(json.dumps(b) for b in bad) + "\n"
            write_text(f"{root}/bad/{part}.jsonl", lines, cfg.storage)
            log.warning("%s: %d unreadable log entries kept in %s/bad", use_case, len(bad), root)
        # written: now (and only now) remove exactly these entries
        client.xdel(key, *[sid for sid, _ in entries])
        counts["exposures"] += exposures.num_rows
        counts["outcomes"] += outcomes.num_rows
        counts["bad"] += len(bad)


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__.split("\n\n")[0], job="flush_log")
    p.add_argument("--batch", type=int, default=50_000, help="stream entries per parquet part")
    args, cfg = parse_job_args(p, argv)
    if not 1 <= args.batch <= 10_000_000:
        p.exit(2, f"error: --batch must be in 1..10000000, got {args.batch}\n")
    setup_logging()
    import redis

    client = redis.Redis.from_url(cfg.serve.redis_url)
    prefix = stream_key("")
    names = sorted(
        k.decode()[len(prefix) :] for k in client.scan_iter(match=f"{prefix}*", _type="STREAM")
    )
    report = {name: flush_use_case(client, cfg, name, args.batch) for name in names}
    print(json.dumps({"flushed": report, "output": cfg.serve.exposure_log_output}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
