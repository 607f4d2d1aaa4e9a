"""Distributed training of the multi-task ensemble on Ray Train (V2 API).

    python -m ray_jobs.train [CONFIG] [section.field=value ...] [--address ADDR]

The driver validates the parquet against the feature spec, fits the FeatureProcessor's
numeric statistics on the train split (streamed), opens (or reopens) the run's MLflow run and
starts a TorchTrainer running ``ray_jobs.train_loop.train_func`` on ``train.num_workers``
workers. Ray Data streams ``dataset.train`` / ``dataset.validation`` (local or s3://) into the
workers (``streaming_split`` behind ``get_dataset_shard``).

Checkpoints go to ``train.storage_path/train.run_name/epoch_NNNN`` every epoch. A worker that
dies is replaced (``train.max_failures``) and resumes from the last checkpoint; running the
same command again resumes the run instead of starting over (raise ``train.epochs`` to train
further). ``train.init_from`` warm-starts from ``champion`` (the registered model's champion
alias), a ``models:/`` URI, or a checkpoint / run directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.fs as pafs
import ray
import torch

from model.config import UnirankConfig, config_from_dict
from model.features import FeatureProcessor
from model.schema import expected_columns, validate_files
from model.storage import Location, is_s3, list_parquet, resolve
from ray_jobs import registry
from ray_jobs.common import init_ray, job_parser, parse_job_args, read_parquet, setup_logging
from ray_jobs.train_loop import (
    BEST_MODEL_FILE,
    CHECKPOINT_FILES,
    MODEL_FILE,
    PROCESSOR_FILE,
    STATE_FILE,
    TrainLoopConfig,
    TrainState,
    load_state,
    train_func,
)

log = logging.getLogger("unirank.train")
CHECKPOINT_PREFIX = "epoch_"


@dataclass
class TrainResult:
    run_name: str
    run_dir: str  # storage URI of the run (checkpoints, MLflow marker)
    checkpoint: str | None  # URI of the latest complete checkpoint
    epochs: int  # last completed epoch
    best_epoch: int
    best_objective: float | None
    stopped_early: bool
    starts: list[int]  # epoch each attempt started after ([0] = never interrupted)
    history: list[dict] = field(default_factory=list)
    mlflow_run_id: str | None = None
    seconds: float = 0.0

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("history")
        d["last"] = self.history[-1] if self.history else None
        return d


# --------------------------------------------------------------------------- config helpers


def _abs(path: str) -> str:
    return path if is_s3(path) else os.path.abspath(os.path.expanduser(path))


def _abs_sqlite(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db: workers run in other directories."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix) :])
    return uri


def resolve_paths(cfg: UnirankConfig) -> UnirankConfig:
    """The config with every local location absolute (Ray workers do not share the driver's
    working directory). s3:// URIs are left alone."""
    d = cfg.model_dump(mode="json")
    for split in ("train", "validation", "test"):
        d["dataset"][split] = [_abs(p) for p in d["dataset"][split]]
    d["train"]["storage_path"] = _abs(d["train"]["storage_path"])
    if d["evaluate"]["output"]:
        d["evaluate"]["output"] = _abs(d["evaluate"]["output"])
    ini = d["train"]["init_from"]
    if ini and ini != "champion" and not ini.startswith(("models:/", "runs:/", "s3://")):
        d["train"]["init_from"] = _abs(ini)
    d["mlflow"]["tracking_uri"] = _abs_sqlite(d["mlflow"]["tracking_uri"])
    return config_from_dict(d, "<resolved>")


def needed_columns(cfg: UnirankConfig) -> list[str]:
    cols = list(expected_columns(cfg.dataset))
    w = cfg.dataset.features.weight_column
    return cols + ([w] if w and w not in cols else [])


def read_split(
    cfg: UnirankConfig,
    split: str,
    validate: bool = True,
    extra: list[str] | None = None,
    shuffle_seed: int | None = None,
) -> ray.data.Dataset:
    """The split's parquet as a Ray Dataset of the columns the model needs. With
    ``shuffle_seed``, every execution (epoch) reads the files in a new order."""
    uris = getattr(cfg.dataset, split)
    if not uris:
        raise ValueError(f"dataset.{split}: no locations configured")
    fs, files = list_parquet(uris, cfg.storage)
    if validate:
        validate_files(files, cfg.dataset, filesystem=fs)
    cols = list(dict.fromkeys(needed_columns(cfg) + list(extra or [])))  # unique, in order
    # Optional columns (e.g. the weight column) may be absent from a foreign parquet.
    import pyarrow.parquet as pq

    present = set(pq.read_schema(files[0], filesystem=fs).names)
    shuffle = None
    if shuffle_seed is not None:
        from ray.data import FileShuffleConfig

        shuffle = FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True)
    return read_parquet(
        uris, cfg.storage, columns=[c for c in cols if c in present], shuffle=shuffle
    )


