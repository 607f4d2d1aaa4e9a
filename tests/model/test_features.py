"""The feature path: hashing, bucketing, sequences, labels, stats, input formats."""

import json
import pickle
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from model.batch import pad_batch, shape_bucket
from model.config import CategoricalFeature, DatasetConfig, FeatureSpec, SequenceSpec, TaskSpec
from model.features import FeatureProcessor, feature_layout, pad_lists
from model.hashing import hash_ids

pytestmark = pytest.mark.unit


def _assert_batches_equal(a, b):
    for name in ("sparse", "dense", "seq_items", "seq_types", "seq_gaps", "seq_mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("task_type", "labels", "label_mask", "weight"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.multi.keys() == b.multi.keys()
    for k in a.multi:
        assert torch.equal(a.multi[k], b.multi[k]), k


def test_hash_is_stable_in_range_and_keeps_zero():
    ids = np.array([0, 1, 2, 12345678901234, -5, 2**62], dtype=np.int64)
    h = hash_ids(ids, 100)
    # Pinned values: the hash is part of every trained model; changing it breaks them all.
    assert h.tolist()[:4] == [0, 90, 95, 2]
    big = np.random.default_rng(0).integers(-(2**63), 2**63 - 1, size=100_000)
    hb = hash_ids(big, 1000)
    assert hb.min() >= 1 and hb.max() < 1000
    assert np.array_equal(hb, hash_ids(big.copy(), 1000))
    # roughly uniform: every bucket used, none heavily overloaded
    counts = np.bincount(hb, minlength=1000)[1:]
    assert counts.min() > 40 and counts.max() < 180
    assert hash_ids(ids, 1).tolist() == [0] * len(ids)


def test_layout_shares_tables(tiny_cfg):
    lay = feature_layout(tiny_cfg().dataset)
    assert lay.table_of["source_item_id"] == "item_id"
    assert lay.seq_table == "item_id"
    assert "source_item_id" not in lay.table_rows
    assert lay.task_types[0] == "<unknown>"


def test_share_with_uses_the_same_bucketing(tiny_cfg, examples):
    proc = FeatureProcessor(tiny_cfg().dataset)
    t = examples.slice(0, 50)
    t = t.set_column(
        t.schema.get_field_index("source_item_id"), "source_item_id", t.column("item_id")
    )
    b = proc(t)
    names = proc.layout.sparse_names
    item = b.sparse[:, names.index("item_id")]
    assert torch.equal(item, b.sparse[:, names.index("source_item_id")])
    # the sequence items use the item table's hash too
    raw_newest = np.array([s[-1] for s in t.column("seq_item_ids").to_pylist() if len(s)])
    have = b.seq_mask[:, -1].numpy()
    expected = hash_ids(raw_newest, 1024)
    assert np.array_equal(b.seq_items[have, -1].numpy(), expected)


def test_vocab_clipping_and_missing_columns(tiny_cfg):
    proc = FeatureProcessor(tiny_cfg().dataset)
    b = proc({"hour": np.array([3, 23, 24, -1, 100]), "task_type": np.array(["ads"] * 5)})
    hour = b.sparse[:, proc.layout.sparse_names.index("hour")]
    assert hour.tolist() == [3, 23, 0, 0, 0]
    # every other feature is missing -> placeholder 0, empty sequences, masked labels
    assert b.sparse[:, proc.layout.sparse_names.index("user_id")].tolist() == [0] * 5
    assert not b.seq_mask.any() and not b.label_mask.any()
    assert b.weight.tolist() == [1.0] * 5
    assert b.seq_items.shape == (5, 12) and b.multi["query_tokens"].shape == (5, 4)


def test_unknown_task_type_is_reported(tiny_cfg):
    proc = FeatureProcessor(tiny_cfg().dataset)
    cols = {"task_type": np.array(["ads", "bogus", "search", "bogus", "zzz"], dtype=object)}
    assert proc.unknown_task_types(cols) == ["bogus", "zzz"]
    assert proc(cols).task_type.tolist() == [1, 0, 4, 0, 0]
    assert proc.unknown_task_types({"task_type": np.array(["ads"])}) == []
    assert proc.unknown_task_types(pa.table({"task_type": ["x", "ads"]})) == ["x"]


def test_null_labels_are_masked_and_weights_read(tiny_cfg):
    proc = FeatureProcessor(tiny_cfg().dataset)
    t = pa.table(
        {
            "click": pa.array([1.0, None, 0.0, float("nan")], type=pa.float32()),
            "sample_weight": pa.array([2.0, None, 1.0, 0.5], type=pa.float32()),
        }
    )
    b = proc(t)
    assert b.label_mask[:, 0].tolist() == [True, False, True, False]
    assert b.labels[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert b.weight.tolist() == [2.0, 1.0, 1.0, 0.5]
    assert not b.label_mask[:, 1:].any()  # columns absent -> all masked


def test_truncation_keeps_newest_left_padded():
    lists = [[1, 2, 3, 4, 5, 6], [7, 8], [], None]
    from model.features import _Reader

    vals, mask = pad_lists(_Reader({"s": lists}).lists("s"), 4, keep="newest")
    assert vals.tolist() == [[3, 4, 5, 6], [0, 0, 7, 8], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    first, fmask = pad_lists(_Reader({"s": lists}).lists("s"), 4, keep="first")
    assert first.tolist()[0] == [1, 2, 3, 4] and first.tolist()[1] == [7, 8, 0, 0]
    assert fmask.sum() == 6


def test_sequence_gaps_types_and_truncation(tiny_cfg):
    ds = tiny_cfg().dataset
    proc = FeatureProcessor(ds)
    now = 1_000_000
    n_events = 20  # > max_len 12
    ts = [now - 100 * (n_events - i) for i in range(n_events)]  # newest last
    ts[-1] = now + 50  # an event "after" event_time (clock skew): gap clipped to 0
    cols = {
        "event_time": np.array([now]),
        "seq_item_ids": [list(range(1, n_events + 1))],
        "seq_event_types": [[i % 3 for i in range(n_events)]],
        "seq_timestamps": [ts],
    }
    b = proc(cols)
    kept = list(range(n_events - 11, n_events + 1))  # the 12 newest ids
    assert np.array_equal(b.seq_items[0].numpy(), hash_ids(np.array(kept), 1024))
    assert b.seq_mask.all()
    assert b.seq_types[0].tolist() == [(i - 1) % 3 for i in kept]
    assert b.seq_gaps[0, -1].item() == 0.0
    assert b.seq_gaps[0, -2].item() == 200.0
    assert b.seq_gaps[0, 0].item() == 100.0 * 12
    # event_time as a timestamp gives the same gaps as int seconds
    cols_ts = dict(cols, event_time=np.array([now], dtype="datetime64[s]").astype("datetime64[us]"))
    assert torch.equal(proc(cols_ts).seq_gaps, b.seq_gaps)


def test_numpy_dict_and_arrow_give_identical_batches(tiny_cfg, examples):
    proc = FeatureProcessor(tiny_cfg().dataset).fit([examples])
    t = examples.slice(10, 300)
    from_arrow = proc(t)
    # Ray Data batch_format="numpy": list columns as object arrays of numpy arrays,
    # timestamps as datetime64, strings as object arrays.
    ray_like = {}
    for name in t.column_names:
        col = t.column(name)
        if pa.types.is_list(col.type):
            arr = np.empty(len(col), dtype=object)
            arr[:] = [np.asarray(v, dtype=np.int64) for v in col.to_pylist()]
            ray_like[name] = arr
        else:
            ray_like[name] = col.to_numpy()
    _assert_batches_equal(from_arrow, proc(ray_like))
    # A JSON request: plain lists, ISO timestamps, None for nulls.
    rows = t.to_pylist()
    json_like = {k: [r[k] for r in rows] for k in t.column_names}
    json_like["event_time"] = [r["event_time"].isoformat() for r in rows]
    _assert_batches_equal(from_arrow, proc(json_like))
    # Ray Data batch_format="pandas"
    _assert_batches_equal(from_arrow, proc(t.to_pandas()))
    # A sliced, multi-chunk arrow table
    chunked = pa.concat_tables([examples.slice(10, 100), examples.slice(110, 200)])
    _assert_batches_equal(from_arrow, proc(chunked))


def test_fit_streams_and_round_trips_json(tiny_cfg, examples):
    ds = tiny_cfg().dataset
    one = FeatureProcessor(ds).fit([examples])
    streamed = FeatureProcessor(ds).fit(examples.to_batches(max_chunksize=137))
    np.testing.assert_allclose(one.mean, streamed.mean, rtol=1e-10)
    np.testing.assert_allclose(one.std, streamed.std, rtol=1e-10)
    p = examples.column("price").to_numpy().astype(np.float64)
    price = np.sign(p) * np.log1p(np.abs(p))
    np.testing.assert_allclose(one.mean[0], price.mean(), rtol=1e-9)
    np.testing.assert_allclose(one.std[0], price.std(ddof=1), rtol=1e-9)
    rel = examples.column("advertiser_reliability").to_numpy(zero_copy_only=False)
    np.testing.assert_allclose(one.mean[1], np.nanmean(rel), rtol=1e-6)
    _assert_batches_equal(one(examples), pickle.loads(pickle.dumps(one))(examples))  # Ray ships it
    state = json.loads(json.dumps(one.state_dict()))
    back = FeatureProcessor.from_state_dict(ds, state)
    b1, b2 = one(examples), back(examples)
    assert torch.equal(b1.dense, b2.dense)
    d = b1.dense.numpy()
    assert abs(d[:, 0].mean()) < 1e-3 and abs(d[:, 0].std() - 1) < 1e-2
    null = np.isnan(rel)
    assert null.any() and (d[null, 1] == 0).all()  # nulls -> 0 after normalization


def test_state_dict_rejects_other_features(tiny_cfg):
    ds = tiny_cfg().dataset
    other = DatasetConfig(
        features=FeatureSpec(categorical=[CategoricalFeature(name="a", vocab_size=3)])
    )
    with pytest.raises(ValueError, match="numeric features"):
        FeatureProcessor.from_state_dict(other, FeatureProcessor(ds).state_dict())


def test_config_only_dataset_without_sequence():
    ds = DatasetConfig(
        features=FeatureSpec(
            categorical=[CategoricalFeature(name="user_id", hash_buckets=10)],
            sequence=None,
            weight_column=None,
        ),
        tasks=[TaskSpec(name="rating", loss="mse")],
    )
    b = FeatureProcessor(ds)({"user_id": np.array([5, 0]), "rating": np.array([4.0, np.nan])})
    assert b.seq_items.shape == (2, 0) and b.dense.shape == (2, 0)
    assert b.label_mask[:, 0].tolist() == [True, False]


def test_sequence_spec_without_timestamps(tiny_cfg):
    ds = tiny_cfg().dataset.model_copy(deep=True)
    ds.features.sequence = SequenceSpec(max_len=4, timestamp_column=None, event_type_column=None)
    b = FeatureProcessor(ds)({"seq_item_ids": [[1, 2, 3]]})
    assert b.seq_mask[0].tolist() == [False, True, True, True]
    assert (b.seq_gaps == 0).all() and (b.seq_types == 0).all()


def test_pad_batch_to_shape_bucket(tiny_cfg, examples):
    proc = FeatureProcessor(tiny_cfg().dataset)
    b = proc(examples.slice(0, 5))
    assert shape_bucket(5, [16, 64]) == 16 and shape_bucket(64, [16, 64]) == 64
    assert shape_bucket(65, [16, 64]) == 128
    p = pad_batch(b, 16)
    assert len(p) == 16 and p.multi["query_tokens"].shape == (16, 4)
    assert torch.equal(p.sparse[:5], b.sparse) and (p.sparse[5:] == 0).all()
    assert not p.seq_mask[5:].any() and not p.label_mask[5:].any() and (p.weight[5:] == 0).all()
    assert p.seq_mask.dtype == torch.bool


def test_processor_throughput_default_spec(make_table):
    """~100k rows/s on one core is the target; assert a margin-safe floor on a busy CI box."""
    from model.config import UnirankConfig

    t = make_table(20_000, seed=5)
    proc = FeatureProcessor(UnirankConfig().dataset).fit([t])
    proc(t.slice(0, 100))
    start = time.perf_counter()
    proc(t)
    rate = t.num_rows / (time.perf_counter() - start)
    assert rate > 20_000, f"{rate:.0f} rows/s"


def test_odd_inputs_nulls_and_fixed_size_lists(tiny_cfg):
    proc = FeatureProcessor(tiny_cfg().dataset)
    # JSON: int event_time with a null -> gaps measured from that row's newest event
    b = proc(
        {
            "event_time": [1000, None],
            "seq_item_ids": [[1, 2], [3, 4]],
            "seq_timestamps": [[900, 990], [100, 160]],
        }
    )
    assert b.seq_gaps[:, -2:].tolist() == [[100.0, 10.0], [60.0, 0.0]]
    # arrow fixed_size_list with a null row; null list in a JSON column
    fixed = pa.array([[1, 2], None, [3, 4]], type=pa.list_(pa.int64(), 2))
    a = proc(pa.table({"seq_item_ids": fixed}))
    assert a.seq_mask[:, -2:].tolist() == [[True, True], [False, False], [True, True]]
    j = proc({"seq_item_ids": [[1, 2], None, [3, 4]]})
    assert torch.equal(a.seq_items, j.seq_items)
    with pytest.raises(ValueError, match="rows"):
        proc({"user_id": np.arange(3), "item_id": np.arange(4)})
    with pytest.raises(TypeError, match="expected"):
        proc([1, 2, 3])


def test_string_ids_are_stable_across_processes_and_input_forms():
    """String categories (hex ids, 'Bachelors') hash the same in every process and whatever
    the column form: string, large_string, dictionary, numpy object; null and '' -> 0."""
    import subprocess
    import sys

    from model.hashing import string_id, string_ids

    values = ["a3f9", "Bachelors", None, "", "a3f9", "Ünïcode"]
    ids = string_ids(pa.array(values))
    assert ids[0] == ids[4] != 0 and ids[2] == ids[3] == 0 and len(set(ids[[0, 1, 5]])) == 3
    for arr in (
        pa.array(values, pa.large_string()),
        pa.array(values).dictionary_encode(),
        pa.chunked_array([pa.array(values[:2]), pa.array(values[2:])]),
    ):
        np.testing.assert_array_equal(string_ids(arr), ids)
    other = subprocess.run(
        [sys.executable, "-c", "from model.hashing import string_id; print(string_id('a3f9'))"],
        capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"},
        cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]),
    )  # fmt: skip
    assert int(other.stdout) == string_id("a3f9") == ids[0]


def test_string_categorical_columns_go_through_the_feature_path():
    """A table with string user ids and the same ids as a JSON-like dict give one Batch."""
    from model.config import load_config
    from model.features import FeatureProcessor

    cfg = load_config(None).dataset
    proc = FeatureProcessor(cfg)
    users = ["u-17", "u-9", None, "u-17"]
    table = pa.table({"user_id": pa.array(users, pa.large_string()), "item_id": [1, 2, 3, 4]})
    from_arrow = proc(table)
    from_dict = proc({"user_id": np.array(users, dtype=object), "item_id": np.arange(1, 5)})
    col = proc.layout.sparse_names.index("user_id")
    got = from_arrow.sparse[:, col].numpy()
    np.testing.assert_array_equal(got, from_dict.sparse[:, col].numpy())
    assert got[0] == got[3] != got[1] and got[2] == 0 and (got[[0, 1]] > 0).all()
