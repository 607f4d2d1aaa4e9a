"""Shared plumbing of the Ray jobs: command line, Ray start-up, reading and writing parquet."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

import ray

from model.config import ConfigError, StorageConfig, UnirankConfig, config_args, load_config
from model.storage import list_parquet, resolve

log = logging.getLogger("unirank")


def job_parser(description: str, job: str | None = None) -> argparse.ArgumentParser:
    """The jobs' common CLI. ``job`` (a key of ray_jobs.dry_run.JOBS) adds ``--dry-run``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("config", nargs="?", help="YAML config (omit for the embedded defaults)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or local)")
    if job is not None:
        p.add_argument(
            "--dry-run",
            action="store_true",
            help="print the resolved inputs and outputs as one JSON line and exit (no Ray); "
            "exit 2 naming the field when a location is empty",
        )
        p.set_defaults(dry_run_job=job)
    return p


def parse_job_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> tuple[argparse.Namespace, UnirankConfig]:
    args = parser.parse_args(argv)
    args.config, args.overrides = config_args(args.config, args.overrides)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    if getattr(args, "dry_run", False):
        from ray_jobs import dry_run

        dry_run.run(args.dry_run_job, cfg, args, parser)  # exits
    return args, cfg


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )


def init_ray(address: str | None = None, **kwargs) -> None:
    """Connect to RAY_ADDRESS / the given address, or start a local Ray."""
    from ray.data import DataContext

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address, **{"log_to_driver": True, **kwargs})
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def read_parquet(uris: list[str] | str, storage: StorageConfig, **kwargs) -> ray.data.Dataset:
    fs, files = list_parquet(uris, storage)
    return ray.data.read_parquet(files, filesystem=fs, **kwargs)


def write_json(uri: str, payload: dict, storage: StorageConfig) -> None:
    from model.storage import write_text

    write_text(uri, json.dumps(payload, indent=2, sort_keys=True, default=str), storage)


def location(uri: str, storage: StorageConfig):
    return resolve(uri, storage)
