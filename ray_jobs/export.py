"""Export the run's best model for serving and register it in MLflow; move the champion alias
only when the new version wins.

    python -m ray_jobs.export [CONFIG] [section.field=value ...] [--checkpoint URI]

1. Load the run's best weights, fit calibrators on validation (``evaluate.calibration``).
2. ``model.export.export`` -> the serving directory (TorchScript, calibrators, processor
   statistics, resolved config) plus the candidate retrieval index built from
   ``dataset.train`` (``retrieval.npz``: Serve finds it next to the model) and the users'
   newest profiles (``user_profiles.npz``, model.user_profiles); reload it with ``load_predictor`` and score
   ``evaluate.split`` through it, so the number that decides is the exported artifact's.
3. Log it as an MLflow pyfunc model in the run's MLflow run with artifacts ``serving/`` (the
   export directory) and ``training/`` (eager weights for ``train.init_from=champion``), a
   signature and an input example, and register it as a new version of
   ``mlflow.registered_model``.
4. Score the current ``@champion`` on the same rows; the alias moves to the new version only
   if its objective (``train.objective``: the weighted mean of within-use-case AUC per
   task x task_type) is strictly higher on the **validation** split. The test split
   (``evaluate.split``) is scored and recorded too, but never decides: choosing on it would
   make the reported test figure optimistic.

Serving: ``model.registry.download_serving_dir("models:/unirank@champion")``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from model.config import UnirankConfig
from model.export import MANIFEST_FILE, load_predictor
from model.export import export as export_dir
from model.registry import (
    SERVING_ARTIFACT,
    TRAINING_ARTIFACT,
    UnirankPyfunc,
    download_serving_dir,
    model_uri_for,
)
from model.retrieval_index import INDEX_FILE, IndexColumns, RetrievalError, build_index
from model.storage import list_parquet
from model.user_profiles import PROFILE_FILE, ProfileColumns, build_profiles
from ray_jobs import registry
from ray_jobs.common import init_ray, job_parser, parse_job_args, setup_logging
from ray_jobs.evaluate import (
    fit_calibrators,
    load_trained,
    objective_definition,
    predict_split,
    split_metrics,
)
from ray_jobs.train import fetch_checkpoint, needed_columns, read_split, resolve_paths
from ray_jobs.train_loop import BEST_MODEL_FILE, CONFIG_FILE, PROCESSOR_FILE, objective_value

# The split that decides the champion; evaluate.split (test) is only reported.
DECISION_SPLIT = "validation"

log = logging.getLogger("unirank.export")
MODEL_NAME = "model"  # the LoggedModel's name inside the MLflow run


# --------------------------------------------------------------------------- signature


def _colspec(name: str, t: pa.DataType):
    from mlflow.types import ColSpec
    from mlflow.types.schema import Array

    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return ColSpec(Array("long"), name, required=False)
    if pa.types.is_integer(t):
        return ColSpec("long", name, required=False)
    if pa.types.is_floating(t):
        return ColSpec("double", name, required=False)
    # Timestamps travel as ISO 8601 strings (what a JSON request carries); the feature path
    # parses them (model.features).
    return ColSpec("string", name, required=False)


def signature(cfg: UnirankConfig, schema: pa.Schema):
    """Inputs: the feature-spec columns (labels excluded); outputs: one probability per task."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    labels = {t.column for t in cfg.dataset.tasks}
    names = [c for c in needed_columns(cfg) if c not in labels and c in schema.names]
    names = [c for c in names if c != cfg.dataset.features.weight_column]
    inputs = Schema([_colspec(c, schema.field(c).type) for c in names])
    outputs = Schema([ColSpec("double", f"{t.name}_probability") for t in cfg.dataset.tasks])
    return ModelSignature(inputs=inputs, outputs=outputs), names


def input_example(cfg: UnirankConfig, columns: list[str], rows: int = 5) -> pd.DataFrame:
    """A few rows of the evaluation split, JSON-friendly (lists, ISO times)."""
    ds = read_split(cfg, cfg.evaluate.split, validate=False)
    table = next(iter(ds.iter_batches(batch_size=rows, batch_format="pyarrow")))
    table = table.select([c for c in columns if c in table.column_names])
    out = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_timestamp(col.type):
            out[name] = [v.isoformat() if v is not None else None for v in col.to_pylist()]
        else:
            out[name] = col.to_pylist()
    return pd.DataFrame(out)


# --------------------------------------------------------------------------- retrieval index


