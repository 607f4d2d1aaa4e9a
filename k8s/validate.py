"""Strict offline validation of rendered manifests: what `kubectl apply` and KubeRay would reject.

    python -m k8s.validate DIR_OR_FILES...

prints one line per problem, ``file: kind/name: $.json.path: message``, and exits 1 if any.

Checks, for every document:
- core Kubernetes objects against the official schemas (``kubernetes-validate``, strict);
- KubeRay objects against the CRD schemas in ``k8s/crds`` (``UNIRANK_K8S_CRDS`` overrides);
- what the schemas cannot express: KubeRay name limits (DNS-1035; RayCluster <= 53,
  RayJob / RayService <= 47), minReplicas <= replicas <= maxReplicas, rayStartParams values
  are strings, RayJob deadline/TTL rules, every serveConfigV2 parses as Ray Serve's own
  ``ServeDeploySchema`` and its import_path modules exist, every RayJob entrypoint is a
  ``python -m MODULE`` whose module exists, and no credentials inline (ConfigMap or env).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

from k8s.jobs import entrypoint_module, module_exists

CRDS_DEFAULT = Path(__file__).resolve().parent / "crds"
K8S_VERSION = os.environ.get("UNIRANK_K8S_VERSION", "1.30")
CRD_FILES = {
    "RayCluster": "raycluster.v1.schema.json",
    "RayJob": "rayjob.v1.schema.json",
    "RayService": "rayservice.v1.schema.json",
}
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY)", re.IGNORECASE)
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}


@dataclass(frozen=True)
class Problem:
    file: str
    kind: str
    name: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.kind}/{self.name}: {self.path}: {self.message}"


def crds_dir() -> Path:
    return Path(os.environ.get("UNIRANK_K8S_CRDS") or CRDS_DEFAULT)


@functools.cache
def _crd_validator(kind: str, directory: str) -> Draft202012Validator:
    schema = json.loads((Path(directory) / CRD_FILES[kind]).read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _member(key: Any) -> str:
    """A JSONPath member step, written like jsonschema's ``json_path`` does."""
    if isinstance(key, int):
        return f"[{key}]"
    return f".{key}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(key)) else f"['{key}']"


def _json_path(base: str, loc: Iterable[Any]) -> str:
    return base + "".join(_member(part) for part in loc)


# --------------------------------------------------------------------------- schema checks


def _schema_errors(doc: dict) -> list[tuple[str, str]]:
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if api == "ray.io/v1" and kind in CRD_FILES:
        v = _crd_validator(kind, str(crds_dir()))
        errors = sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path))
        return [(e.json_path, e.message) for e in errors]
    if api == "ray.io/v1":
        return [("$.kind", f"no KubeRay schema for {api} {kind}")]
    import kubernetes_validate as kv  # the official OpenAPI schemas, bundled (offline)

    try:
        kv.validate(doc, K8S_VERSION, strict=True)
    except kv.ValidationError as e:
        return [(e.json_path, e.message)]
    except kv.SchemaNotFoundError as e:
        return [("$.kind", e.message)]
    return []


# --------------------------------------------------------------------------- semantic checks


def _cluster_spec_paths(doc: dict) -> list[tuple[str, dict]]:
    spec = doc.get("spec") or {}
    kind = doc.get("kind")
    key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}.get(
        kind
    )
    if kind == "RayCluster":
        return [("$.spec", spec)]
    if key and isinstance(spec.get(key), dict):
        return [(f"$.spec.{key}", spec[key])]
    return []


def _check_name(doc: dict) -> list[tuple[str, str]]:
    kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str):
        return []
    out = []
    if kind in NAME_LIMITS:
        if len(name) > NAME_LIMITS[kind]:
            out.append(
                (
                    "$.metadata.name",
                    f"{kind} name {name!r} has {len(name)} characters; KubeRay allows at most "
                    f"{NAME_LIMITS[kind]}",
                )
            )
        if not DNS_1035.match(name):
            out.append(
                ("$.metadata.name", f"{name!r} is not a DNS-1035 label (a-z first, then a-z0-9-)")
            )
    elif len(name) > 253 or not DNS_1123_SUBDOMAIN.match(name):
        out.append(("$.metadata.name", f"{name!r} is not a DNS-1123 subdomain"))
    return out


