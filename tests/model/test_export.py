"""Serving face: TorchScript parity, reduced precision, the self-contained export directory,
CUDA Graphs skipped on CPU."""

import json

import numpy as np
import pytest
import torch
import yaml

from model.calibration import Calibrators
from model.config import UnirankConfig
from model.ensemble import build_model
from model.export import (
    LoadedPredictor,
    UnknownTaskTypeError,
    cuda_graphs_unavailable_reason,
    export,
    load_predictor,
    make_predictor,
    maybe_cuda_graphs,
    script_predictor,
)
from model.features import FeatureProcessor

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def setup(tiny_cfg, examples):
    cfg = tiny_cfg(backbones=["cross", "attention", "masknet"], experts={"kind": "mmoe"})
    proc = FeatureProcessor(cfg.dataset).fit([examples])
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    batch = proc(examples.slice(0, 128))
    with torch.no_grad():
        eager = make_predictor(model, cfg)(*batch.inputs())
    return cfg, proc, model, batch, eager


def test_torchscript_fp32_matches_eager(setup):
    cfg, _, model, batch, eager = setup
    scripted = script_predictor(model, cfg, "fp32")
    out = scripted(*batch.inputs())
    for k in eager:
        torch.testing.assert_close(out[k], eager[k], rtol=0, atol=1e-5)
    assert all(((v > 0) & (v < 1)).all() for v in out.values())


def test_bf16_matches_fp32_within_1e_2(setup):
    cfg, _, model, batch, eager = setup
    out = script_predictor(model, cfg, "bf16")(*batch.inputs())
    for k in eager:
        assert out[k].dtype == torch.float32
        assert (out[k] - eager[k]).abs().max().item() < 1e-2, k
    assert next(model.backbones[0].parameters()).dtype == torch.float32  # original untouched


def test_mse_tasks_are_not_squashed(tiny_cfg, examples):
    cfg = tiny_cfg()
    cfg.dataset.tasks[0].loss = "mse"
    b = FeatureProcessor(cfg.dataset).fit([examples])(examples.slice(0, 8))
    model = build_model(cfg).eval()
    out = script_predictor(model, cfg)(*b.inputs())
    torch.testing.assert_close(out["click"], model(*b.inputs())["click"], rtol=0, atol=1e-5)


def test_export_directory_is_self_contained(setup, tmp_path, examples):
    cfg, proc, model, _, _ = setup
    val = examples.slice(0, 1000)
    vb = proc(val)
    with torch.no_grad():
        raw = {k: v.numpy() for k, v in make_predictor(model, cfg)(*vb.inputs()).items()}
    names = np.asarray(proc.layout.task_types, dtype=object)[vb.task_type.numpy()]
    cals = Calibrators.fit(
        raw,
        vb.labels.numpy(),
        vb.label_mask.numpy(),
        list(raw),
        method="platt",
        task_type=names,
        per_task_type=True,
        min_rows=100,
    )
    out_dir = export(tmp_path / "exp", model, proc, cfg, cals)
    files = {p.name for p in out_dir.iterdir()}
    assert files == {
        "model.pt",
        "processor.json",
        "calibrators.json",
        "config.yaml",
        "manifest.json",
    }
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["tasks"] == list(raw)
    assert (
        UnirankConfig.model_validate(yaml.safe_load((out_dir / "config.yaml").read_text())) == cfg
    )

    pred = load_predictor(out_dir)
    assert isinstance(pred, LoadedPredictor)
    assert "CUDA Graphs skipped" in pred.cuda_graphs_reason  # CPU: plain module calls
    rows = examples.slice(1000, 37)  # not a shape bucket: padded to 64, cut back
    got = pred.predict(rows)
    b = proc(rows)
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in make_predictor(model, cfg)(*b.inputs()).items()}
    ref_names = np.asarray(proc.layout.task_types, dtype=object)[b.task_type.numpy()]
    expected = cals.apply(ref, ref_names)
    for k in expected:
        assert got[k].shape == (37,)
        np.testing.assert_allclose(got[k], expected[k], atol=1e-5)
    # the same rows as a JSON-like dict give the same predictions
    as_json = {k: rows.column(k).to_pylist() for k in rows.column_names}
    as_json["event_time"] = [t.isoformat() for t in as_json["event_time"]]
    for k, v in pred.predict(as_json).items():
        np.testing.assert_allclose(v, got[k], atol=1e-6)


def test_unknown_task_type_is_rejected(setup, tmp_path, examples):
    cfg, proc, model, _, _ = setup
    pred = load_predictor(export(tmp_path / "e", model, proc, cfg))
    cols = {k: examples.slice(0, 3).column(k).to_pylist() for k in examples.column_names}
    cols["task_type"] = ["ads", "weather", "ads"]
    with pytest.raises(UnknownTaskTypeError, match="weather") as err:
        pred.predict(cols)
    assert err.value.unknown == ["weather"]
    assert pred.predict(cols, allow_unknown_task_type=True)["click"].shape == (3,)


def test_export_bf16_directory(setup, tmp_path, examples):
    cfg, proc, model, batch, eager = setup
    pred = load_predictor(export(tmp_path / "bf16", model, proc, cfg, precision="bf16"))
    got = pred.run(batch)
    for k in eager:
        assert np.abs(got[k] - eager[k].numpy()).max() < 1e-2


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pt"):
        load_predictor(tmp_path)


def test_cuda_graphs_skipped_on_cpu_with_reason(setup):
    cfg, _, model, batch, eager = setup
    scripted = script_predictor(model, cfg)
    runner, reason = maybe_cuda_graphs(scripted, batch)
    assert runner is scripted
    assert reason is not None and "CUDA Graphs skipped" in reason
    assert cuda_graphs_unavailable_reason("cpu") == reason
    if not torch.cuda.is_available():
        assert "is_available" in cuda_graphs_unavailable_reason("cuda")
    out = runner(*batch.inputs())  # the CPU fallback still answers, identically
    for k in eager:
        torch.testing.assert_close(out[k], eager[k], rtol=0, atol=1e-5)