def add_retrieval_index(serving: Path, cfg: UnirankConfig) -> dict:
    """Build the candidate retrieval index from the training split (``dataset.train``) into
    the serving directory, so the registered model carries its catalogue: Serve loading the
    model by alias finds ``retrieval.npz`` next to model.pt. Recorded in manifest.json.

    Its columns come from the dataset config (``dataset.catalogue``, ``dataset.features``);
    parts the data has no columns for are left out and listed under ``skipped``. Data
    without the item column gets no index: ``{"file": None, "skipped": reason}``, and the
    export goes on (the model then serves request-supplied candidates only)."""
    source = list(cfg.dataset.train)
    try:
        index = build_index(
            _train_rows(cfg), serving / INDEX_FILE, IndexColumns.from_config(cfg.dataset)
        )
    except RetrievalError as exc:
        log.warning("no retrieval index: %s", exc)
        return {"file": None, "items": 0, "source": source, "skipped": str(exc)}
    info = {
        "file": INDEX_FILE,
        "items": len(index),
        "source": source,
        "features": index.meta["features"],
        "lists": index.meta["lists"],
        "task_types": index.meta["task_types"],
        "skipped": index.meta["skipped"],
    }
    _record(serving, "retrieval_index", info)
    return info


def add_user_profiles(serving: Path, cfg: UnirankConfig) -> dict:
    """Write each training user's newest profile (``dataset.profiles``) into the serving
    directory as ``user_profiles.npz``, so the served model sees the profiles it was trained
    with (model.user_profiles). A dataset without profile columns the model reads, or
    without the user column, gets no table: ``{"file": None, "skipped": ...}``."""
    source = list(cfg.dataset.train)
    columns = ProfileColumns.from_config(cfg.dataset)
    if not columns.features and not columns.lists:
        return {"file": None, "users": 0, "source": source, "skipped": "no profile features"}
    try:
        profiles = build_profiles(_train_rows(cfg), None, columns)
    except RetrievalError as exc:
        log.warning("no user-profile table: %s", exc)
        return {"file": None, "users": 0, "source": source, "skipped": str(exc)}
    if not profiles.features and not profiles.lists:
        skipped = profiles.meta["skipped"]
        return {"file": None, "users": 0, "source": source, "skipped": skipped}
    profiles.save(serving / PROFILE_FILE)
    info = {
        "file": PROFILE_FILE,
        "users": len(profiles),
        "source": source,
        "features": profiles.features,
        "lists": profiles.lists,
        "skipped": profiles.meta["skipped"],
    }
    _record(serving, "user_profiles", info)
    return info


def _train_rows(cfg: UnirankConfig):
    import pyarrow.dataset as pads

    fs, files = list_parquet(cfg.dataset.train, cfg.storage)
    return pads.dataset(files, filesystem=fs, format="parquet")


def _record(serving: Path, key: str, info: dict) -> None:
    """List ``info["file"]`` in manifest.json and record ``info`` under ``key``."""
    manifest = json.loads((serving / MANIFEST_FILE).read_text())
    manifest["files"] = [*manifest["files"], info["file"]]
    manifest[key] = info
    (serving / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))


# --------------------------------------------------------------------------- scoring


def score_export(path: Path, cfg: UnirankConfig, split: str) -> float:
    """The objective of an exported directory on ``split`` (raw model outputs, so isotonic
    ties do not blur the ranking)."""
    predictor = load_predictor(path, cuda_graphs=False)
    pred = predict_split(None, predictor.processor, cfg, split, run_fn=predictor.run)
    metrics = split_metrics(pred, predictor.processor)
    return objective_value(metrics, cfg.train)


def recorded_objective(tags: dict, cfg: UnirankConfig, split: str) -> float | None:
    """A version's recorded objective, only if it was measured the way we measure now (same
    split and definition); else None, and the champion is kept (nothing to compare with)."""
    same = tags.get("objective_split") == split and tags.get("objective_definition") == (
        json.dumps(objective_definition(cfg))
    )
    return float(tags["objective"]) if same and tags.get("objective") else None


def champion_version(cfg: UnirankConfig):
    c = registry.client(cfg)
    try:
        return c.get_model_version_by_alias(cfg.mlflow.registered_model, cfg.mlflow.champion_alias)
    except Exception:  # noqa: BLE001 - no registered model yet, or no alias
        return None


# --------------------------------------------------------------------------- the job


