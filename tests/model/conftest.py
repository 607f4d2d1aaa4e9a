"""Small seeded generator of unified-schema examples with planted signal, and tiny configs.

The signal: users and items have latent vectors; a user's current interest is the
recency-weighted (half-life ~2 h) mean of the latents of their recent events; click and the
sparse checkout depend on <user, item> + <interest, item> — interactions a logistic
regression on one-hot ids cannot represent, but the model's embeddings and
candidate-aware sequence attention can.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pyarrow as pa
import pytest
import torch

from model.config import (
    CategoricalFeature,
    DatasetConfig,
    FeatureSpec,
    ModelConfig,
    NumericFeature,
    SequenceSpec,
    UnirankConfig,
)
from model.schema import UNIFIED_SCHEMA, unified_table

TASK_TYPES = ["ads", "notifications", "related_items", "search", "category"]
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z


def _item_raw_id(idx: np.ndarray) -> np.ndarray:
    # Big, sparse raw ids, as in production: exercises the hashing.
    return 10**12 + idx.astype(np.int64) * 7919 + 1


def make_examples(
    n: int,
    seed: int = 0,
    num_users: int = 30,
    num_items: int = 40,
    max_seq: int = 24,
    world_seed: int = 1234,
    return_truth: bool = False,
):
    """n rows of the unified schema. ``world_seed`` fixes the latent world; ``seed`` the rows."""
    world = np.random.default_rng(world_seed)
    k = 4
    user_lat = world.normal(size=(num_users, k)) / np.sqrt(k) * 1.6
    item_lat = world.normal(size=(num_items, k)) / np.sqrt(k) * 1.6
    item_bias = world.normal(scale=0.3, size=num_items)
    item_cat = world.integers(1, 11, size=num_items)
    item_adv = world.integers(1, 21, size=num_items)
    item_price = np.exp(world.normal(3.0, 1.0, size=num_items)).astype(np.float32)
    adv_rel = world.uniform(0.2, 1.0, size=21).astype(np.float32)

    rng = np.random.default_rng(seed)
    users = rng.integers(0, num_users, size=n)
    items = rng.integers(0, num_items, size=n)
    ttype = rng.choice(len(TASK_TYPES), size=n, p=[0.5, 0.15, 0.15, 0.1, 0.1])
    event_time = T0 + rng.integers(0, 14 * 86400, size=n)

    # User sequences: newest last; gaps (age of each event) from minutes to days.
    lengths = rng.integers(0, max_seq + 1, size=n)
    total = int(lengths.sum())
    seq_items = rng.integers(0, num_items, size=total)
    ages = rng.exponential(6 * 3600.0, size=total)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    row_of = np.repeat(np.arange(n), lengths)
    # sort ages descending within a row so the newest (smallest age) is last
    order = np.lexsort((-ages, row_of))
    ages = ages[order]
    seq_ts = (event_time[row_of] - ages).astype(np.int64)
    seq_types = rng.integers(0, 5, size=total)

    # Recency-weighted interest: half-life 2 h.
    w = np.exp(-np.log(2) * ages / 7200.0)
    interest = np.zeros((n, k))
    np.add.at(interest, row_of, w[:, None] * item_lat[seq_items])
    norm = np.zeros(n)
    np.add.at(norm, row_of, w)
    interest /= np.maximum(norm, 1e-3)[:, None]

    u_i = (user_lat[users] * item_lat[items]).sum(1)
    r_i = (interest * item_lat[items]).sum(1)
    click_logit = -0.8 + 1.5 * u_i + 2.0 * r_i + item_bias[items] + 0.3 * (ttype == 0)
    click = rng.random(n) < 1 / (1 + np.exp(-click_logit))
    atc_logit = -2.5 + 1.5 * u_i + 2.0 * r_i
    atc = click & (rng.random(n) < 1 / (1 + np.exp(-atc_logit)))
    co_logit = -3.8 + 2.5 * u_i + 2.5 * r_i - 0.2 * np.log(item_price[items] + 1) + 0.5
    checkout = atc & (rng.random(n) < 1 / (1 + np.exp(-co_logit)))
    engage = rng.random(n) < 1 / (1 + np.exp(-(click_logit - 0.5)))

    ads = ttype == 0
    f32 = np.float32

    def label(y, observed):
        return pa.array(
            np.where(observed, y.astype(f32), np.nan), type=pa.float32(), from_pandas=True
        )

    seq_list = pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), pa.array(_item_raw_id(seq_items))
    )
    types_list = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(seq_types))
    ts_list = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(seq_ts))
    n_tok = np.where(ttype == 3, rng.integers(1, 5, size=n), 0)
    tok_off = np.concatenate([[0], np.cumsum(n_tok)]).astype(np.int32)
    tokens = pa.ListArray.from_arrays(
        pa.array(tok_off), pa.array(rng.integers(1, 500, size=int(n_tok.sum())))
    )
    rel = adv_rel[item_adv[items]]
    rel = np.where(rng.random(n) < 0.1, np.nan, rel)  # some nulls
    cols = {
        "task_type": pa.array(np.array(TASK_TYPES)[ttype]),
        "request_id": pa.array([f"r{i}" for i in range(n)]),
        "event_time": pa.array(event_time * 1_000_000, type=pa.int64()).cast(
            UNIFIED_SCHEMA.field("event_time").type
        ),
        "user_id": pa.array(users.astype(np.int64) + 1),
        "item_id": pa.array(_item_raw_id(items)),
        "advertiser_id": pa.array(np.where(ads, item_adv[items], 0).astype(np.int64)),
        "campaign_id": pa.array(np.where(ads, item_adv[items] * 3 + 1, 0).astype(np.int64)),
        "source_item_id": pa.array(
            np.where(ttype == 2, _item_raw_id(rng.integers(0, num_items, size=n)), 0)
        ),
        "category_id": pa.array(item_cat[items].astype(np.int64)),
        "query_tokens": tokens,
        "device": pa.array(rng.integers(0, 3, size=n)),
        "hour": pa.array(((event_time % 86400) // 3600).astype(np.int64)),
        "surface": pa.array(rng.integers(0, 4, size=n)),
        "price": pa.array(item_price[items]),
        "advertiser_reliability": pa.array(rel.astype(f32), from_pandas=True),
        "seq_item_ids": seq_list,
        "seq_event_types": types_list,
        "seq_timestamps": ts_list,
        "click": label(click, np.ones(n, bool)),
        "add_to_cart": label(atc, ads),
        "checkout": label(checkout, ads),
        "engage": label(engage, ~ads),
        "sample_weight": pa.array(np.ones(n, dtype=f32)),
    }
    table = unified_table(cols)
    if return_truth:
        return table, {
            "click_logit": click_logit,
            "checkout_logit": co_logit,
            "u_i": u_i,
            "r_i": r_i,
        }
    return table


def tiny_dataset_config(max_len: int = 12) -> DatasetConfig:
    cat = CategoricalFeature
    return DatasetConfig(
        features=FeatureSpec(
            categorical=[
                cat(name="user_id", hash_buckets=512),
                cat(name="item_id", hash_buckets=1024),
                cat(name="source_item_id", share_with="item_id"),
                cat(name="advertiser_id", hash_buckets=64),
                cat(name="campaign_id", hash_buckets=128),
                cat(name="category_id", hash_buckets=32),
                cat(name="query_tokens", hash_buckets=256, multi=True, max_len=4),
                cat(name="device", vocab_size=8),
                cat(name="hour", vocab_size=24),
                cat(name="surface", vocab_size=8),
            ],
            numeric=[
                NumericFeature(name="price", log1p=True),
                NumericFeature(name="advertiser_reliability"),
            ],
            sequence=SequenceSpec(max_len=max_len),
        )
    )


def tiny_config(**model: object) -> UnirankConfig:
    base = dict(embedding_dim=8, bottom_dims=[32, 16], tower_dims=[16], dropout=0.0)
    base.update(model)
    return UnirankConfig(dataset=tiny_dataset_config(), model=ModelConfig(**base))


@contextlib.contextmanager
def one_thread():
    """One intra-op thread: the suite's tensors are tiny, and on a shared 2-core machine a
    second spinning thread costs far more than it gains. Restored afterwards, so tests of
    other packages in the same session keep their setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    np.random.seed(0)
    with one_thread():
        yield


