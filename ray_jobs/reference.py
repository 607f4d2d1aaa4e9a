"""The reference a ranker trained on the synthetic logs can reach: the generator's own formula
(``World.probabilities``) with every hidden input replaced by its best estimate from the
logged columns of the same rows.

The oracle scores the generator's true probabilities, which read each user's hidden interest
vector; no logged column carries it, so no model can reach the oracle. The reference is the
fair bar: what a model that had learned every item perfectly (its true vector, category and
advertiser) and read the rest from the row would score.

| formula input | oracle (hidden) | reference (from the logged row) |
|---|---|---|
| user interest | true interest at event_time | mean true vector of the items in ``seq_item_ids`` |
| source-item relatedness | true vectors | the same (``source_item_id`` is logged) |
| search match | query category == item category | every query token is one of the item category's tokens |
| category match | browsed category == item category | ``category_id`` == the item's category |
| device, hour, price, advertiser | logged | the same |

Scores are unconditional per impression, like the labels: click, add_to_cart = click x
P(atc | click), checkout = add_to_cart x P(checkout | atc), engage = click x P(engage | click).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from model.synthetic import World

# The logged columns the reference reads (all in the unified example).
COLUMNS = (
    "task_type", "item_id", "source_item_id", "category_id", "query_tokens", "device", "hour",
    "advertiser_id", "price", "seq_item_ids",
)  # fmt: skip


def _ints(table: pa.Table, name: str) -> np.ndarray:
    return table[name].fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def _query_matches(world: World, tokens: list[list[int] | None], category: np.ndarray):
    """1.0 where every query token is one of the item category's tokens (and there is one)."""
    vocab = world.category_tokens[category]  # (n, TOKENS_PER_CATEGORY)
    out = np.zeros(len(category))
    for i, q in enumerate(tokens):
        if q:
            out[i] = float(np.isin(q, vocab[i]).all())
    return out


def log_reference(world: World, rows: pa.Table) -> dict[str, np.ndarray]:
    """{task: reference probability} for every row of ``rows`` (unified-example columns)."""
    missing = [c for c in COLUMNS if c not in rows.column_names]
    if missing:
        raise ValueError(f"log_reference: rows lack the logged columns {missing}")
    task_type = np.asarray(rows["task_type"].to_pylist(), dtype=object)
    item = np.clip(_ints(rows, "item_id"), 0, world.cfg.num_items)
    source = np.clip(_ints(rows, "source_item_id"), 0, world.cfg.num_items)
    seqs = [
        [i for i in s if 0 < i <= world.cfg.num_items] if s else []
        for s in rows["seq_item_ids"].to_pylist()
    ]
    interest = world.sequence_interest(seqs)  # (n, D)
    vec = world.item_vec
    affinity = (interest * vec[item]).sum(1)
    related = np.where(source > 0, (vec[source] * vec[item]).sum(1), 0.0)
    item_cat = world.item_category[item]
    search = _query_matches(world, rows["query_tokens"].to_pylist(), item_cat)
    browse = (_ints(rows, "category_id") == item_cat) * 0.8
    matches = np.where(task_type == "search", search, 0.0) + np.where(
        task_type == "category", browse, 0.0
    )
    price = rows["price"].fill_null(1.0).to_numpy(zero_copy_only=False).astype(np.float64)
    advertiser = np.clip(_ints(rows, "advertiser_id"), 0, world.cfg.num_advertisers)
    p_click, p_atc, p_co, p_eng = world.probabilities(
        task_type, affinity, related, matches, _ints(rows, "device"), _ints(rows, "hour"),
        advertiser, np.maximum(price, 1e-6),
    )  # fmt: skip
    return {
        "click": p_click,
        "add_to_cart": p_click * p_atc,
        "checkout": p_click * p_atc * p_co,
        "engage": p_click * p_eng,
    }


def lift_share(model_auc: float | None, reference_auc: float | None) -> float | None:
    """The model's share of the reference's lift over chance: (AUC - 0.5) / (ref - 0.5)."""
    if model_auc is None or reference_auc is None or not np.isfinite(model_auc):
        return None
    if not np.isfinite(reference_auc) or reference_auc <= 0.5:
        return None
    return float((model_auc - 0.5) / (reference_auc - 0.5))
