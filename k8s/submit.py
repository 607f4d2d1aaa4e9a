"""Launch a RayJob on a KubeRay cluster and follow it to its terminal status.

    python -m k8s.submit out/k8s/dev/jobs/rayjob-unirank-generate.yaml --namespace unirank-dev --follow
    python -m k8s.submit --job train --overlay prod --unique --follow      # render in-process
    python -m k8s.submit --deploy --overlay prod --model-uri models:/unirank@champion
    python -m k8s.submit --job train --overlay prod --run-id 2f6c --image REPO/unirank:TAG --follow

The RayJob is created through the Kubernetes API (CustomObjectsApi); ``--follow`` polls
``status.jobDeploymentStatus`` / ``status.jobStatus``, streams the submitter pod's log and
exits 0 only when the Ray job SUCCEEDED. Ctrl-C cancels: the RayJob is deleted (its cluster
with it) or, with ``--cancel suspend``, suspended. ``--deploy`` patches the RayService's
serveConfigV2 (same generator as the render) and waits until the new config is Ready.

``--image`` sets the image of every Ray pod (head and workers); ``--run-id ID`` (with
``--job``) names the training run and the search after it (``train.run_name`` and
``tune.name`` get ``-ID`` appended), so every step of one pipeline run shares a run and a
rerun trains a new one instead of resuming the finished one.

The Kubeflow pipeline (k8s/kubeflow) runs this module in the project image, so the launcher
and the pipeline steps share one create-and-wait implementation; it passes its ``image``
parameter and the KFP run id.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from model.config import ConfigError

GROUP, VERSION = "ray.io", "v1"
PLURALS = {"RayJob": "rayjobs", "RayService": "rayservices", "RayCluster": "rayclusters"}
TERMINAL_DEPLOYMENT = {"Complete", "Failed", "ValidationFailed"}
FAILED_DEPLOYMENT = {"Failed", "ValidationFailed"}
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130


class SubmitError(RuntimeError):
    """A manifest or API problem, reported without a traceback."""


# --------------------------------------------------------------------------- the API seam


class RayApi(Protocol):
    """The calls the launcher makes; :class:`KubeApi` is the real one, tests pass a fake."""

    def create(self, kind: str, namespace: str, body: dict) -> dict: ...
    def get(self, kind: str, namespace: str, name: str) -> dict: ...
    def patch(self, kind: str, namespace: str, name: str, body: dict) -> dict: ...
    def delete(self, kind: str, namespace: str, name: str) -> None: ...
    def submitter_log(self, namespace: str, job_name: str) -> str | None: ...


class KubeApi:
    """The Kubernetes Python client: in-cluster config in a pod, else ~/.kube/config."""

    def __init__(self) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config()
            except (config.ConfigException, OSError) as exc:
                raise SubmitError(
                    f"no Kubernetes config (in-cluster or kubeconfig): {exc}"
                ) from None
        self._custom = client.CustomObjectsApi()
        self._core = client.CoreV1Api()
        self._api_exception = client.exceptions.ApiException

    def _call(self, what: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._api_exception as exc:
            raise SubmitError(f"{what}: HTTP {exc.status} {exc.reason}: {exc.body}") from None

    def create(self, kind: str, namespace: str, body: dict) -> dict:
        return self._call(
            f"create {kind} {body['metadata']['name']}",
            self._custom.create_namespaced_custom_object,
            GROUP, VERSION, namespace, PLURALS[kind], body,
        )  # fmt: skip

    def get(self, kind: str, namespace: str, name: str) -> dict:
        return self._call(
            f"get {kind} {name}",
            self._custom.get_namespaced_custom_object,
            GROUP, VERSION, namespace, PLURALS[kind], name,
        )  # fmt: skip

    def patch(self, kind: str, namespace: str, name: str, body: dict) -> dict:
        # CustomObjectsApi sends dict bodies as a JSON merge patch.
        return self._call(
            f"patch {kind} {name}",
            self._custom.patch_namespaced_custom_object,
            GROUP, VERSION, namespace, PLURALS[kind], name, body,
        )  # fmt: skip

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self._call(
            f"delete {kind} {name}",
            self._custom.delete_namespaced_custom_object,
            GROUP, VERSION, namespace, PLURALS[kind], name,
            propagation_policy="Background",
        )  # fmt: skip

    def submitter_log(self, namespace: str, job_name: str) -> str | None:
        # K8sJobMode: the submitter is a batch Job named after the RayJob.
        pods = self._core.list_namespaced_pod(namespace, label_selector=f"job-name={job_name}")
        if not pods.items:
            return None
        newest = max(pods.items, key=lambda p: p.metadata.creation_timestamp)
        try:
            return self._core.read_namespaced_pod_log(newest.metadata.name, namespace)
        except self._api_exception:
            return None  # container not started yet


# --------------------------------------------------------------------------- manifests


def load_rayjob(path: str | Path, name: str | None = None) -> dict:
    """The one RayJob document of a manifest file (``name`` picks one of several)."""
    path = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except OSError as exc:
        raise SubmitError(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SubmitError(f"{path}: not valid YAML: {exc}") from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "RayJob"]
    if name is not None:
        jobs = [d for d in jobs if (d.get("metadata") or {}).get("name") == name]
    if len(jobs) != 1:
        found = [(d.get("metadata") or {}).get("name") for d in jobs]
        raise SubmitError(f"{path}: expected exactly one RayJob, found {len(jobs)} {found}")
    job = jobs[0]
    if job.get("apiVersion") != f"{GROUP}/{VERSION}":
        raise SubmitError(f"{path}: apiVersion must be {GROUP}/{VERSION}")
    return job


def prepare_rayjob(
    doc: dict, namespace: str | None = None, suffix: str | None = None, validate: bool = True
) -> tuple[dict, str]:
    """A create-ready copy of the RayJob and its namespace: no status/server fields,
    optional unique name suffix, validated like the rendered manifests."""
    meta = dict(doc.get("metadata") or {})
    for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
        meta.pop(key, None)
    ns = namespace or meta.get("namespace") or "default"
    meta["namespace"] = ns
    if suffix:
        meta["name"] = f"{meta['name']}-{suffix}"
    body = {k: v for k, v in doc.items() if k != "status"}
    body["metadata"] = meta
    if validate:
        from k8s.validate import validate_doc

        problems = validate_doc(body)
        if problems:
            lines = [f"RayJob/{meta.get('name')}: {p}: {m}" for p, m in problems]
            raise SubmitError("refusing to submit an invalid RayJob:\n  " + "\n  ".join(lines))
    return body, ns


def with_image(doc: dict, image: str) -> dict:
    """A copy of a RayJob / RayService whose Ray pods (head and every worker) run ``image``."""
    doc = copy.deepcopy(doc)
    spec = doc.get("spec") or {}
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or {}
    groups = [cluster.get("headGroupSpec") or {}, *(cluster.get("workerGroupSpecs") or [])]
    for g in groups:
        for c in ((g.get("template") or {}).get("spec") or {}).get("containers") or []:
            c["image"] = image
    return doc


def run_overrides(cfg, run_id: str) -> list[str]:
    """The per-run names of one pipeline run: ``train.run_name`` and ``tune.name`` + ``-ID``."""
    rid = run_id.strip()
    if not rid or any(ch in rid for ch in "/ \t\n") or rid.startswith("{{"):
        raise SubmitError(f"--run-id {run_id!r}: expected a run id (no '/', no spaces)")
    return [f"train.run_name={cfg.train.run_name}-{rid}", f"tune.name={cfg.tune.name}-{rid}"]


def unique_suffix(clock: Callable[[], float] = time.time) -> str:
    """5 base-36 characters from the clock: keeps names well within KubeRay's 47."""
    n = int(clock() * 10) % 36**5
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    return "".join(digits[(n // 36**i) % 36] for i in reversed(range(5)))


# --------------------------------------------------------------------------- status


@dataclass(frozen=True)
class JobState:
    deployment: str  # status.jobDeploymentStatus ("" = new)
    job: str  # status.jobStatus (Ray's own: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)
    message: str = ""

    @property
    def terminal(self) -> bool:
        return self.deployment in TERMINAL_DEPLOYMENT

    @property
    def succeeded(self) -> bool:
        return self.deployment == "Complete" and self.job == "SUCCEEDED"

    def __str__(self) -> str:
        text = f"jobDeploymentStatus={self.deployment or 'New'} jobStatus={self.job or '-'}"
        return f"{text} ({self.message})" if self.message else text


def job_state(obj: dict) -> JobState:
    status = obj.get("status") or {}
    return JobState(
        deployment=status.get("jobDeploymentStatus") or "",
        job=status.get("jobStatus") or "",
        message=status.get("message") or status.get("reason") or "",
    )


def wait_for_job(
    api: RayApi,
    namespace: str,
    name: str,
    *,
    follow_logs: bool = False,
    poll_s: float = 5.0,
    timeout_s: float | None = None,
    out: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> JobState:
    """Poll until the RayJob is terminal; print status changes (and new log lines)."""
    start, last, printed = clock(), None, 0
    while True:
        state = job_state(api.get("RayJob", namespace, name))
        if state != last:
            out(f"RayJob {namespace}/{name}: {state}")
            last = state
        if follow_logs:
            log = api.submitter_log(namespace, name)
            if log and len(log) > printed:
                out(log[printed:].rstrip("\n"))
                printed = len(log)
        if state.terminal:
            return state
        if timeout_s is not None and clock() - start > timeout_s:
            raise TimeoutError(f"RayJob {namespace}/{name} not finished after {timeout_s:.0f}s")
        sleep(poll_s)


def cancel(api: RayApi, namespace: str, name: str, how: str = "delete") -> None:
    if how == "suspend":  # keeps the RayJob; its cluster is torn down (needs shutdown=true)
        api.patch("RayJob", namespace, name, {"spec": {"suspend": True}})
    else:
        api.delete("RayJob", namespace, name)


def run_job(
    api: RayApi,
    body: dict,
    namespace: str,
    *,
    follow: bool = True,
    cancel_how: str = "delete",
    out: Callable[[str], None] = print,
    **wait_kwargs: Any,
) -> int:
    """Create the RayJob; with ``follow`` wait for it. Exit code: 0 ok, 1 failed, 130 cancelled."""
    name = body["metadata"]["name"]
    api.create("RayJob", namespace, body)
    out(f"created RayJob {namespace}/{name}: {body['spec']['entrypoint']}")
    if not follow:
        return EXIT_OK
    try:
        state = wait_for_job(api, namespace, name, follow_logs=True, out=out, **wait_kwargs)
    except KeyboardInterrupt:
        out(f"interrupted: cancelling RayJob {namespace}/{name} ({cancel_how})")
        cancel(api, namespace, name, cancel_how)
        return EXIT_CANCELLED
    except TimeoutError as exc:
        out(f"{exc}: cancelling ({cancel_how})")
        cancel(api, namespace, name, cancel_how)
        return EXIT_FAILED
    if state.succeeded:
        out(f"RayJob {namespace}/{name} succeeded")
        return EXIT_OK
    out(f"RayJob {namespace}/{name} failed: {state}")
    return EXIT_FAILED


# --------------------------------------------------------------------------- RayService deploy


def service_ready(obj: dict) -> bool:
    """The RayService serves its current spec: Ready, no upgrade pending, status observed."""
    status = obj.get("status") or {}
    generation = (obj.get("metadata") or {}).get("generation")
    observed = status.get("observedGeneration")
    if generation is not None and observed is not None and observed < generation:
        return False
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    if conditions:
        return conditions.get("Ready") == "True" and conditions.get("UpgradeInProgress") != "True"
    return status.get("serviceStatus") == "Running"  # operators before conditions existed


def deploy(
    api: RayApi,
    namespace: str,
    name: str,
    serve_config_v2: str,
    *,
    ray_cluster_config: dict | None = None,
    poll_s: float = 10.0,
    timeout_s: float = 1800.0,
    out: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    spec: dict[str, Any] = {"serveConfigV2": serve_config_v2}
    if ray_cluster_config is not None:  # e.g. a new image: the upgrade strategy rolls it out
        spec["rayClusterConfig"] = ray_cluster_config
    api.patch("RayService", namespace, name, {"spec": spec})
    out(f"patched RayService {namespace}/{name} {', '.join(spec)}; waiting until Ready")
    start = clock()
    while True:
        if service_ready(api.get("RayService", namespace, name)):
            out(f"RayService {namespace}/{name} is Ready")
            return EXIT_OK
        if clock() - start > timeout_s:
            out(f"RayService {namespace}/{name} not Ready after {timeout_s:.0f}s")
            return EXIT_FAILED
        sleep(poll_s)


# --------------------------------------------------------------------------- CLI


def _truthy(text: str) -> bool:
    return str(text).strip().lower() in ("1", "true", "yes", "on")


def main(argv: list[str] | None = None, api: RayApi | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m k8s.submit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("manifest", nargs="?", help="a rendered RayJob manifest")
    p.add_argument("--job", help="render this job of k8s.jobs instead of reading a manifest")
    p.add_argument("--deploy", action="store_true", help="patch the RayService serveConfigV2")
    p.add_argument("--overlay", default="dev", help="overlay for --job / --deploy")
    p.add_argument("--overrides", default="", help="extra key=value config overrides (--job)")
    p.add_argument("--model-uri", help="model for --deploy (default: the overlay's)")
    p.add_argument("--name", help="the RayJob to take from a multi-document manifest")
    p.add_argument("-n", "--namespace", help="default: the manifest's, else 'default'")
    p.add_argument("--follow", action="store_true", help="wait for the terminal status")
    p.add_argument("--unique", action="store_true", help="append a unique suffix to the name")
    p.add_argument("--cancel", choices=["delete", "suspend"], default="delete")
    p.add_argument("--timeout", type=float, default=None, help="seconds before cancelling")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between status polls")
    p.add_argument("--enabled", default="true", help="'false' skips the step (pipelines)")
    p.add_argument("--image", help="image of every Ray pod (default: the manifest's)")
    p.add_argument("--run-id", help="with --job: train.run_name / tune.name get '-RUN_ID'")
    a = p.parse_args(argv)
    if sum(x is not None and x is not False for x in (a.manifest, a.job, a.deploy or None)) != 1:
        p.error("give exactly one of MANIFEST, --job NAME, --deploy")
    if not _truthy(a.enabled):
        print(f"step disabled (--enabled {a.enabled}); nothing to do")
        return EXIT_OK
    try:
        if a.deploy:
            return _deploy_from_overlay(a, api)
        if a.run_id and not a.job:
            raise SubmitError("--run-id needs --job (the run name comes from the overlay config)")
        if a.job:
            doc = _rayjob_from_overlay(a.job, a.overlay, shlex.split(a.overrides), a.run_id)
        else:
            doc = load_rayjob(a.manifest, a.name)
        if a.image:
            doc = with_image(doc, a.image)
        body, ns = prepare_rayjob(doc, a.namespace, unique_suffix() if a.unique else None)
        return run_job(
            api or KubeApi(),
            body,
            ns,
            follow=a.follow,
            cancel_how=a.cancel,
            poll_s=a.poll,
            timeout_s=a.timeout,
        )
    except (SubmitError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _rayjob_from_overlay(
    job: str, overlay: str, overrides: list[str], run_id: str | None = None
) -> dict:
    from k8s.jobs import JOBS
    from k8s.manifests import rayjob, resolved_config, with_namespace
    from k8s.settings import load_settings

    if job not in JOBS:
        raise SubmitError(f"unknown job {job!r}; jobs are {sorted(JOBS)}")
    settings = load_settings(overlay)
    if run_id is not None:  # first, so an explicit train.run_name=... in overrides wins
        overrides = [*run_overrides(resolved_config(settings), run_id), *overrides]
    doc = rayjob(settings, job, overrides)
    return with_namespace([doc], settings.namespace)[0]


def _deploy_from_overlay(a: argparse.Namespace, api: RayApi | None) -> int:
    from k8s.manifests import rayservice, resolved_config
    from k8s.settings import load_settings

    settings = load_settings(a.overlay)
    if a.image:
        settings = settings.model_copy(update={"image": a.image})
    spec = rayservice(settings, resolved_config(settings), a.model_uri)["spec"]
    ns = a.namespace or settings.namespace or "default"
    return deploy(
        api or KubeApi(),
        ns,
        f"{settings.name_prefix}-serve",
        spec["serveConfigV2"],
        ray_cluster_config=spec["rayClusterConfig"] if a.image else None,
        poll_s=a.poll,
        timeout_s=a.timeout or 1800.0,
    )


if __name__ == "__main__":
    sys.exit(main())
