"""The main job end to end on the embedded defaults: what `make demo` runs.

    python -m ray_jobs.demo [CONFIG] [section.field=value ...]

Starts a local Ray (or joins RAY_ADDRESS), writes everything under out/, and stops what it
started. Steps so far: generate synthetic raw logs -> read them back (per-task_type summary) ->
prepare training examples (label pipeline).
"""

from __future__ import annotations

import time

import ray

from ray_jobs import prepare
from ray_jobs.common import init_ray, job_parser, parse_job_args, setup_logging, write_json
from ray_jobs.generate import format_summary, generate, summarize


def main(argv=None) -> None:
    setup_logging()
    args, cfg = parse_job_args(job_parser(__doc__.split("\n\n")[0]), argv)
    started_here = not ray.is_initialized()
    init_ray(args.address)
    try:
        t0 = time.perf_counter()
        counts = generate(cfg)
        print(
            f"[1/3] generate: {counts['impressions']} impressions, {counts['events']} events "
            f"({counts['rows_per_s']:.0f} rows/s) -> {cfg.generate.output}"
        )
        summary = summarize(cfg)
        print("[2/3] read back with Ray Data; per task_type:")
        print(format_summary(summary))
        write_json(f"{cfg.generate.output.rstrip('/')}/summary.json", summary, cfg.storage)
        prepared = prepare.prepare(
            cfg.model_copy(
                update={"prepare": cfg.prepare.model_copy(update={"input": cfg.generate.output})}
            )
        )
        print(f"[3/3] prepare -> {cfg.prepare.output}")
        print(prepare.format_summary(prepared))
        print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    finally:
        if started_here:
            ray.shutdown()


if __name__ == "__main__":
    main()