def _check_groups(base: str, spec: dict) -> list[tuple[str, str]]:
    out = []
    head = spec.get("headGroupSpec") or {}
    groups = [(f"{base}.headGroupSpec", head)] + [
        (f"{base}.workerGroupSpecs[{i}]", g)
        for i, g in enumerate(spec.get("workerGroupSpecs") or [])
    ]
    for path, g in groups:
        if not isinstance(g, dict):
            continue
        params = g.get("rayStartParams") or {}
        for k, v in params.items() if isinstance(params, dict) else []:
            if not isinstance(v, str):
                out.append(
                    (
                        f"{path}.rayStartParams{_member(k)}",
                        f'rayStartParams values must be strings; quote it: {k}: "{v}"',
                    )
                )
            if k == "labels":
                out.append((f"{path}.rayStartParams.labels", "use the group-level labels field"))
        containers = ((g.get("template") or {}).get("spec") or {}).get("containers")
        if not containers:
            out.append((f"{path}.template.spec.containers", "needs at least one container"))
    names = []
    for i, g in enumerate(spec.get("workerGroupSpecs") or []):
        if not isinstance(g, dict):
            continue
        path = f"{base}.workerGroupSpecs[{i}]"
        names.append(g.get("groupName"))
        lo, n, hi = g.get("minReplicas"), g.get("replicas"), g.get("maxReplicas")
        ints = [x for x in (lo, n, hi) if x is not None]
        if not all(isinstance(x, int) for x in ints):
            continue  # the schema reports the type error
        if not spec.get("enableInTreeAutoscaling") and (lo is None or hi is None):
            out.append((path, "minReplicas and maxReplicas must be set when autoscaling is off"))
        if lo is not None and lo < 0:
            out.append((f"{path}.minReplicas", f"must be >= 0, got {lo}"))
        if lo is not None and hi is not None and lo > hi:
            out.append((f"{path}.minReplicas", f"minReplicas {lo} > maxReplicas {hi}"))
        if n is not None and lo is not None and n < lo:
            out.append((f"{path}.replicas", f"replicas {n} < minReplicas {lo}"))
        if n is not None and hi is not None and n > hi:
            out.append((f"{path}.replicas", f"replicas {n} > maxReplicas {hi}"))
    dupes = sorted({n for n in names if names.count(n) > 1 and n is not None})
    if dupes:
        out.append((f"{base}.workerGroupSpecs", f"groupName {dupes} appears more than once"))
    return out


def _check_containers(base: str, spec: dict) -> list[tuple[str, str]]:
    out = []
    for gpath, g in [(f"{base}.headGroupSpec", spec.get("headGroupSpec"))] + [
        (f"{base}.workerGroupSpecs[{i}]", g)
        for i, g in enumerate(spec.get("workerGroupSpecs") or [])
    ]:
        if not isinstance(g, dict):
            continue
        containers = ((g.get("template") or {}).get("spec") or {}).get("containers") or []
        for ci, c in enumerate(containers):
            for ei, e in enumerate((c or {}).get("env") or []):
                if isinstance(e, dict) and "value" in e and SECRET_NAME.search(str(e.get("name"))):
                    out.append(
                        (
                            f"{gpath}.template.spec.containers[{ci}].env[{ei}].value",
                            f"{e.get('name')} must come from a Secret (valueFrom.secretKeyRef), "
                            "never inline",
                        )
                    )
    return out


def _check_rayjob(doc: dict) -> list[tuple[str, str]]:
    spec = doc.get("spec") or {}
    out = []
    entry = spec.get("entrypoint")
    if isinstance(entry, str):
        module = entrypoint_module(entry)
        if module is None:
            out.append(("$.spec.entrypoint", f"not a `python -m MODULE ...` command: {entry!r}"))
        elif not module_exists(module):
            out.append(("$.spec.entrypoint", f"module {module!r} does not exist in the package"))
    ttl = spec.get("ttlSecondsAfterFinished")
    if isinstance(ttl, int) and ttl > 0 and not spec.get("shutdownAfterJobFinishes"):
        out.append(("$.spec.ttlSecondsAfterFinished", "> 0 needs shutdownAfterJobFinishes: true"))
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        out.append(("$.spec.suspend", "suspend: true needs shutdownAfterJobFinishes: true"))
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        v = spec.get(key)
        if isinstance(v, int) and v <= 0:
            out.append((f"$.spec.{key}", f"must be > 0, got {v}"))
    if spec.get("clusterSelector") and "backoffLimit" in spec:
        out.append(("$.spec.backoffLimit", "cannot be combined with clusterSelector"))
    if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
        out.append(("$.spec", "needs rayClusterSpec or clusterSelector"))
    return out