# --------------------------------------------------------------------------- checkpoints


def list_checkpoints(cfg: UnirankConfig) -> list[Location]:
    """Complete checkpoints of the run (STATE_FILE is written last), oldest first."""
    where = registry.run_dir(cfg)
    fs = where.filesystem
    infos = fs.get_file_info(pafs.FileSelector(where.path, allow_not_found=True))
    out = []
    for info in sorted(infos, key=lambda i: i.path):
        name = info.base_name
        if info.type == pafs.FileType.Directory and name.startswith(CHECKPOINT_PREFIX):
            state = fs.get_file_info(f"{info.path}/{STATE_FILE}")
            if state.type == pafs.FileType.File:
                out.append(where.join(name))
    return out


def latest_checkpoint(cfg: UnirankConfig) -> Location | None:
    found = list_checkpoints(cfg)
    return found[-1] if found else None


def fetch_checkpoint(loc: Location, dest: str | Path | None = None) -> Path:
    """A local directory with the checkpoint's files (downloaded when on S3)."""
    if isinstance(loc.filesystem, pafs.LocalFileSystem):
        return Path(loc.path)
    dest = Path(dest or tempfile.mkdtemp(prefix="unirank-ckpt-"))
    pafs.copy_files(loc.path, str(dest), source_filesystem=loc.filesystem,
                    destination_filesystem=pafs.LocalFileSystem())  # fmt: skip
    return dest


def checkpoint_location(uri: str, cfg: UnirankConfig) -> Location:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    loc = resolve(uri, cfg.storage)
    if loc.filesystem.get_file_info(f"{loc.path}/{STATE_FILE}").type == pafs.FileType.File:
        return loc
    infos = loc.filesystem.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.base_name.startswith(CHECKPOINT_PREFIX))
    for name in reversed(names):
        if loc.filesystem.get_file_info(f"{loc.path}/{name}/{STATE_FILE}").type == pafs.FileType.File:  # fmt: skip
            return loc.join(name)
    raise FileNotFoundError(f"{uri}: neither a checkpoint nor a run directory with checkpoints")


def load_weights(uri: str, cfg: UnirankConfig, best: bool = True) -> tuple[dict, dict]:
    """(state_dict, processor state) of a checkpoint or run directory."""
    d = fetch_checkpoint(checkpoint_location(uri, cfg))
    weights = torch.load(d / (BEST_MODEL_FILE if best else MODEL_FILE), map_location="cpu")
    return weights, json.loads((d / PROCESSOR_FILE).read_text())


def init_weights(cfg: UnirankConfig) -> tuple[dict, dict] | None:
    """train.init_from -> (state_dict, processor state), or None."""
    src = cfg.train.init_from
    if not src:
        return None
    if src == "champion" or src.startswith("models:/"):
        from model.registry import download_training_dir, model_uri_for

        uri = model_uri_for(cfg.mlflow.registered_model, cfg.mlflow.champion_alias) \
            if src == "champion" else src  # fmt: skip
        registry.client(cfg)
        d = download_training_dir(uri)
        return (
            torch.load(d / BEST_MODEL_FILE, map_location="cpu"),
            json.loads((d / PROCESSOR_FILE).read_text()),
        )
    return load_weights(src, cfg)


# --------------------------------------------------------------------------- the driver


def fit_processor(cfg: UnirankConfig, ds: ray.data.Dataset) -> FeatureProcessor:
    """Numeric mean/std over the train split, streamed (only the numeric columns are read)."""
    proc = FeatureProcessor(cfg.dataset)
    names = [n for n in proc.layout.numeric_names if n in ds.columns()]
    if names:
        for batch in ds.select_columns(names).iter_batches(
            batch_size=65536, batch_format="pyarrow"
        ):
            proc.partial_fit(batch)
    return proc