def run(cfg: UnirankConfig, checkpoint: str | None = None, address: str | None = None) -> dict:
    """Export + register the run's best model; returns what happened (also logged to MLflow)."""
    import mlflow

    cfg = resolve_paths(cfg)
    init_ray(address)
    trained = load_trained(cfg, checkpoint)
    proc, split, report_split = trained.processor, DECISION_SPLIT, cfg.evaluate.split
    val = predict_split(trained.model, proc, cfg, "validation")
    calibrators = fit_calibrators(cfg, proc, val)
    m = cfg.mlflow
    registry.client(cfg)
    run_id = registry.run_id_of(cfg) or registry.start_or_resume_run(cfg)

    with tempfile.TemporaryDirectory() as tmp:
        serving = export_dir(
            Path(tmp) / SERVING_ARTIFACT, trained.model, proc, trained.cfg, calibrators
        )
        index_info = add_retrieval_index(serving, cfg)
        profiles_info = add_user_profiles(serving, cfg)
        training = Path(tmp) / TRAINING_ARTIFACT
        training.mkdir()
        ckpt = fetch_checkpoint(trained.checkpoint)
        for f in (BEST_MODEL_FILE, PROCESSOR_FILE, CONFIG_FILE):
            shutil.copy(ckpt / f, training / f)
        new_objective = score_export(serving, cfg, split)
        reported = None if report_split == split else score_export(serving, cfg, report_split)

        champ = champion_version(cfg)
        champ_objective = None
        if champ is not None:
            try:
                champ_dir = download_serving_dir(
                    f"models:/{m.registered_model}/{champ.version}", Path(tmp) / "champion"
                )
                champ_objective = score_export(champ_dir, cfg, split)
            except Exception as exc:  # noqa: BLE001 - e.g. a champion with another feature spec
                champ_objective = recorded_objective(champ.tags or {}, cfg, split)
                log.warning(
                    "champion v%s cannot be scored on this data (%s); using its recorded "
                    "objective %s", champ.version, exc, champ_objective,
                )  # fmt: skip

        fs, files = list_parquet(getattr(cfg.dataset, split), cfg.storage)
        schema = pq.read_schema(files[0], filesystem=fs)
        sig, columns = signature(trained.cfg, schema)
        example = input_example(cfg, columns)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=UnirankPyfunc(),
                artifacts={SERVING_ARTIFACT: str(serving), TRAINING_ARTIFACT: str(training)},
                signature=sig,
                input_example=example,
                registered_model_name=m.registered_model,
                pip_requirements=["torch", "numpy", "pyarrow", "pandas", "pydantic", "pyyaml"],
            )
    version = str(info.registered_model_version)
    c = registry.client(cfg)
    tags = {
        "objective": f"{new_objective:.6f}",
        "objective_split": split,
        "objective_definition": json.dumps(objective_definition(cfg)),
        **({} if reported is None else {f"{report_split}_objective": f"{reported:.6f}"}),
        "run_name": cfg.train.run_name,
        "checkpoint": trained.checkpoint.uri,
        "serving_artifact": f"artifacts/{SERVING_ARTIFACT}",
    }
    for k, v in tags.items():
        c.set_model_version_tag(m.registered_model, version, k, v)

    promoted = champ is None or (champ_objective is not None and new_objective > champ_objective)
    margin = None if champ_objective is None else new_objective - champ_objective
    if promoted:  # the replaced champion stays reachable for `ray_jobs.registry rollback`
        why = f"ray_jobs.export: {split} objective {new_objective:.6f} vs {_num(champ_objective)}"
        registry.promote(cfg, version, reason=why, by="ray_jobs.export")
    result = {
        "registered_model": m.registered_model,
        "version": version,
        "model_uri": f"models:/{m.registered_model}/{version}",
        "champion_uri": model_uri_for(m.registered_model, m.champion_alias),
        "serving_artifact": f"artifacts/{SERVING_ARTIFACT}",
        "retrieval_index": index_info,
        "user_profiles": profiles_info,
        "objective": new_objective,
        "objective_split": split,
        f"{report_split}_objective": new_objective if reported is None else reported,
        "champion_before": None
        if champ is None
        else {"version": str(champ.version), "objective": champ_objective},
        "promoted": promoted,
        "winner": f"v{version} (new)" if promoted else f"v{champ.version} (champion)",
        "margin": margin,
        "champion": version if promoted else str(champ.version),
        "mlflow_run_id": run_id,
    }
    registry.log_dict(run_id, result, f"export/registration_v{version}.json")
    log.info(format_result(result))
    return result


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def format_result(r: dict) -> str:
    before = r["champion_before"]
    if before is None:
        return (
            f"registered {r['registered_model']} v{r['version']} ({r['objective_split']} "
            f"objective {r['objective']:.4f}); first version -> @champion"
        )
    margin = "n/a" if r["margin"] is None else f"{r['margin']:+.4f}"
    return (
        f"registered {r['registered_model']} v{r['version']}: {r['objective_split']} objective "
        f"{r['objective']:.4f} vs "
        f"champion v{before['version']} {_num(before['objective'])}: winner {r['winner']} by {margin}; "
        f"@champion -> v{r['champion']}"
    )


def main(argv=None) -> None:
    setup_logging()
    parser = job_parser(__doc__.split("\n\n")[0], job="export")
    parser.add_argument("--checkpoint", default=None, help="checkpoint or run directory")
    args, cfg = parse_job_args(parser, argv)
    result = run(cfg, checkpoint=args.checkpoint, address=args.address)
    print(format_result(result))
    print(json.dumps({"export": result}, default=str))


if __name__ == "__main__":
    main()
