"""The log reference (ray_jobs.reference) on generated chunks, in-process (no Ray): it ranks
within every use-case, stays below the oracle that reads the hidden interest, and agrees with
the generator's own formula where no input is hidden."""

import numpy as np
import pytest

from model.config import load_config
from model.metrics import auc
from model.synthetic import World, generate_chunk
from ray_jobs.reference import lift_share, log_reference

pytestmark = pytest.mark.unit

SMALL = [
    "generate.num_impressions=24000",
    "generate.rows_per_chunk=12000",
    "generate.num_users=500",
    "generate.num_items=2000",
    "generate.num_advertisers=40",
]


@pytest.fixture(scope="module")
def chunks():
    cfg = load_config(None, SMALL).generate
    world = World.build(cfg)
    parts = [generate_chunk(world, c) for c in range(2)]
    return world, parts


def test_reference_ranks_within_every_use_case_below_the_oracle(chunks):
    world, parts = chunks
    imps = [p["impressions"] for p in parts]
    truth = [p["truth"] for p in parts]
    ref = {t: np.concatenate([log_reference(world, x)[t] for x in imps]) for t in ("click",)}
    tt = np.concatenate([x["task_type"].to_numpy(zero_copy_only=False) for x in imps])
    y = np.concatenate([t["true_click"].to_numpy(zero_copy_only=False) for t in truth])
    oracle = np.concatenate([t["p_click"].to_numpy() for t in truth])
    for use_case in ("ads", "notifications", "related_items", "search", "category"):
        s = tt == use_case
        a_ref, a_oracle = auc(y[s], ref["click"][s]), auc(y[s], oracle[s])
        assert 0.55 < a_ref <= a_oracle + 0.01, (use_case, a_ref, a_oracle)


def test_reference_checkout_is_the_sequence_reference(chunks):
    world, parts = chunks
    imps = parts[0]["impressions"]
    ref = log_reference(world, imps)["checkout"]
    ads = imps["task_type"].to_numpy(zero_copy_only=False) == "ads"
    expected = world.sequence_reference(imps)
    np.testing.assert_allclose(ref[ads], expected[ads], rtol=1e-5)
    assert (ref[~ads] == 0).all()  # checkout is never observed outside ads


def test_reference_names_missing_columns_and_share_formula(chunks):
    world, parts = chunks
    with pytest.raises(ValueError, match="seq_item_ids"):
        log_reference(world, parts[0]["impressions"].drop_columns(["seq_item_ids"]))
    assert lift_share(0.7, 0.9) == pytest.approx(0.5)
    assert lift_share(0.7, 0.5) is None and lift_share(None, 0.8) is None
