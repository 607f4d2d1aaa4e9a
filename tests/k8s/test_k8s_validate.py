"""k8s.validate: broken manifests are rejected with messages that name the field."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from k8s import validate
from k8s.validate import main as validate_main
from k8s.validate import validate_files

pytestmark = pytest.mark.unit
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_CRDS = Path(__file__).resolve().parents[3] / "shared" / "k8s-crds"

# fixture -> (kind/name, json path, words the message must contain)
BROKEN = {
    "unknown_field.yaml": (
        "RayCluster/broken-unknown-field",
        "$.spec.headGroupSpec",
        ["rayStartParam", "not allowed"],
    ),
    "replicas_out_of_range.yaml": (
        "RayCluster/broken-replicas",
        "$.spec.workerGroupSpecs[0].replicas",
        ["replicas 5 > maxReplicas 2"],
    ),
    "unquoted_raystartparams.yaml": (
        "RayCluster/broken-ray-start-params",
        "$.spec.headGroupSpec.rayStartParams['num-cpus']",
        ["must be strings", 'num-cpus: "0"'],
    ),
    "too_long_name.yaml": (
        "RayJob/unirank-generate-with-a-name-that-is-far-too-lon",
        "$.metadata.name",
        ["48 characters", "at most 47"],
    ),
    "bad_serve_config.yaml": (
        "RayService/broken-serve",
        "$.spec.serveConfigV2.applications[0].deployments[0]",
        ["ServeDeploySchema", "num_replicas"],
    ),
    "missing_module.yaml": (
        "RayJob/broken-missing-module",
        "$.spec.entrypoint",
        ["ray_jobs.no_such_job", "does not exist"],
    ),
    "core_unknown_field.yaml": ("ConfigMap/broken-configmap", "$", ["datas", "not allowed"]),
    "inline_secret.yaml": (
        "ConfigMap/broken-credentials",
        "$.data.AWS_SECRET_ACCESS_KEY",
        ["Secret"],
    ),
}


def test_every_fixture_is_covered():
    assert sorted(p.name for p in FIXTURES.glob("*.yaml")) == sorted(BROKEN)


@pytest.mark.parametrize("fixture", sorted(BROKEN))
def test_broken_manifest_is_rejected_naming_the_field(fixture, capsys):
    target, path, words = BROKEN[fixture]
    file = FIXTURES / fixture
    assert validate_main([str(file)]) == 1
    lines = capsys.readouterr().out.splitlines()
    prefix = f"{file}: {target}: {path}: "
    hits = [line for line in lines if line.startswith(prefix)]
    assert hits, f"no line starting with {prefix!r} in:\n" + "\n".join(lines)
    assert any(all(w in line for w in words) for line in hits), hits


def test_problems_are_reported_for_every_document_of_a_directory():
    problems = validate_files([FIXTURES])
    assert {Path(p.file).name for p in problems} == set(BROKEN)


def test_cli_accepts_valid_files(tmp_path, capsys):
    good = tmp_path / "cm.yaml"
    good.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ok}\ndata: {a: b}\n")
    assert validate_main([str(good)]) == 0
    assert "ok: 1 file(s) valid" in capsys.readouterr().out


def test_invalid_yaml_and_missing_kind(tmp_path):
    (tmp_path / "a.yaml").write_text("kind: [unclosed\n")
    (tmp_path / "b.yaml").write_text("metadata: {name: x}\n")
    messages = [(Path(p.file).name, p.path, p.message) for p in validate_files([tmp_path])]
    assert messages[0][0] == "a.yaml" and "not valid YAML" in messages[0][2]
    assert messages[1] == ("b.yaml", "$.apiVersion", "required string missing")


def test_crd_schemas_dir_is_overridable(tmp_path, monkeypatch):
    assert validate.crds_dir() == validate.CRDS_DEFAULT
    monkeypatch.setenv("UNIRANK_K8S_CRDS", str(tmp_path))
    assert validate.crds_dir() == tmp_path


def test_crds_copy_keeps_provenance_and_matches_shared():
    crds = validate.CRDS_DEFAULT
    assert "KubeRay **v1.7.0**" in (crds / "README.md").read_text()
    if not SHARED_CRDS.is_dir():
        pytest.skip("no ../shared/k8s-crds beside this clone")
    for name in [*validate.CRD_FILES.values(), "README.md"]:
        assert filecmp.cmp(crds / name, SHARED_CRDS / name, shallow=False), name


def test_kubeflow_rbac_is_valid():
    rbac = Path(validate.__file__).parent / "kubeflow" / "rbac.yaml"
    assert validate_files([rbac]) == []