def scaling(cfg: UnirankConfig):
    from ray.train import ScalingConfig

    t = cfg.train
    res = dict(t.resources_per_worker)
    if t.use_gpu:
        res.setdefault("GPU", 1.0)
    return ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=res)


def make_trainer(
    cfg: UnirankConfig,
    loop: TrainLoopConfig,
    datasets: dict,
    env: dict,
    callbacks: list | None = None,
):
    """The TorchTrainer of a run (also used by benchmarks/train_throughput.py and, with a
    TuneReportCallback in ``callbacks``, by each trial of tuning.search)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    where = resolve(cfg.train.storage_path, cfg.storage)
    run_config = RunConfig(
        name=cfg.train.run_name,
        storage_path=where.path,
        storage_filesystem=None
        if isinstance(where.filesystem, pafs.LocalFileSystem)
        else where.filesystem,  # fmt: skip
        failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        worker_runtime_env={"env_vars": env} if env else None,
        callbacks=callbacks,
    )
    ingest = DataConfig.default_ingest_options()  # what the driver's DataContext says
    ingest.preserve_order = ingest.preserve_order or cfg.train.deterministic
    return TorchTrainer(
        train_func,
        train_loop_config=loop.to_dict(),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=scaling(cfg),
        run_config=run_config,
        datasets=datasets,
        dataset_config=DataConfig(execution_options=ingest),
    )


@contextlib.contextmanager
def keep_order(on: bool):
    """Ray Data keeps block order in this block (train.deterministic) when ``on``."""
    options = ray.data.DataContext.get_current().execution_options
    before = options.preserve_order
    options.preserve_order = before or on
    try:
        yield
    finally:
        options.preserve_order = before


def prepare_loop(cfg: UnirankConfig, mlflow_run_id: str | None = None):
    """Datasets, processor and the workers' TrainLoopConfig for a (possibly resumed) run."""
    with keep_order(cfg.train.deterministic):
        return _prepare_loop(cfg, mlflow_run_id)


def _prepare_loop(cfg: UnirankConfig, mlflow_run_id: str | None):
    t = cfg.train
    seed = t.seed if t.shuffle_files else None
    train_ds = read_split(cfg, "train", shuffle_seed=seed)
    val_ds = read_split(cfg, "validation")
    if should_cache(cfg):
        # Read once into the object store; every epoch then starts from memory, and the
        # train blocks are shuffled in a new order per epoch (cheap: no data moves), the
        # same sequence of orders for the same train.seed.
        from ray.data import RandomSeedConfig

        order = RandomSeedConfig(seed=t.seed, reseed_after_execution=True)
        train_ds = train_ds.materialize().randomize_block_order(seed=order)
        val_ds = val_ds.materialize()
    latest = latest_checkpoint(cfg)
    init = None
    if latest is not None:  # resume: keep the statistics the weights were trained with
        processor_state = json.loads((fetch_checkpoint(latest) / PROCESSOR_FILE).read_text())
    else:
        init = init_weights(cfg)  # warm start keeps the champion's statistics
        processor_state = init[1] if init else fit_processor(cfg, train_ds).state_dict()
    rows = train_ds.count()
    steps = math.ceil(rows / t.num_workers / t.batch_size)
    if t.max_steps_per_epoch is not None:
        steps = min(steps, t.max_steps_per_epoch)
    loop = TrainLoopConfig(
        config=cfg.model_dump(mode="json"),
        processor=processor_state,
        steps_per_epoch=max(steps, 1),
        mlflow_run_id=mlflow_run_id,
        init_weights=ray.put(init[0]) if init is not None else None,
    )
    return loop, {"train": train_ds, "validation": val_ds}


# parquet bytes -> object-store bytes (decoded arrow; list columns of sequences inflate most)
ARROW_EXPANSION = 4.0
CACHE_SHARE = 0.3  # "auto" caches when the splits take at most this share of the store