def train(
    cfg: UnirankConfig,
    table: pa.Table,
    epochs: int = 4,
    batch_size: int = 128,
    lr: float = 1e-2,
    seed: int = 0,
):
    """A minimal training loop (the real one lives in ray_jobs/): returns model, processor,
    per-step losses."""
    from model.ensemble import build_model, param_groups
    from model.features import FeatureProcessor
    from model.losses import MultiTaskLoss

    torch.manual_seed(seed)
    proc = FeatureProcessor(cfg.dataset).fit(table.to_batches(max_chunksize=1000))
    model = build_model(cfg)
    criterion = MultiTaskLoss.from_config(cfg)
    opt = torch.optim.Adam(param_groups(model, cfg.train.weight_decay), lr=lr)
    batches = [proc(table.slice(i, batch_size)) for i in range(0, table.num_rows, batch_size)]
    losses = []
    model.train()
    for _ in range(epochs):
        for b in batches:
            loss, _ = criterion(model(*b.inputs()), b)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return model.eval(), proc, losses


# Tests reach the helpers through fixtures (several conftest.py files exist under tests/, so
# "import conftest" would be ambiguous).
@pytest.fixture(scope="session")
def make_table():
    return make_examples


@pytest.fixture(scope="session")
def tiny_cfg():
    return tiny_config


@pytest.fixture(scope="session")
def train_fn():
    return train


@pytest.fixture(scope="session")
def examples() -> pa.Table:
    return make_examples(2000, seed=1)


@pytest.fixture(scope="session")
def trained():
    """One small trained model shared by the training / recency / calibration tests.

    Pinned to the architecture these tests were written for (no dot_interaction, the default
    since it won on generated logs): with the pairwise dots on, 4 epochs on 8k tiny rows
    learn the recency ordering more weakly (newest / oldest event effect 1.17 instead of
    > 1.5), which says more about this toy set than about the option."""
    cfg = tiny_config(dot_interaction=False)
    table = make_examples(8000, seed=2)
    with one_thread():
        model, proc, losses = train(cfg, table)
    return cfg, model, proc, losses
