"""The split user-sequence path: ``encode_user`` once per user + ``forward_encoded`` per
candidate equals ``forward`` on the raw sequence (eager, TorchScript, the exported directory),
including an encoding cut to its real events and padded again (the feature store round trip)."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from model.ensemble import build_model
from model.export import (
    ENCODED_ENTRY_POINTS,
    MANIFEST_FILE,
    export,
    input_shapes,
    load_predictor,
    script_predictor,
)
from model.features import FeatureProcessor

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def setup(tiny_cfg, examples):
    cfg = tiny_cfg(backbones=["cross", "attention"], experts={"kind": "mmoe"})
    proc = FeatureProcessor(cfg.dataset).fit([examples])
    torch.manual_seed(5)
    model = build_model(cfg).eval()
    return cfg, proc, model


def shared_users(examples, users=(0, 1, 2), per_user=(3, 2, 1)) -> tuple[pa.Table, np.ndarray]:
    """Rows of a few users' requests: each user's sequence and time, other candidates."""
    index = np.repeat(np.arange(len(users)), per_user)  # (n,) user of each row
    rows = examples.take(np.asarray(users)[index])
    others = examples.slice(100, len(index))
    for name in ("item_id", "category_id", "advertiser_id", "campaign_id", "price"):
        rows = rows.set_column(rows.schema.get_field_index(name), name, others[name])
    return rows, index


def test_encoded_forward_equals_forward_eager_and_scripted(setup, examples):
    cfg, proc, model = setup
    rows, index = shared_users(examples)
    batch = proc(rows)
    users = proc(examples.take([0, 1, 2]))
    with torch.no_grad():
        want = model(*batch.inputs())
        h = model.encode_user(users.seq_items, users.seq_types, users.seq_gaps, users.seq_mask)
        got = model.forward_encoded(
            batch.sparse, batch.multi, batch.dense, h, torch.from_numpy(index),
            batch.seq_gaps, batch.seq_mask, batch.task_type,
        )  # fmt: skip
    assert h.shape == (3, users.seq_mask.shape[1], cfg.model.embedding_dim)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)

    scripted = script_predictor(model, cfg)
    assert all(hasattr(scripted, m) for m in ENCODED_ENTRY_POINTS)
    probs = scripted(*batch.inputs())
    h_s = scripted.encode_user(users.seq_items, users.seq_types, users.seq_gaps, users.seq_mask)
    enc = scripted.forward_encoded(
        batch.sparse, batch.multi, batch.dense, h_s, torch.from_numpy(index),
        batch.seq_gaps, batch.seq_mask, batch.task_type,
    )  # fmt: skip
    for k in probs:
        torch.testing.assert_close(enc[k], probs[k], rtol=0, atol=1e-5)


def test_export_predicts_from_stored_encodings_as_from_raw_sequences(setup, examples, tmp_path):
    cfg, proc, model = setup
    out = export(tmp_path / "m", model, proc, cfg)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["entry_points"] == ["forward", *ENCODED_ENTRY_POINTS]
    length = cfg.dataset.features.sequence.max_len
    assert manifest["user_encoding"] == {"max_len": length, "dim": cfg.model.embedding_dim}
    p = load_predictor(out)
    assert p.supports_encoding and len(p.digest) == 12

    rows, index = shared_users(examples, users=(0, 1, 2, 3), per_user=(4, 1, 3, 2))
    want = p.predict(rows)
    h, mask = p.encode(examples.take([0, 1, 2, 3]))
    assert h.dtype == np.float32 and h.shape == (4, length, cfg.model.embedding_dim)
    assert mask.sum() > 0 and not mask.all()  # some real events, some padding
    # What the feature store keeps: the real events' rows only; padded again on use.
    stored = [h[u][mask[u]] for u in range(4)]
    again = np.zeros_like(h)
    for u, v in enumerate(stored):
        if len(v):
            again[u, -len(v) :] = v
    got = p.predict_encoded(rows, again, index)
    worst = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    assert worst < 1e-5, worst

    with pytest.raises(ValueError, match=r"user encodings must be \(U, 12, D\)"):
        p.predict_encoded(rows, again[:, :5], index)
    with pytest.raises(ValueError, match="user_index must be"):
        p.predict_encoded(rows, again, index + 3)


def test_exports_without_the_entry_points_say_so(setup, tmp_path, tiny_cfg, examples):
    cfg, proc, model = setup
    out = export(tmp_path / "old", model, proc, cfg)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    del manifest["user_encoding"]  # what an export from before the split looks like
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    p = load_predictor(out)
    assert not p.supports_encoding
    with pytest.raises(ValueError, match="no user-encoding entry points"):
        p.encode(examples.slice(0, 2))
    assert len(p.predict(examples.slice(0, 4))["click"]) == 4  # raw sequences still served

    no_seq = tiny_cfg(sequence={"enabled": False})
    m = build_model(no_seq).eval()
    p2 = load_predictor(
        export(tmp_path / "noseq", m, FeatureProcessor(no_seq.dataset).fit([examples]), no_seq)
    )
    assert p2.user_encoding is None and not p2.supports_encoding


class ShapeRecorder:
    """Stands in front of the TorchScript module and records, per entry point, the input
    shapes of every call: what one CUDA Graph would have been captured for."""

    def __init__(self, module):
        self.module = module
        self.calls: dict[str, list] = {}

    def __getattr__(self, entry):
        fn = getattr(self.module, entry)

        def record(*args):
            self.calls.setdefault(entry, []).append(input_shapes(args))
            return fn(*args)

        return record


def test_served_path_calls_the_model_with_bucketed_shapes_only(setup, examples, tmp_path):
    """CUDA Graphs replay fixed shapes: every encode_user / forward_encoded call of the
    served path (users padded to a power of two, rows to a shape bucket) has one of a few
    shapes, and the padding changes no score."""
    cfg, proc, model = setup
    p = load_predictor(export(tmp_path / "m", model, proc, cfg))
    p.shape_buckets = [8, 16]
    assert p.cuda_graphs_reason is not None  # CPU: the same calls, without graphs
    p.module = ShapeRecorder(p.module)
    for users, per_user in [((0,), (5,)), ((0, 1, 2), (2, 2, 3)), ((0, 1, 2, 3), (4, 1, 3, 2))]:
        rows, index = shared_users(examples, users=users, per_user=per_user)
        h, _ = p.encode(examples.take(list(users)))
        assert h.shape[0] == len(users)  # cut back after padding
        got = p.predict_encoded(rows, h, index)
        want = p.predict(rows)
        worst = max(float(np.abs(got[k] - want[k]).max()) for k in want)
        assert worst < 1e-5, (users, worst)
    user_rows = [shape[0][0][0] for shape in p.module.calls["encode_user"]]
    assert user_rows == [1, 4, 4]  # 1 user -> 1; 3 and 4 users -> 4
    encoded = [(s[0][0][0], s[3][0][0]) for s in p.module.calls["forward_encoded"]]
    assert encoded == [(8, 1), (8, 4), (16, 4)]  # (rows bucket, users bucket): 5, 7, 10 rows
    # the full shapes (every input, dtypes included) differ only where the buckets do
    assert len(set(p.module.calls["forward_encoded"])) == 3
    assert len(set(p.module.calls["encode_user"])) == 2


@pytest.mark.parametrize("precision, tolerance", [("bf16", 1e-2), ("fp16", 2e-3)])
def test_reduced_precision_served_path_matches_fp32(
    setup, examples, tmp_path, precision, tolerance
):
    """The exported fp16 / bf16 model on the served path (encode_user + forward_encoded,
    calibrated) against the fp32 export on the same rows. On this CPU both run (slowly);
    on a GPU they are the production precisions."""
    cfg, proc, model = setup
    fp32 = load_predictor(export(tmp_path / "fp32", model, proc, cfg))
    low = load_predictor(export(tmp_path / precision, model, proc, cfg, precision=precision))
    users = (0, 1, 2, 3)
    rows, index = shared_users(examples, users=users, per_user=(4, 1, 3, 2))
    want = fp32.predict_encoded(rows, fp32.encode(examples.take(list(users)))[0], index)
    h, _ = low.encode(examples.take(list(users)))
    assert h.dtype == np.float32  # encodings are stored and passed as fp32 whatever the model
    got = low.predict_encoded(rows, h, index)
    for k in want:
        assert np.isfinite(got[k]).all()
        assert float(np.abs(got[k] - want[k]).max()) < tolerance, (precision, k)
