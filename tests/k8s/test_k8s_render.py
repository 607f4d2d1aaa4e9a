"""k8s.render: both overlays render, validate strictly, and match the checked-in kustomize tree."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from k8s import kustomize
from k8s.jobs import CONFIG_PATH, JOBS, module_exists
from k8s.kustomize import apply_patch, build_overlay, diff, stale_files
from k8s.manifests import SERVE_MODULE, build_layer, rayservice, resolved_config
from k8s.render import main as render_main
from k8s.settings import load_settings, overlays
from k8s.validate import validate_doc, validate_files
from model.config import ConfigError
from serve_apps.deploy_config import build_serve_config

pytestmark = pytest.mark.unit


def _docs(directory: Path) -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted(directory.rglob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def test_overlays_are_dev_and_prod():
    assert overlays() == ["dev", "prod"]


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_rendered_overlay_validates(rendered, overlay):
    problems = validate_files([rendered[overlay]])
    assert problems == [], "\n".join(map(str, problems))


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_rendered_jobs_are_those_whose_module_exists(rendered, overlay):
    jobs = {
        d["metadata"]["name"] for (k, _), d in _docs(rendered[overlay]).items() if k == "RayJob"
    }
    expected = {f"unirank-{j.name}" for j in JOBS.values() if module_exists(j.module)}
    assert jobs == expected
    assert "unirank-generate" in jobs  # ray_jobs.generate exists
    # ray_jobs.prepare is rendered as soon as it exists (then re-render: the tree test says so)
    assert ("unirank-prepare" in jobs) == module_exists("ray_jobs.prepare")


def test_render_cli_writes_files_and_notes(tmp_path, capsys):
    assert render_main(["dev", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "raycluster-unirank.yaml").exists()
    assert (tmp_path / "jobs" / "rayjob-unirank-generate.yaml").exists()
    err = capsys.readouterr().err
    if not module_exists(SERVE_MODULE):
        assert f"RayService skipped: module {SERVE_MODULE} does not exist yet" in err


def test_unknown_overlay_is_a_clear_error(tmp_path, capsys):
    assert render_main(["staging", "--out", str(tmp_path)]) == 2
    assert "unknown overlay 'staging'" in capsys.readouterr().err


def test_bad_settings_name_file_and_field(tmp_path):
    (tmp_path / "base.yaml").write_text("workers:\n  - {name: cpu, replicas: 3, max_replicas: 2}\n")
    (tmp_path / "dev.yaml").write_text("imagee: x\n")
    with pytest.raises(ConfigError, match=r"dev.yaml:\n(.|\n)*imagee: unknown key"):
        load_settings("dev", tmp_path)
    with pytest.raises(ConfigError, match=r"workers.0: .*min_replicas <= replicas <= max_replicas"):
        load_settings("base", tmp_path)


def test_kustomize_tree_is_up_to_date():
    problems = stale_files()
    assert problems == [], "\n".join(problems) + "\nrun: python -m k8s.render --write-tree"


def _kustomize_build(directory: Path) -> list[dict]:
    """What `kustomize build` does with the features the generated tree uses."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for res in k["resources"]:
        path = directory / res
        docs += _kustomize_build(path) if path.is_dir() else [yaml.safe_load(path.read_text())]
    for patch in k.get("patches", []):
        t = patch["target"]
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        hits = [
            i
            for i, d in enumerate(docs)
            if d["kind"] == t["kind"]
            and d["metadata"]["name"] == t["name"]
            and d["apiVersion"] == "/".join(filter(None, (t.get("group"), t["version"])))
        ]
        assert len(hits) == 1, f"patch {patch['path']} matches {len(hits)} objects"
        docs[hits[0]] = apply_patch(docs[hits[0]], ops)
    if k.get("namespace"):
        for d in docs:
            d["metadata"]["namespace"] = k["namespace"]
    return docs


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_checked_in_kustomize_tree_builds_the_rendered_set(rendered, overlay):
    root = kustomize.K8S_DIR / "overlays" / overlay
    built = _kustomize_build(root) + _kustomize_build(root / "jobs")
    by_key = {(d["kind"], d["metadata"]["name"]): d for d in built}
    assert by_key == _docs(rendered[overlay])


