"""The main job end to end on the embedded defaults: what `make demo` runs.

    python -m ray_jobs.demo [CONFIG] [section.field=value ...] [--until STEP] [--log PATH]

Starts a local Ray (or joins RAY_ADDRESS), writes everything under out/, and stops what it
started. Steps:

1. generate   synthetic raw logs (Ray Data)
2. summary    read them back: rows, label rates, sequence lengths per task_type
3. prepare    the label pipeline -> train / validation / test parquet
4. train      Ray Train on the prepared splits (checkpoints, MLflow)
5. evaluate   per task x task_type on the test split, calibrated
6. register   export (TorchScript + calibrators + retrieval index) -> MLflow registry;
              the `champion` alias moves only when the new version wins
7. search     a tiny Ray Tune search (``tune.num_samples`` trials of a few steps each, ASHA);
              its best trial is registered through the same champion rule
8. serve      every use-case on Ray Serve with the champion, one sample request each

``dataset.train`` / ``validation`` / ``test`` default to ``prepare.output``'s splits; the
search's space defaults to DEMO_SPACE when ``tune.space`` is empty. ``--until STEP`` stops
after a step.

The terminal shows the demo's own step lines and tables; everything else the process and its
Ray workers print (Ray's and MLflow's logs and warnings, progress bars, worker output) goes
to ``--log`` (default ``out/demo.log``, appended; ``--log -`` keeps it all on the terminal).
A failure prints its traceback on the terminal too.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import ray

from model.config import UnirankConfig, config_from_dict
from ray_jobs.common import init_ray, job_parser, parse_job_args, setup_logging, write_json

STEPS = ("generate", "summary", "prepare", "train", "evaluate", "register", "search", "serve")

# What the demo's search tries (a real search names its space in the config: tune.space).
DEMO_SPACE = {
    "model.fusion": {"choice": ["average", "gating"]},
    "loss_weight.checkout": {"loguniform": [0.3, 3.0]},
    "train.lr": {"loguniform": [0.001, 0.01]},
}
# Each trial is a few steps: the demo shows the machinery, not a converged search. A trial's
# workers leave a whole CPU free for Ray Data's reads on a 2-core machine.
DEMO_TRIAL = {"epochs": 2, "max_steps_per_epoch": 10, "resources_per_worker": {"CPU": 0.5}}


def with_splits(cfg: UnirankConfig) -> UnirankConfig:
    """dataset.{train,validation,test} default to the prepared splits."""
    d = cfg.model_dump(mode="json")
    root = cfg.prepare.output.rstrip("/")
    for split in ("train", "validation", "test"):
        d["dataset"][split] = d["dataset"][split] or [f"{root}/{split}"]
    d["prepare"]["input"] = cfg.generate.output
    return config_from_dict(d, "<demo>")


def search_config(cfg: UnirankConfig) -> UnirankConfig:
    d = cfg.model_dump(mode="json")
    d["tune"]["space"] = d["tune"]["space"] or DEMO_SPACE
    t = d["train"]
    t["epochs"] = min(t["epochs"], DEMO_TRIAL["epochs"])
    t["max_steps_per_epoch"] = min(
        t["max_steps_per_epoch"] or 10**9, DEMO_TRIAL["max_steps_per_epoch"]
    )
    t["resources_per_worker"] = DEMO_TRIAL["resources_per_worker"]
    return config_from_dict(d, "<demo search>")


DEFAULT_LOG = "out/demo.log"
Say = Callable[[str], None]


@contextmanager
def quiet_output(log_path: str) -> Iterator[Say]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C extensions and
    anything Ray forwards from its workers too) to ``log_path``; yield ``say``, which writes a
    line to the original terminal and to the log. ``-`` keeps everything on the terminal."""
    if log_path == "-":
        yield lambda text: print(text, flush=True)
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - closed below, after the fds
    log.write(f"\n==== ray_jobs.demo {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    console = open(os.dup(1), "w", buffering=1)  # noqa: SIM115

    def say(text: str) -> None:
        console.write(text + "\n")
        console.flush()
        log.write(text + "\n")

    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        yield say
    except BaseException as exc:
        if not isinstance(exc, SystemExit) or exc.code not in (0, None):
            # the traceback reaches the terminal as the exception leaves (fds restored below)
            log.write("".join(traceback.format_exception(exc)))
            say(f"demo failed: {exc!r} (full log: {log_path})")
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        console.close()
        log.close()


def step(say: Say, n: int, name: str, text: str) -> None:
    say(f"[{n}/{len(STEPS)}] {name}: {text}")


def main(argv=None) -> None:
    setup_logging()
    parser = job_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--until", choices=STEPS, default=STEPS[-1], help="last step to run")
    parser.add_argument(
        "--log", default=DEFAULT_LOG, help="where Ray / MLflow output goes ('-': the terminal)"
    )
    args, cfg = parse_job_args(parser, argv)
    last = STEPS.index(args.until)
    cfg = with_splits(cfg)
    if args.log != "-":
        print(f"Ray and MLflow logs, warnings and progress bars: {args.log}", flush=True)
    with quiet_output(args.log) as say:
        started_here = not ray.is_initialized()
        init_ray(args.address)
        t0 = time.perf_counter()
        try:
            run_steps(cfg, last, say)
            say(f"demo finished in {time.perf_counter() - t0:.0f} s")
        finally:
            if started_here:
                ray.shutdown()


def run_steps(cfg: UnirankConfig, last: int, say: Say = print) -> None:
    from ray_jobs import evaluate, export, prepare, train
    from ray_jobs.generate import format_summary, generate, summarize

    counts = generate(cfg)
    step(say, 1, "generate", f"{counts['impressions']} impressions, {counts['events']} events "
         f"({counts['rows_per_s']:.0f} rows/s) -> {cfg.generate.output}")  # fmt: skip
    if last < 1:
        return
    summary = summarize(cfg)
    step(say, 2, "summary", "read back with Ray Data; per task_type:")
    say(format_summary(summary))
    write_json(f"{cfg.generate.output.rstrip('/')}/summary.json", summary, cfg.storage)
    if last < 2:
        return
    prepared = prepare.prepare(cfg)
    step(say, 3, "prepare", f"-> {cfg.prepare.output}")
    say(prepare.format_summary(prepared))
    if last < 3:
        return
    result = train.run(cfg)
    best = "n/a" if result.best_objective is None else f"{result.best_objective:.4f}"
    step(say, 4, "train", f"run {result.run_name}: {result.epochs} epochs, best objective {best} "
         f"(epoch {result.best_epoch}) in {result.seconds} s -> {result.checkpoint}")  # fmt: skip
    if last < 4:
        return
    report = evaluate.run(cfg)
    step(say, 5, "evaluate", f"-> {report['output']}")
    say(evaluate.format_report(report))
    if last < 5:
        return
    registered = export.run(cfg)
    step(say, 6, "register", export.format_result(registered))
    if last < 6:
        return
    from tuning.search import format_summary as format_search
    from tuning.search import search

    found = search(search_config(cfg))
    step(say, 7, "search", f"-> {found['results']}")
    say(format_search(found))
    if last < 7:
        return
    from serve_apps.run import demo as serve_demo

    free, total = ray.available_resources().get("CPU", 0.0), ray.cluster_resources()["CPU"]
    say(f"  cluster: {free:.2f} of {total:.0f} CPUs free for Serve")
    m = cfg.mlflow
    champion = f"models:/{m.registered_model}@{m.champion_alias}"
    step(say, 8, "serve", f"every use-case on Ray Serve with {champion}, one request each:")
    for name, response in serve_demo(train.resolve_paths(cfg), model_dir=champion):
        items = response.get("items", [])[:3]
        top = ", ".join(
            f"{i.get('item_id')} ({i.get('score') or 0.0:.3f})"
            for i in items
            if isinstance(i, dict)
        )
        say(f"  {name:<14} {len(response.get('items', []))} items, top: {top or 'none'} "
            f"fallback={response.get('fallback')}")  # fmt: skip
        if not items:
            say("    " + json.dumps(response)[:300])


if __name__ == "__main__":
    main()
