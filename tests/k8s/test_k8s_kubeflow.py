"""The Kubeflow pipeline: it compiles, its DAG is prepare -> ... -> deploy, and the checked-in
YAML is what the code compiles to now."""

from __future__ import annotations

import pytest
import yaml

from k8s.jobs import JOBS
from k8s.kubeflow import pipeline

pytestmark = pytest.mark.unit

DAG = {
    "prepare": [],
    "train": ["prepare"],
    "evaluate": ["train"],
    "tune": ["evaluate"],
    "register": ["tune"],
    "deploy": ["register"],
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("kfp") / "pipeline.yaml"
    pipeline.compile_pipeline(path)
    return path


def test_checked_in_pipeline_is_up_to_date(compiled):
    assert pipeline.OUTPUT.read_text() == compiled.read_text(), (
        "run: python -m k8s.kubeflow.pipeline"
    )


def test_dag_task_names_and_dependencies(compiled):
    spec = yaml.safe_load(compiled.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert {name: sorted(t.get("dependentTasks", [])) for name, t in tasks.items()} == DAG


def test_pipeline_parameters(compiled):
    spec = yaml.safe_load(compiled.read_text())
    assert spec["pipelineInfo"]["name"] == pipeline.PIPELINE_NAME
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {k: v["defaultValue"] for k, v in params.items()} == {
        "image": pipeline.DEFAULT_IMAGE,
        "overlay": "prod",
        "namespace": "unirank",
        "overrides": "",
        "run_tune": "false",
        "model_uri": "models:/unirank@champion",
    }
    tune = spec["root"]["dag"]["tasks"]["tune"]["inputs"]["parameters"]["enabled"]
    assert tune == {"componentInputParameter": "run_tune"}


def test_every_step_runs_the_launcher_in_the_project_image(compiled):
    spec = yaml.safe_load(compiled.read_text())
    executors = spec["deploymentSpec"]["executors"]
    for task, job in pipeline.JOB_STEPS:
        container = executors[f"exec-{task}"]["container"]
        assert container["command"] == ["python", "-m", "k8s.submit"]
        args = container["args"]
        assert args[args.index("--job") + 1] == job and job in JOBS
        assert "--follow" in args and "--unique" in args
        assert container["image"] == "{{$.inputs.parameters['pipelinechannel--image']}}"
    deploy = executors["exec-deploy"]["container"]
    assert deploy["command"] == ["python", "-m", "k8s.submit"] and "--deploy" in deploy["args"]


def test_image_parameter_reaches_the_ray_pods_and_runs_are_named_per_pipeline_run(compiled):
    spec = yaml.safe_load(compiled.read_text())
    executors = spec["deploymentSpec"]["executors"]
    tasks = spec["root"]["dag"]["tasks"]
    for task in [t for t, _ in pipeline.JOB_STEPS] + ["deploy"]:
        args = executors[f"exec-{task}"]["container"]["args"]
        # the launcher sets the image of every Ray pod it creates (k8s.submit --image)
        assert args[args.index("--image") + 1] == "{{$.inputs.parameters['image']}}"
        params = tasks[task]["inputs"]["parameters"]
        assert params["image"] == {"componentInputParameter": "image"}
        if task == "deploy":
            continue
        assert args[args.index("--run-id") + 1] == "{{$.inputs.parameters['run_id']}}"
        # KFP resolves this to the pipeline run's id: one run name per pipeline run
        assert params["run_id"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
