"""The cluster jobs, defined once: name -> the ``python -m`` module it runs.

A RayJob's entrypoint is exactly the job's CLI: ``python -m MODULE CONFIG [key=value ...]``
with CONFIG the resolved project config mounted from the ConfigMap. A job whose module does
not exist (yet) in the package is not rendered; see :func:`available_jobs`.
"""

from __future__ import annotations

import importlib.util
import shlex
from dataclasses import dataclass

CONFIG_DIR = "/etc/unirank"
CONFIG_FILE = "unirank.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"


@dataclass(frozen=True)
class Job:
    name: str
    module: str
    description: str


JOBS: dict[str, Job] = {
    j.name: j
    for j in (
        Job("generate", "ray_jobs.generate", "synthetic raw logs with ground truth"),
        Job("prepare", "ray_jobs.prepare", "labels, sampling and time split into parquet"),
        Job("train", "ray_jobs.train", "Ray Train DDP of the multi-task model"),
        Job("evaluate", "ray_jobs.evaluate", "per task x task_type metrics vs baselines"),
        Job("tune", "tuning.search", "Ray Tune search over fusion / loss weights"),
        Job("export", "ray_jobs.export", "export and register the model in MLflow"),
        Job(
            "user-embeddings",
            "ray_jobs.user_embeddings",
            "precompute active users' sequence encodings into the feature store",
        ),
    )
}


def module_exists(module: str) -> bool:
    """True when ``module`` can be imported from the project (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_jobs() -> list[Job]:
    """Jobs whose module exists now. The render gate: add the module and re-render."""
    return [j for j in JOBS.values() if module_exists(j.module)]


def entrypoint(job: Job, overrides: list[str] | None = None) -> str:
    """The RayJob entrypoint: the job's own CLI on the mounted config."""
    parts = ["python", "-m", job.module, CONFIG_PATH, *(overrides or [])]
    return shlex.join(parts)


def entrypoint_module(entry: str) -> str | None:
    """The module of a ``python -m MODULE ...`` entrypoint (None for any other command)."""
    try:
        argv = shlex.split(entry)
    except ValueError:
        return None
    for i, tok in enumerate(argv[:-1]):
        if tok == "-m" and i >= 1 and argv[i - 1].split("/")[-1].startswith("python"):
            return argv[i + 1]
    return None
