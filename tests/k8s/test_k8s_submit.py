"""k8s.submit: manifest handling and the status / cancel logic against a fake API server."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from k8s import submit
from k8s.submit import (
    JobState,
    SubmitError,
    job_state,
    load_rayjob,
    prepare_rayjob,
    run_job,
    service_ready,
    wait_for_job,
)

pytestmark = pytest.mark.unit
FIXTURES = Path(__file__).resolve().parent / "fixtures"


class FakeApi:
    """A tiny stand-in for the Kubernetes API server: RayJob status advances one step per get."""

    def __init__(self, statuses=(), logs=(), service=None):
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.statuses = list(statuses)
        self.logs = list(logs)
        self.service = list(service or [])
        self.calls: list[tuple] = []

    def create(self, kind, namespace, body):
        self.calls.append(("create", kind, namespace, body["metadata"]["name"]))
        self.objects[(kind, namespace, body["metadata"]["name"])] = body
        return body

    def get(self, kind, namespace, name):
        self.calls.append(("get", kind, namespace, name))
        if kind == "RayService":
            return self.service.pop(0) if len(self.service) > 1 else self.service[0]
        obj = dict(self.objects[(kind, namespace, name)])
        if self.statuses:
            obj["status"] = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return obj

    def patch(self, kind, namespace, name, body):
        self.calls.append(("patch", kind, namespace, name, body))
        return body

    def delete(self, kind, namespace, name):
        self.calls.append(("delete", kind, namespace, name))

    def submitter_log(self, namespace, job_name):
        return self.logs.pop(0) if len(self.logs) > 1 else (self.logs[0] if self.logs else None)


def _status(dep, job="", message=""):
    return {"jobDeploymentStatus": dep, "jobStatus": job, "message": message}


@pytest.fixture
def manifest(rendered) -> Path:
    return rendered["dev"] / "jobs" / "rayjob-unirank-generate.yaml"


def test_load_rayjob_from_a_rendered_manifest(manifest):
    job = load_rayjob(manifest)
    assert job["kind"] == "RayJob" and job["metadata"]["name"] == "unirank-generate"


def test_load_rayjob_picks_by_name_and_rejects_ambiguity(tmp_path, manifest):
    doc = yaml.safe_load(manifest.read_text())
    other = yaml.safe_load(manifest.read_text())
    other["metadata"]["name"] = "unirank-other"
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump_all([doc, other]))
    with pytest.raises(SubmitError, match="exactly one RayJob, found 2"):
        load_rayjob(both)
    assert load_rayjob(both, name="unirank-other")["metadata"]["name"] == "unirank-other"
    cm = tmp_path / "cm.yaml"
    cm.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(SubmitError, match="found 0"):
        load_rayjob(cm)


def test_prepare_sets_namespace_suffix_and_drops_server_fields(manifest):
    doc = load_rayjob(manifest)
    doc["status"] = {"jobDeploymentStatus": "Complete"}
    doc["metadata"]["resourceVersion"] = "42"
    body, ns = prepare_rayjob(doc, namespace="team-a", suffix="abcde")
    assert ns == "team-a" and body["metadata"]["namespace"] == "team-a"
    assert body["metadata"]["name"] == "unirank-generate-abcde"
    assert "status" not in body and "resourceVersion" not in body["metadata"]
    body, ns = prepare_rayjob(load_rayjob(manifest))
    assert ns == "unirank-dev"  # the overlay's namespace


def test_prepare_refuses_an_invalid_rayjob():
    doc = load_rayjob(FIXTURES / "missing_module.yaml")
    with pytest.raises(SubmitError, match=r"\$\.spec\.entrypoint: module 'ray_jobs.no_such_job'"):
        prepare_rayjob(doc)


def test_unique_suffix_is_short_and_stable_for_a_clock():
    assert submit.unique_suffix(lambda: 1234.5) == submit.unique_suffix(lambda: 1234.5)
    assert len(submit.unique_suffix()) == 5


@pytest.mark.parametrize(
    "status, terminal, succeeded",
    [
        ({}, False, False),
        (_status("Initializing"), False, False),
        (_status("Running", "RUNNING"), False, False),
        (_status("Retrying", "FAILED"), False, False),
        (_status("Complete", "SUCCEEDED"), True, True),
        (_status("Complete", "STOPPED"), True, False),
        (_status("Failed", "FAILED"), True, False),
        (_status("ValidationFailed", "", "bad spec"), True, False),
    ],
)
def test_job_state(status, terminal, succeeded):
    state = job_state({"status": status})
    assert (state.terminal, state.succeeded) == (terminal, succeeded)


def test_wait_follows_status_changes_and_new_log_lines(manifest):
    api = FakeApi(
        statuses=[
            _status("Initializing"),
            _status("Running", "RUNNING"),
            _status("Running", "RUNNING"),
            _status("Complete", "SUCCEEDED"),
        ],
        logs=[None, "line 1\n", "line 1\nline 2\n", "line 1\nline 2\n"],
    )
    body, ns = prepare_rayjob(load_rayjob(manifest))
    api.create("RayJob", ns, body)
    out: list[str] = []
    state = wait_for_job(
        api, ns, "unirank-generate", follow_logs=True, out=out.append, sleep=lambda s: None
    )
    assert state == JobState("Complete", "SUCCEEDED")
    assert out == [
        "RayJob unirank-dev/unirank-generate: jobDeploymentStatus=Initializing jobStatus=-",
        "RayJob unirank-dev/unirank-generate: jobDeploymentStatus=Running jobStatus=RUNNING",
        "line 1",
        "line 2",
        "RayJob unirank-dev/unirank-generate: jobDeploymentStatus=Complete jobStatus=SUCCEEDED",
    ]


@pytest.mark.parametrize(
    "final, code",
    [
        (_status("Complete", "SUCCEEDED"), 0),
        (_status("Failed", "FAILED", "job failed"), 1),
        (_status("ValidationFailed"), 1),
        (_status("Complete", "STOPPED"), 1),
    ],
)
def test_run_job_exit_code_follows_the_ray_job(manifest, final, code):
    api = FakeApi(statuses=[_status("Running", "RUNNING"), final])
    body, ns = prepare_rayjob(load_rayjob(manifest))
    out: list[str] = []
    assert run_job(api, body, ns, out=out.append, sleep=lambda s: None) == code
    assert api.calls[0] == ("create", "RayJob", "unirank-dev", "unirank-generate")
    assert not any(c[0] == "delete" for c in api.calls)


@pytest.mark.parametrize("how, call", [("delete", "delete"), ("suspend", "patch")])
def test_ctrl_c_cancels_the_rayjob(manifest, how, call):
    api = FakeApi(statuses=[_status("Running", "RUNNING")])
    body, ns = prepare_rayjob(load_rayjob(manifest))

    def interrupt(_seconds):
        raise KeyboardInterrupt

    code = run_job(api, body, ns, cancel_how=how, out=lambda s: None, sleep=interrupt)
    assert code == submit.EXIT_CANCELLED
    last = api.calls[-1]
    assert last[:4] == (call, "RayJob", "unirank-dev", "unirank-generate")
    if how == "suspend":
        assert last[4] == {"spec": {"suspend": True}}


def test_timeout_cancels_and_fails(manifest):
    api = FakeApi(statuses=[_status("Running", "RUNNING")])
    body, ns = prepare_rayjob(load_rayjob(manifest))
    ticks = iter(range(0, 1000, 10))
    code = run_job(
        api,
        body,
        ns,
        out=lambda s: None,
        sleep=lambda s: None,
        clock=lambda: next(ticks),
        timeout_s=25,
    )
    assert code == submit.EXIT_FAILED
    assert api.calls[-1][0] == "delete"


def test_cli_submits_a_manifest_with_a_fake_api(manifest, capsys):
    api = FakeApi(statuses=[_status("Complete", "SUCCEEDED")])
    code = submit.main([str(manifest), "-n", "ci", "--follow", "--poll", "0"], api=api)
    assert code == 0
    assert api.calls[0] == ("create", "RayJob", "ci", "unirank-generate")
    assert "succeeded" in capsys.readouterr().out


def test_cli_renders_a_job_from_an_overlay(capsys):
    api = FakeApi(statuses=[_status("Complete", "SUCCEEDED")])
    code = submit.main(
        ["--job", "generate", "--overlay", "prod", "--overrides", "generate.seed=3", "--unique"],
        api=api,
    )
    assert code == 0
    body = next(iter(api.objects.values()))
    assert body["metadata"]["namespace"] == "unirank"
    assert body["metadata"]["name"].startswith("unirank-generate-")
    assert body["spec"]["entrypoint"].endswith("/etc/unirank/unirank.yaml generate.seed=3")


def test_cli_disabled_step_and_usage_errors(capsys):
    assert submit.main(["--job", "tune", "--enabled", "false"], api=FakeApi()) == 0
    assert "step disabled" in capsys.readouterr().out
    assert submit.main(["--job", "nope"], api=FakeApi()) == 2
    assert "unknown job 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        submit.main([], api=FakeApi())


def _svc(generation, observed, ready, upgrading="False"):
    return {
        "metadata": {"generation": generation},
        "status": {
            "observedGeneration": observed,
            "conditions": [
                {"type": "Ready", "status": ready},
                {"type": "UpgradeInProgress", "status": upgrading},
            ],
        },
    }


def test_service_ready():
    assert service_ready(_svc(2, 2, "True"))
    assert not service_ready(_svc(2, 1, "True"))  # the new spec is not observed yet
    assert not service_ready(_svc(2, 2, "True", upgrading="True"))
    assert not service_ready(_svc(2, 2, "False"))
    assert service_ready({"status": {"serviceStatus": "Running"}})


def test_deploy_patches_serve_config_and_waits_until_ready(capsys):
    api = FakeApi(service=[_svc(3, 2, "True"), _svc(3, 3, "True", "True"), _svc(3, 3, "True")])
    code = submit.main(
        ["--deploy", "--overlay", "dev", "--model-uri", "models:/unirank/7", "--poll", "0"],
        api=api,
    )
    assert code == 0
    patch = api.calls[0]
    assert patch[:4] == ("patch", "RayService", "unirank-dev", "unirank-serve")
    serve = yaml.safe_load(patch[4]["spec"]["serveConfigV2"])
    assert {a["args"]["model_uri"] for a in serve["applications"]} == {"models:/unirank/7"}
    assert sum(c[0] == "get" for c in api.calls) == 3


def _pod_images(body: dict) -> set[str]:
    spec = body["spec"].get("rayClusterSpec") or body["spec"].get("rayClusterConfig")
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}


def test_cli_image_and_run_id_reach_the_rayjob(manifest, capsys):
    api = FakeApi(statuses=[_status("Complete", "SUCCEEDED")])
    argv = ["--job", "train", "--overlay", "prod", "--image", "reg/unirank:abc", "--run-id", "r42"]
    code = submit.main([*argv, "--overrides", "train.epochs=2"], api=api)
    assert code == 0, capsys.readouterr().err
    body = next(iter(api.objects.values()))
    assert _pod_images(body) == {"reg/unirank:abc"}
    assert body["spec"]["entrypoint"].endswith(
        "/etc/unirank/unirank.yaml train.run_name=unirank-r42 tune.name=unirank_search-r42 "
        "train.epochs=2"
    )
    # an explicit run name in --overrides wins (it comes last)
    api = FakeApi(statuses=[_status("Complete", "SUCCEEDED")])
    submit.main(["--job", "train", "--run-id", "r42", "--overrides", "train.run_name=x"], api=api)
    assert next(iter(api.objects.values()))["spec"]["entrypoint"].endswith("train.run_name=x")
    # a manifest file: --image works, --run-id needs --job; an unresolved placeholder is refused
    api = FakeApi(statuses=[_status("Complete", "SUCCEEDED")])
    assert submit.main([str(manifest), "--image", "reg/u:1"], api=api) == 0
    assert _pod_images(next(iter(api.objects.values()))) == {"reg/u:1"}
    capsys.readouterr()
    assert submit.main([str(manifest), "--run-id", "r1"], api=FakeApi()) == 2
    assert "--run-id needs --job" in capsys.readouterr().err
    bad = ["--job", "train", "--run-id", "{{$.pipeline_job_uuid}}"]
    assert submit.main(bad, api=FakeApi()) == 2
    assert "--run-id '{{$.pipeline_job_uuid}}'" in capsys.readouterr().err


def test_deploy_with_an_image_patches_the_ray_pods_too(capsys):
    api = FakeApi(service=[_svc(1, 1, "True")])
    argv = ["--deploy", "--overlay", "prod", "--image", "reg/unirank:abc", "--poll", "0"]
    assert submit.main(argv, api=api) == 0
    spec = api.calls[0][4]["spec"]
    assert set(spec) == {"serveConfigV2", "rayClusterConfig"}
    assert _pod_images({"spec": spec}) == {"reg/unirank:abc"}
    api = FakeApi(service=[_svc(1, 1, "True")])
    assert submit.main(["--deploy", "--overlay", "prod", "--poll", "0"], api=api) == 0
    assert set(api.calls[0][4]["spec"]) == {"serveConfigV2"}  # no image: pods untouched