def test_json_patch_roundtrip_with_escaped_keys():
    a = {"m": {"labels": {"app.kubernetes.io/name": "x", "a~b": 1}}, "l": [1, 2], "gone": 1}
    b = {"m": {"labels": {"app.kubernetes.io/name": "y", "nvidia.com/gpu": "1"}}, "l": [1, 2, 3]}
    ops = diff(a, b)
    assert apply_patch(a, ops) == b
    assert {"op": "remove", "path": "/m/labels/a~0b"} in ops
    assert any(op["path"] == "/m/labels/nvidia.com~1gpu" for op in ops)


def test_dev_is_small_cpu_one_worker(rendered):
    rc = _docs(rendered["dev"])[("RayCluster", "unirank")]
    assert rc["metadata"]["namespace"] == "unirank-dev"
    (group,) = rc["spec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 1
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits
    assert rc["spec"]["enableInTreeAutoscaling"] is False


def test_prod_has_an_autoscaled_gpu_group_on_gpu_nodes(rendered):
    rc = _docs(rendered["prod"])[("RayCluster", "unirank")]
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    (group,) = rc["spec"]["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["minReplicas"] < group["maxReplicas"]
    pod = group["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["containers"][0]["image"].endswith("-gpu")


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_rayjob_entrypoint_config_and_lifecycle(rendered, overlay):
    docs = _docs(rendered[overlay])
    job = docs[("RayJob", "unirank-generate")]["spec"]
    assert job["entrypoint"] == f"python -m ray_jobs.generate {CONFIG_PATH}"
    assert job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] > 0 and job["activeDeadlineSeconds"] > 0
    assert job["backoffLimit"] >= 0
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["volumes"][0]["configMap"]["name"] == "unirank-config"
    assert head["containers"][0]["volumeMounts"][0]["mountPath"] == "/etc/unirank"
    # the mounted file is the resolved project config, loadable by the job's own loader
    cm = docs[("ConfigMap", "unirank-config")]
    cfg = yaml.safe_load(cm["data"]["unirank.yaml"])
    assert cfg["generate"]["output"].startswith("s3://")
    assert cfg["storage"].get("secret_access_key") is None


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_storage_credentials_from_secret_and_metrics_scraped(rendered, overlay):
    rc = _docs(rendered[overlay])[("RayCluster", "unirank")]
    head = rc["spec"]["headGroupSpec"]["template"]
    container = head["spec"]["containers"][0]
    refs = [e.get("secretRef", {}).get("name") for e in container["envFrom"]]
    assert "unirank-s3" in refs
    assert not any("SECRET" in e["name"] for e in container["env"])
    assert head["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert head["metadata"]["annotations"]["prometheus.io/port"] == "8080"
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "8080"


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_rayservice_and_all_jobs_valid_ahead_of_their_modules(overlay):
    """The gated objects are rendered and validated now; only the module check may fail."""
    layer, _ = build_overlay(overlay, all_jobs=True, force_serve=True)
    kinds = [d["kind"] for d in layer.cluster + layer.jobs]
    assert kinds.count("RayService") == 1 and kinds.count("RayJob") == len(JOBS)
    for doc in layer.cluster + layer.jobs:
        for path, msg in validate_doc(doc):
            assert "does not exist in the package" in msg, (doc["metadata"]["name"], path, msg)


def test_rayservice_serve_config_is_the_generator_output():
    settings = load_settings("prod")
    cfg = resolved_config(settings)
    svc = rayservice(settings, cfg)
    expected = build_serve_config(
        cfg, cfg.use_cases, host="0.0.0.0", model_uri=settings.model_uri, config_path=CONFIG_PATH
    )
    assert yaml.safe_load(svc["spec"]["serveConfigV2"]) == expected
    assert svc["spec"]["upgradeStrategy"] == {"type": "NewCluster"}


def test_layer_gates_on_module_existence():
    layer = build_layer(load_settings("base"), module_exists=lambda m: m == "ray_jobs.generate")
    assert [d["metadata"]["name"] for d in layer.jobs] == ["unirank-generate"]
    assert not any(d["kind"] == "RayService" for d in layer.cluster)
    assert any("RayService skipped" in n for n in layer.notes)