def _check_serve_config(text: Any) -> list[tuple[str, str]]:
    base = "$.spec.serveConfigV2"
    if not isinstance(text, str):
        return []  # the schema reports the type
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return [(base, f"not valid YAML: {exc}")]
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema  # Ray Serve's own schema (same Ray as image)

    try:
        ServeDeploySchema.model_validate(data)
    except ValidationError as err:
        return [
            (_json_path(base, e["loc"]), f"ServeDeploySchema: {e['msg']}") for e in err.errors()
        ]
    out = []
    for i, app in enumerate(data.get("applications") or []):
        module = str(app.get("import_path", "")).partition(":")[0]
        if module and not module_exists(module):
            out.append(
                (
                    f"{base}.applications[{i}].import_path",
                    f"module {module!r} does not exist in the package",
                )
            )
    return out


def _check_rayservice(doc: dict) -> list[tuple[str, str]]:
    spec = doc.get("spec") or {}
    out = _check_serve_config(spec.get("serveConfigV2"))
    strategy = (spec.get("upgradeStrategy") or {}).get("type")
    if strategy is not None and strategy not in UPGRADE_TYPES:
        out.append(("$.spec.upgradeStrategy.type", f"must be one of {sorted(UPGRADE_TYPES)}"))
    return out


def _check_configmap(doc: dict) -> list[tuple[str, str]]:
    out = []
    for key, value in (doc.get("data") or {}).items():
        if SECRET_NAME.search(str(key)):
            out.append((f"$.data{_member(key)}", "credentials belong in a Secret, not a ConfigMap"))
            continue
        if not isinstance(value, str) or not key.endswith((".yaml", ".yml")):
            continue
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            continue
        storage = (parsed or {}).get("storage") if isinstance(parsed, dict) else None
        for field in ("access_key_id", "secret_access_key"):
            if isinstance(storage, dict) and storage.get(field):
                out.append(
                    (
                        f"$.data{_member(key)}.storage.{field}",
                        "S3 credentials must come from the Secret, never inline",
                    )
                )
    return out


SEMANTIC: dict[str, list[Callable[[dict], list[tuple[str, str]]]]] = {
    "RayJob": [_check_rayjob],
    "RayService": [_check_rayservice],
    "ConfigMap": [_check_configmap],
}


def validate_doc(doc: Any) -> list[tuple[str, str]]:
    """(json path, message) for every problem of one manifest document."""
    if not isinstance(doc, dict):
        return [("$", "a manifest must be a mapping")]
    for key in ("apiVersion", "kind"):
        if not isinstance(doc.get(key), str):
            return [(f"$.{key}", "required string missing")]
    out = _schema_errors(doc) + _check_name(doc)
    for base, spec in _cluster_spec_paths(doc):
        out += _check_groups(base, spec) + _check_containers(base, spec)
    for check in SEMANTIC.get(doc["kind"], []):
        out += check(doc)
    return out


def load_documents(path: Path) -> list[tuple[Any, str | None]]:
    """(document, error) per YAML document of a file; empty documents skipped."""
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError as exc:
        return [(None, f"not valid YAML: {exc}")]
    return [(d, None) for d in docs if d is not None]


def manifest_files(targets: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for t in map(Path, targets):
        if t.is_dir():
            files += sorted(p for p in t.rglob("*") if p.suffix in (".yaml", ".yml"))
        else:
            files.append(t)
    return files


def validate_files(targets: Iterable[str | Path]) -> list[Problem]:
    problems: list[Problem] = []
    for path in manifest_files(targets):
        if path.name == "kustomization.yaml":
            continue  # kustomize's own config, not a manifest
        if not path.exists():
            problems.append(Problem(str(path), "-", "-", "$", "no such file"))
            continue
        for doc, error in load_documents(path):
            if error:
                problems.append(Problem(str(path), "-", "-", "$", error))
                continue
            kind = doc.get("kind", "?") if isinstance(doc, dict) else "?"
            meta = doc.get("metadata") if isinstance(doc, dict) else None
            name = (meta or {}).get("name", "?") if isinstance(meta, dict) else "?"
            for jpath, msg in validate_doc(doc):
                problems.append(Problem(str(path), kind, name, jpath, msg))
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m k8s.validate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("targets", nargs="+", help="manifest files or directories")
    a = p.parse_args(argv)
    files = manifest_files(a.targets)
    problems = validate_files(a.targets)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {len(files)} file(s)", file=sys.stderr)
        return 1
    print(f"ok: {len(files)} file(s) valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
