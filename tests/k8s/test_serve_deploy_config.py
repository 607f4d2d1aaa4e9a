"""serve_apps.deploy_config: the use-case configs load and the Serve config validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from model.config import ConfigError, load_config
from serve_apps.deploy_config import (
    IMPORT_PATH,
    INGRESS_DEPLOYMENT,
    RANKER_DEPLOYMENT,
    build_serve_config,
    load_use_cases,
    main,
)

pytestmark = pytest.mark.unit
USE_CASES = Path(__file__).resolve().parents[2] / "configs" / "use_cases"
EXPECTED = {
    "ads": ("/ads", "eligible_ads"),
    "notifications": ("/notifications", "request"),
    "related_items": ("/related", "co_occurrence"),
    "search": ("/search", "inverted_index"),
    "category": ("/category", "popular_by_category"),
}
TASKS = {"click", "add_to_cart", "checkout", "engage"}


@pytest.mark.parametrize("path", sorted(USE_CASES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_use_case_file_loads(path, tmp_path):
    (tmp_path / path.name).write_text(path.read_text())
    (uc,) = load_use_cases(tmp_path)
    assert uc.name == path.stem
    assert (uc.route_prefix, uc.retrieval) == EXPECTED[uc.name]
    assert set(uc.score_weights) <= TASKS and uc.rules


def test_all_use_cases():
    assert sorted(uc.name for uc in load_use_cases(USE_CASES)) == sorted(EXPECTED)


def test_serve_config_validates_with_ray_serve_schema():
    cfg = load_config(None)
    use_cases = load_use_cases(USE_CASES)
    out = build_serve_config(cfg, use_cases, model_uri="models:/unirank@champion")
    ServeDeploySchema.model_validate(out)
    assert out["http_options"] == {"host": "127.0.0.1", "port": 8000, "request_timeout_s": 2.0}
    apps = {a["name"]: a for a in out["applications"]}
    assert set(apps) == set(EXPECTED)
    ads = apps["ads"]
    assert ads["route_prefix"] == "/ads" and ads["import_path"] == IMPORT_PATH
    assert ads["args"]["use_case"] == "ads"
    assert ads["args"]["model_uri"] == "models:/unirank@champion"
    assert ads["args"]["config"]["use_cases"][0]["name"] == "ads"  # inline resolved config
    deployments = {d["name"]: d for d in ads["deployments"]}
    assert set(deployments) == {INGRESS_DEPLOYMENT, RANKER_DEPLOYMENT}
    ranker = deployments[RANKER_DEPLOYMENT]
    assert ranker["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 4.0,
    }
    assert ranker["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert ranker["max_ongoing_requests"] == 16


def test_config_path_replaces_the_inline_config():
    out = build_serve_config(
        load_config(None), load_use_cases(USE_CASES), config_path="/etc/unirank/unirank.yaml"
    )
    ServeDeploySchema.model_validate(out)
    args = out["applications"][0]["args"]
    assert args["config_path"] == "/etc/unirank/unirank.yaml" and "config" not in args


def test_bad_use_case_names_file_and_field(tmp_path):
    (tmp_path / "ads.yaml").write_text("name: ads\nroute_prefix: ads\nmax_replicas: 0\ntopk: 3\n")
    with pytest.raises(ConfigError) as err:
        load_use_cases(tmp_path)
    text = str(err.value)
    assert "ads.yaml" in text and "max_replicas:" in text and "topk: unknown key" in text


def test_duplicate_and_empty_use_case_dirs(tmp_path):
    with pytest.raises(ConfigError, match="no use-case configs"):
        load_use_cases(tmp_path)
    for n in ("a", "b"):
        (tmp_path / f"{n}.yaml").write_text("name: same\nroute_prefix: /x\n")
    with pytest.raises(ConfigError, match="appear twice"):
        load_use_cases(tmp_path)


def test_cli_writes_the_serve_config(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("serve: {port: 8123}\n")
    out = tmp_path / "serve_config.yaml"
    assert main([str(cfg), "--use-cases", str(USE_CASES), "-o", str(out)]) == 0
    data = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(data)
    assert data["http_options"]["port"] == 8123


@pytest.mark.parametrize(
    ("device", "use_case_gpus", "expected"),
    [("cuda", 0.0, 0.25), ("cuda", 0.5, 0.5), ("auto", 0.0, 0.0), ("cpu", 0.0, 0.0)],
)
def test_rankers_reserve_gpus_when_serving_on_cuda(device, use_case_gpus, expected):
    from serve_apps.deploy_config import CUDA_RANKER_GPUS, deployment_options

    assert CUDA_RANKER_GPUS == 0.25
    cfg = load_config(None, [f"serve.device={device}"])
    use_cases = [
        uc.model_copy(update={"num_gpus": use_case_gpus}) for uc in load_use_cases(USE_CASES)
    ]
    out = build_serve_config(cfg, use_cases)
    ServeDeploySchema.model_validate(out)
    for app in out["applications"]:
        deployments = {d["name"]: d["ray_actor_options"] for d in app["deployments"]}
        assert deployments[RANKER_DEPLOYMENT]["num_gpus"] == expected
        assert deployments[INGRESS_DEPLOYMENT]["num_gpus"] == 0.0  # HTTP only, no model
    # serve.run(build_app(args)) builds its options the same way
    opts = deployment_options(use_cases[0], cfg)
    assert opts[RANKER_DEPLOYMENT]["ray_actor_options"]["num_gpus"] == expected
