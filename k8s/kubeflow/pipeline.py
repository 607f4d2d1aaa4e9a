"""The Kubeflow pipeline: prepare -> train -> evaluate -> (optional) tune -> register -> deploy.

Every step is a container component running the project image's own launcher,
``python -m k8s.submit``: it renders the step's RayJob from the overlay settings baked into
the image, creates it through the Kubernetes API, follows it and exits non-zero when the Ray
job fails, so the KFP step fails with it. ``deploy`` patches the RayService's serveConfigV2
with the registered model and waits until it is Ready. One create-and-wait implementation
serves the CLI and the pipeline. The ``image`` parameter is the image of the steps and of
every Ray pod they create (``--image``); the KFP run id names the training run of the
pipeline run (``--run-id``: ``train.run_name`` / ``tune.name`` + ``-<run id>``), so a rerun
trains anew instead of resuming the finished run, and train, evaluate and register all
address the same run.

``tune`` is optional at run time (``run_tune``): KFP does not let a task outside a
``dsl.If`` depend on a task inside it, so the step always exists and its launcher exits 0
at once when disabled; the DAG stays a straight line.

    python -m k8s.kubeflow.pipeline            # re-compile k8s/kubeflow/unirank_pipeline.yaml

(No `from __future__ import annotations` here: kfp reads the real annotation types.)
"""

import argparse
from pathlib import Path

from kfp import compiler, dsl

DEFAULT_IMAGE = "ghcr.io/unirank/unirank:0.1.0-gpu"
PIPELINE_NAME = "unirank-train-deploy"
OUTPUT = Path(__file__).resolve().parent / "unirank_pipeline.yaml"
LAUNCHER = ["python", "-m", "k8s.submit"]

# (task name, k8s.jobs job) in DAG order; "register" runs the export job (MLflow registry).
JOB_STEPS = [
    ("prepare", "prepare"),
    ("train", "train"),
    ("evaluate", "evaluate"),
    ("tune", "tune"),
    ("register", "export"),
]


def _rayjob_component(task: str, job: str):
    def step(image: str, run_id: str, overlay: str, namespace: str, overrides: str, enabled: str):
        return dsl.ContainerSpec(
            image=DEFAULT_IMAGE,
            command=LAUNCHER,
            args=[
                "--job", job,
                "--overlay", overlay,
                "--namespace", namespace,
                "--overrides", overrides,
                "--enabled", enabled,
                "--image", image,
                "--run-id", run_id,
                "--unique",
                "--follow",
            ],
        )  # fmt: skip

    step.__name__ = task  # the component (and task) name in the compiled DAG
    step.__qualname__ = task
    step.__doc__ = f"Run the {job!r} RayJob (python -m k8s.submit --job {job}) and wait for it."
    return dsl.container_component(step)


COMPONENTS = {task: _rayjob_component(task, job) for task, job in JOB_STEPS}


@dsl.container_component
def deploy(image: str, overlay: str, namespace: str, model_uri: str):
    """Patch the RayService (serveConfigV2, pod image) with the model; wait until Ready."""
    return dsl.ContainerSpec(
        image=DEFAULT_IMAGE,
        command=LAUNCHER,
        args=[
            "--deploy",
            "--overlay", overlay,
            "--namespace", namespace,
            "--model-uri", model_uri,
            "--image", image,
        ],
    )  # fmt: skip


@dsl.pipeline(name=PIPELINE_NAME, description=__doc__.splitlines()[0])
def unirank_pipeline(
    image: str = DEFAULT_IMAGE,
    overlay: str = "prod",
    namespace: str = "unirank",
    overrides: str = "",
    run_tune: str = "false",
    model_uri: str = "models:/unirank@champion",
):
    previous = None
    for task, _job in JOB_STEPS:
        enabled = run_tune if task == "tune" else "true"
        t = COMPONENTS[task](
            image=image,
            # one training run (and search) per pipeline run, shared by its steps
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            overlay=overlay,
            namespace=namespace,
            overrides=overrides,
            enabled=enabled,
        )
        t.set_container_image(image).set_caching_options(False)
        if previous is not None:
            t.after(previous)
        previous = t
    d = deploy(image=image, overlay=overlay, namespace=namespace, model_uri=model_uri)
    d.set_container_image(image).set_caching_options(False).after(previous)


def compile_pipeline(path: Path = OUTPUT) -> Path:
    compiler.Compiler().compile(unirank_pipeline, package_path=str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m k8s.kubeflow.pipeline", description=__doc__)
    p.add_argument("-o", "--out", type=Path, default=OUTPUT)
    a = p.parse_args(argv)
    print(f"wrote {compile_pipeline(a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