def should_cache(cfg: UnirankConfig) -> bool:
    """train.cache_datasets: true / false, or auto = the train + validation splits (estimated
    from their parquet sizes) fit in CACHE_SHARE of the cluster's object store."""
    mode = cfg.train.cache_datasets
    if mode != "auto":
        return bool(mode)
    total = 0
    for split in ("train", "validation"):
        fs, files = list_parquet(getattr(cfg.dataset, split), cfg.storage)
        total += sum(i.size or 0 for i in fs.get_file_info(files))
    store = ray.cluster_resources().get("object_store_memory", 0.0)
    fits = total * ARROW_EXPANSION <= CACHE_SHARE * store
    log.info(
        "dataset cache %s: %.1f MB of parquet (~%.0f MB in memory), object store %.0f MB",
        "on" if fits else "off", total / 2**20, total * ARROW_EXPANSION / 2**20, store / 2**20,
    )  # fmt: skip
    return fits


def finished_state(cfg: UnirankConfig) -> TrainState | None:
    """The state of the run's latest checkpoint if there is nothing left to train."""
    latest = latest_checkpoint(cfg)
    if latest is None:
        return None
    state = load_state(fetch_checkpoint(latest))
    return state if state.stopped_early or state.epoch >= cfg.train.epochs else None


def run(
    cfg: UnirankConfig,
    address: str | None = None,
    track: bool = True,
    callbacks: list | None = None,
    mlflow_tags: dict[str, str] | None = None,
) -> TrainResult:
    """Train (or resume) the run ``train.run_name``; blocks until it finishes.

    ``callbacks`` go to the trainer's RunConfig (Tune passes its TuneReportCallback);
    ``mlflow_tags`` are set on the MLflow run (Tune links a trial to its search's parent run).
    """
    t0 = time.perf_counter()
    cfg = resolve_paths(cfg)
    init_ray(address)
    mlflow_run_id = registry.start_or_resume_run(cfg) if track else None
    if mlflow_run_id and mlflow_tags:
        c = registry.client(cfg)
        for key, value in mlflow_tags.items():
            c.set_tag(mlflow_run_id, key, value)
    status = "FAILED"
    try:
        done = finished_state(cfg)
        if done is not None:
            log.info(
                "run %s already finished (epoch %d of %d%s); raise train.epochs to train on",
                cfg.train.run_name, done.epoch, cfg.train.epochs,
                ", stopped early" if done.stopped_early else "",
            )  # fmt: skip
        else:
            loop, datasets = prepare_loop(cfg, mlflow_run_id)
            log.info(
                "training %s: %d worker(s) %s, %d epochs x <= %d steps/worker of %d rows -> %s",
                cfg.train.run_name, cfg.train.num_workers, scaling(cfg).resources_per_worker,
                cfg.train.epochs, loop.steps_per_epoch, cfg.train.batch_size,
                registry.run_dir(cfg).uri,
            )  # fmt: skip
            make_trainer(cfg, loop, datasets, registry.worker_env(), callbacks).fit()
        result = collect(cfg, mlflow_run_id, time.perf_counter() - t0)
        status = "FINISHED"
    finally:
        if mlflow_run_id:
            registry.end_run(mlflow_run_id, status)
    if mlflow_run_id:
        registry.log_dict(mlflow_run_id, result.summary(), "train/summary.json")
        registry.log_dict(mlflow_run_id, {"history": result.history}, "train/history.json")
        registry.log_text(mlflow_run_id, cfg.to_yaml(), "train/config.yaml")
    return result


def collect(cfg: UnirankConfig, mlflow_run_id: str | None, seconds: float) -> TrainResult:
    latest = latest_checkpoint(cfg)
    state, missing = TrainState(), []
    if latest is not None:
        local = fetch_checkpoint(latest)
        state = load_state(local)
        missing = [f for f in CHECKPOINT_FILES if not (local / f).exists()]
    if missing:
        raise RuntimeError(f"checkpoint {latest.uri} is incomplete: {missing} missing")
    best = state.best_objective
    return TrainResult(
        run_name=cfg.train.run_name,
        run_dir=registry.run_dir(cfg).uri,
        checkpoint=latest.uri if latest is not None else None,
        epochs=state.epoch,
        best_epoch=state.best_epoch,
        best_objective=best if math.isfinite(best) else None,
        stopped_early=state.stopped_early,
        starts=state.starts,
        history=state.history,
        mlflow_run_id=mlflow_run_id,
        seconds=round(seconds, 1),
    )


def main(argv=None) -> None:
    setup_logging()
    args, cfg = parse_job_args(job_parser(__doc__.split("\n\n")[0], job="train"), argv)
    result = run(cfg, address=args.address)
    print(json.dumps({"train": result.summary()}, default=str))


if __name__ == "__main__":
    main()
