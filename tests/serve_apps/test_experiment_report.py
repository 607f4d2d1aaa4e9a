"""The experiment report on simulated logs with known truth: rates and lifts per arm, the
attribution window, always-valid decisions (a better challenger is promoted before the
fixed horizon, a harmful one is stopped by its guardrail, an A/A arm keeps going), and the
CLI through Redis -> ray_jobs.flush_log -> report -> MLflow."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.config import ExperimentConfig
from model.exposure_log import RECORD_FIELD, Exposure, Outcome, encode, stream_key, to_tables
from serve_apps.experiments import analyze, assign_arm, main

pytestmark = pytest.mark.unit
WINDOW = 3600


def experiment(**kw) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "id": "exp1",
            "salt": "s",
            "arms": [
                {"name": "champion", "share": 0.5},
                {"name": "challenger", "share": 0.5, "model_uri": "models:/m/2"},
            ],
            "guardrails": [{"metric": "checkout_rate", "max_drop": 0.0}],
            "check_every": 500,
            "attribution_window_s": WINDOW,
            **kw,
        }
    )


def simulate(
    exp, rates: dict[str, tuple[float, float]], users: int, seed: int = 0, late: float = 0.0
):
    """Exposures of ``users`` users (4 each, 5 items); per arm (click, checkout) probability
    per exposure; a ``late`` share of clicks arrives after the attribution window."""
    rng = np.random.default_rng(seed)
    records = []
    t = 1.75e9
    for u in range(1, users + 1):
        arm = assign_arm(u, exp).name
        ctr, cvr = rates[arm]
        for k in range(4):
            t += 1.0
            rid = f"{u}-{k}"
            items = [int(x) for x in rng.choice(1000, 5, replace=False)]
            records.append(Exposure(rid, t, "ads", u, arm, items, [0.1] * 5, exp.id, arm, 0.5))
            if rng.random() < ctr:
                delay = WINDOW * 2 if rng.random() < late else rng.uniform(1, 600)
                records.append(Outcome(rid, t + delay, "ads", u, items[0], 1))
                records.append(Outcome(rid, t + delay + 1, "ads", u, items[0], 1))  # double click
            if rng.random() < cvr:
                records.append(Outcome(rid, t + 900, "ads", u, items[1], 3))
            records.append(Outcome(rid, t + 5, "ads", u, 5000, 1))  # not in the slate: ignored
    return to_tables([(f"{i}-0", r) for i, r in enumerate(records)])


def test_rates_lifts_and_the_attribution_window():
    exp = experiment(minimum_detectable_lift=0.15)  # planned for half the true lift
    exposures, outcomes = simulate(
        exp, {"champion": (0.10, 0.02), "challenger": (0.13, 0.02)}, 3000, seed=1, late=0.2
    )
    r = analyze(exposures, outcomes, exp)
    champ, chall = r["arms"]["champion"], r["arms"]["challenger"]
    assert champ["exposures"] + chall["exposures"] == r["exposures"] == 12_000
    assert champ["users"] + chall["users"] == 3000
    # 20% of clicks arrive after the window: the measured CTR is 0.8 x the click probability;
    # a double click counts once, a click on an item not shown not at all
    assert champ["rates"]["ctr"] == pytest.approx(0.08, abs=0.01)
    assert chall["rates"]["ctr"] == pytest.approx(0.104, abs=0.012)
    v = chall["vs_control"]["ctr"]
    assert v["lift_ci"][0] < 0.3 < v["lift_ci"][1]
    assert chall["decision"]["action"] == "promote"
    # the sequential test decided before a fixed-horizon test planned for 15% would end
    assert v["significant_at_exposures"] < v["fixed_horizon_exposures"]


def test_a_harmful_challenger_is_stopped_by_its_guardrail():
    exp = experiment()
    exposures, outcomes = simulate(
        exp, {"champion": (0.10, 0.06), "challenger": (0.10, 0.03)}, 3000, seed=1
    )
    r = analyze(exposures, outcomes, exp)
    d = r["arms"]["challenger"]["decision"]
    assert d["action"] == "stop" and "guardrail checkout_rate" in d["reason"]


def test_an_a_a_experiment_keeps_going():
    exp = experiment()
    exposures, outcomes = simulate(
        exp, {"champion": (0.10, 0.02), "challenger": (0.10, 0.02)}, 3000, seed=2
    )
    r = analyze(exposures, outcomes, exp)
    assert r["arms"]["challenger"]["decision"]["action"] == "continue"
    assert r["looks"] == 24  # one look per 500 exposures
    assert all(v["p_value"] > exp.alpha for v in r["arms"]["challenger"]["vs_control"].values())


@pytest.mark.integration
def test_report_cli_from_redis_through_flush_to_mlflow(redis_url, tmp_path, mlflow_server, capsys):
    import redis
    import yaml
    from mlflow.tracking import MlflowClient

    from ray_jobs import flush_log

    exp = experiment()
    exposures, outcomes = simulate(
        exp, {"champion": (0.10, 0.02), "challenger": (0.14, 0.02)}, 1500, seed=3
    )
    client = redis.Redis.from_url(redis_url)
    client.delete(stream_key("ads"))
    for table in (exposures, outcomes):
        for row in table.to_pylist():
            rec = (Exposure if "items" in row else Outcome)(
                **{k: v for k, v in row.items() if k != "stream_id"}
            )
            client.xadd(stream_key("ads"), {RECORD_FIELD: encode(rec)})
    uc = {"name": "ads", "route_prefix": "/ads", "experiment": exp.model_dump(mode="json")}
    (tmp_path / "uc").mkdir()
    (tmp_path / "uc" / "ads.yaml").write_text(yaml.safe_dump(uc))
    over = [
        f"serve.redis_url={redis_url}",
        f"serve.exposure_log_output={tmp_path / 'log'}",
        f"mlflow.tracking_uri={mlflow_server}",
    ]
    assert flush_log.main(over) == 0
    capsys.readouterr()
    assert main(["report", *over, "--use-cases", str(tmp_path / "uc"), "--mlflow"]) == 0
    out = capsys.readouterr().out
    assert "experiment exp1 (ads)" in out and "decision: promote" in out
    r = json.loads(out.strip().splitlines()[-1])["experiments"]["ads"]
    run = MlflowClient(mlflow_server).get_run(r["mlflow_run_id"])
    assert run.data.tags["decision.challenger"] == "promote"
    assert run.data.metrics["challenger/ctr"] == pytest.approx(
        r["arms"]["challenger"]["rates"]["ctr"]
    )


def test_an_event_in_the_same_second_as_its_exposure_counts():
    """Events carry whole seconds (the API's timestamp), exposures fractions of one: a click
    logged at floor(exposure time) is inside the window, one a second earlier is not."""
    exp = experiment()
    t = 1.75e9 + 0.75
    records = [
        Exposure("a", t, "ads", 1, "v", [5], [0.1], exp.id, "champion", 0.5),
        Exposure("b", t, "ads", 2, "v", [5], [0.1], exp.id, "champion", 0.5),
        Outcome("a", float(int(t)), "ads", 1, 5, 1),
        Outcome("b", float(int(t)) - 1, "ads", 2, 5, 1),
    ]
    exposures, outcomes = to_tables([(f"{i}-0", r) for i, r in enumerate(records)])
    assert analyze(exposures, outcomes, exp)["arms"]["champion"]["rates"]["ctr"] == 0.5
