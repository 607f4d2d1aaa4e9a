"""k8s.render: both overlays render, validate strictly, and match the checked-in kustomize tree."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from k8s import kustomize
from k8s.capacity import Demand, check, check_docs, nodes, quantity, serve_demand
from k8s.jobs import CONFIG_PATH, JOBS, module_exists
from k8s.kustomize import apply_patch, build_overlay, diff, stale_files
from k8s.manifests import (
    SERVE_MODULE,
    build_layer,
    config_document,
    rayservice,
    resolved_config,
)
from k8s.render import main as render_main
from k8s.settings import ROOT, SETTINGS_DIR, load_settings, overlays
from k8s.validate import validate_doc, validate_files
from model.config import ConfigError
from serve_apps.deploy_config import build_serve_config

pytestmark = pytest.mark.unit
USE_CASES_DIR = ROOT / "configs" / "use_cases"


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


def _groups(spec: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in spec["workerGroupSpecs"]}


def test_prod_has_autoscaled_cpu_and_gpu_groups(rendered):
    docs = _docs(rendered["prod"])
    svc = docs[("RayService", "unirank-serve")]["spec"]["rayClusterConfig"]
    assert svc["enableInTreeAutoscaling"] is True
    groups = _groups(svc)
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert g["minReplicas"] < g["maxReplicas"]
    gpu = groups["gpu"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert gpu["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert gpu["containers"][0]["image"].endswith("-gpu")
    cpu = groups["cpu"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"]
    assert "tolerations" not in cpu  # so CPU pods never land on the tainted GPU nodes


# prod: which clusters get the GPU group (train/tune use GPUs, serve.device is cuda)
PROD_GROUPS = {
    ("RayCluster", "unirank"): {"cpu"},
    ("RayService", "unirank-serve"): {"cpu", "gpu"},
    ("RayJob", "unirank-generate"): {"cpu"},
    ("RayJob", "unirank-prepare"): {"cpu"},
    ("RayJob", "unirank-evaluate"): {"cpu"},
    ("RayJob", "unirank-export"): {"cpu"},
    ("RayJob", "unirank-user-embeddings"): {"cpu"},
    ("RayJob", "unirank-train"): {"cpu", "gpu"},
    ("RayJob", "unirank-tune"): {"cpu", "gpu"},
}


def test_prod_cpu_workloads_get_no_gpu_nodes():
    layer, _ = build_overlay("prod", all_jobs=True, force_serve=True)
    got = {}
    for d in layer.cluster + layer.jobs:
        if d["kind"] == "ConfigMap":
            continue
        spec = d["spec"] if d["kind"] == "RayCluster" else d["spec"].get("rayClusterSpec")
        spec = spec or d["spec"].get("rayClusterConfig")
        if spec is not None:
            got[(d["kind"], d["metadata"]["name"])] = set(_groups(spec))
    assert got == PROD_GROUPS


def test_prod_rankers_reserve_gpus_and_serve_on_cuda():
    settings = load_settings("prod")
    cfg = resolved_config(settings)
    assert cfg.serve.device == "cuda"
    serve = yaml.safe_load(rayservice(settings, cfg)["spec"]["serveConfigV2"])
    for app in serve["applications"]:
        opts = {d["name"]: d["ray_actor_options"] for d in app["deployments"]}
        assert opts["Ranker"]["num_gpus"] > 0, app["name"]


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


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_rendered_requests_fit_the_declared_nodes(rendered, overlay):
    """Every RayJob and the RayService, re-derived from the rendered files alone."""
    docs = [yaml.safe_load(p.read_text()) for p in sorted(rendered[overlay].rglob("*.yaml"))]
    assert any(d["kind"] == "RayService" for d in docs) == module_exists(SERVE_MODULE)
    assert check_docs(docs) == []


def test_requests_that_do_not_fit_are_named():
    """The old dev worker (2 CPUs, head num-cpus 0): the five use-cases' replicas need 2.25."""
    layer, _ = build_overlay("dev", all_jobs=True, force_serve=True)
    svc = copy.deepcopy(next(d for d in layer.cluster if d["kind"] == "RayService"))
    (group,) = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "2"
    demand = serve_demand(svc["spec"]["serveConfigV2"])
    assert sum(cpu for _, cpu, _ in demand.bundles) == pytest.approx(2.25)
    problems = check(demand, svc["spec"]["rayClusterConfig"], "RayService/unirank-serve")
    assert problems and all("fits on no node" in p for p in problems)
    assert "RayService/unirank-serve: Serve " in problems[0]
    # a GPU request on a cluster without GPU nodes
    d = Demand()
    d.add("train worker", 1, 1)
    (msg,) = check(d, svc["spec"]["rayClusterConfig"], "RayJob/x")
    assert msg.startswith("RayJob/x: train worker (1 CPU, 1 GPU) fits on no node")
    assert nodes({"headGroupSpec": group, "workerGroupSpecs": []})[0].cpu == 2.0
    assert quantity("500m") == 0.5


def test_render_refuses_requests_that_do_not_fit(tmp_path):
    base = (SETTINGS_DIR / "base.yaml").read_text()
    (tmp_path / "base.yaml").write_text(base)
    (tmp_path / "dev.yaml").write_text(
        "workers:\n  - {name: cpu, replicas: 1, min_replicas: 1, max_replicas: 1, cpu: '2'}\n"
    )
    with pytest.raises(
        ConfigError, match=r"do not fit the declared nodes(.|\n)*RayService unirank-serve: Serve "
    ):
        build_layer(load_settings("dev", tmp_path), all_jobs=True)


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_jobs_read_the_splits_prepare_writes(overlay):
    cfg = resolved_config(load_settings(overlay))
    root = cfg.prepare.output.rstrip("/")
    assert root.startswith("s3://")
    for split in ("train", "validation", "test"):
        assert getattr(cfg.dataset, split) == [f"{root}/{split}"]
    assert cfg.generate.output == cfg.prepare.input
    assert cfg.serve.model_uri == load_settings(overlay).model_uri


def test_settings_config_resolves_base_at_any_depth(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.yaml").write_text("train: {epochs: 7, lr: 0.5}\n")
    (tmp_path / "configs" / "b.yaml").write_text("base: a.yaml\ntrain: {lr: 0.25}\n")
    (tmp_path / "configs" / "c.yaml").write_text("base: b.yaml\nmodel: {dropout: 0.3}\n")
    s = load_settings("base").model_copy(update={"config": "configs/c.yaml"})
    s = s.model_copy(update={"use_cases_dir": str(USE_CASES_DIR)})
    cfg = resolved_config(s, root=tmp_path)
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.dropout) == (7, 0.25, 0.3)
    assert "base" not in config_document(s, root=tmp_path)
    (tmp_path / "configs" / "a.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        config_document(s, root=tmp_path)


def test_layer_gates_on_module_existence():
    layer = build_layer(load_settings("base"), module_exists=lambda m: m == "ray_jobs.generate")
    assert [d["metadata"]["name"] for d in layer.jobs] == ["unirank-generate"]
    assert not any(d["kind"] == "RayService" for d in layer.cluster)
    assert any("RayService skipped" in n for n in layer.notes)
