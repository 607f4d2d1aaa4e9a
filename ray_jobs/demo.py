"""The main job end to end on the embedded defaults: what `make demo` runs.

    python -m ray_jobs.demo [CONFIG] [section.field=value ...] [--until STEP]

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
"""

from __future__ import annotations

import json
import time

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


def step(n: int, name: str, text: str) -> None:
    print(f"[{n}/{len(STEPS)}] {name}: {text}", flush=True)


def main(argv=None) -> None:
    setup_logging()
    parser = job_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--until", choices=STEPS, default=STEPS[-1], help="last step to run")
    args, cfg = parse_job_args(parser, argv)
    last = STEPS.index(args.until)
    cfg = with_splits(cfg)
    started_here = not ray.is_initialized()
    init_ray(args.address)
    t0 = time.perf_counter()
    try:
        run_steps(cfg, last)
        print(f"demo finished in {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        if started_here:
            ray.shutdown()


def run_steps(cfg: UnirankConfig, last: int) -> None:
    from ray_jobs import evaluate, export, prepare, train
    from ray_jobs.generate import format_summary, generate, summarize

    counts = generate(cfg)
    step(1, "generate", f"{counts['impressions']} impressions, {counts['events']} events "
         f"({counts['rows_per_s']:.0f} rows/s) -> {cfg.generate.output}")  # fmt: skip
    if last < 1:
        return
    summary = summarize(cfg)
    step(2, "summary", "read back with Ray Data; per task_type:")
    print(format_summary(summary))
    write_json(f"{cfg.generate.output.rstrip('/')}/summary.json", summary, cfg.storage)
    if last < 2:
        return
    prepared = prepare.prepare(cfg)
    step(3, "prepare", f"-> {cfg.prepare.output}")
    print(prepare.format_summary(prepared))
    if last < 3:
        return
    result = train.run(cfg)
    best = "n/a" if result.best_objective is None else f"{result.best_objective:.4f}"
    step(4, "train", f"run {result.run_name}: {result.epochs} epochs, best objective {best} "
         f"(epoch {result.best_epoch}) in {result.seconds} s -> {result.checkpoint}")  # fmt: skip
    if last < 4:
        return
    report = evaluate.run(cfg)
    step(5, "evaluate", f"-> {report['output']}")
    print(evaluate.format_report(report))
    if last < 5:
        return
    registered = export.run(cfg)
    step(6, "register", export.format_result(registered))
    if last < 6:
        return
    from tuning.search import format_summary as format_search
    from tuning.search import search

    found = search(search_config(cfg))
    step(7, "search", f"-> {found['results']}")
    print(format_search(found))
    if last < 7:
        return
    from serve_apps.run import demo as serve_demo

    free, total = ray.available_resources().get("CPU", 0.0), ray.cluster_resources()["CPU"]
    print(f"  cluster: {free:.2f} of {total:.0f} CPUs free for Serve", flush=True)
    m = cfg.mlflow
    champion = f"models:/{m.registered_model}@{m.champion_alias}"
    step(8, "serve", f"every use-case on Ray Serve with {champion}, one request each:")
    for name, response in serve_demo(train.resolve_paths(cfg), model_dir=champion):
        items = response.get("items", [])[:3]
        top = ", ".join(
            f"{i.get('item_id')} ({i.get('score') or 0.0:.3f})"
            for i in items
            if isinstance(i, dict)
        )
        print(f"  {name:<14} {len(response.get('items', []))} items, top: {top or 'none'} "
              f"fallback={response.get('fallback')}")  # fmt: skip
        if not items:
            print("   ", json.dumps(response)[:300])


if __name__ == "__main__":
    main()
