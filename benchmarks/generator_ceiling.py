"""How much of the generator's oracle checkout AUC the logs can support, per generator setting.

    python benchmarks/generator_ceiling.py [--quick] [--impressions N] [section.field=value ...]

No model and no Ray: each variant generates N impressions in this process (numpy, the same
code as ray_jobs.generate) and scores the ads rows' true checkouts with two predictors:

* the oracle, the generator's true P(checkout), which knows each user's hidden interest;
* the sequence reference (``World.sequence_reference``), the same formula with that interest
  estimated from the user's logged sequence (the mean true vector of its items).

A trained model is bounded by roughly the reference, not the oracle. The variants turn the
knobs that decide how much a history reveals: history candidates and temperature, latent
dimensions, interest drift and sequence length. Extra overrides apply to every variant.
Prints one JSON line; ``reference_share`` is (reference - 0.5) / (oracle - 0.5), the share of
the oracle's lift over chance that the logs carry, and ``ratio_vs_default`` compares each
variant's share with the default world's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from benchmarks._util import emit  # noqa: E402
from model.config import load_config  # noqa: E402
from model.metrics import auc  # noqa: E402
from model.synthetic import World, generate_chunk, num_chunks  # noqa: E402

VARIANTS = {
    "default": [],
    "sharper_history": ["generate.history_candidates=32", "generate.history_temperature=0.25"],
    "near_noiseless_history": [
        "generate.history_candidates=128",
        "generate.history_temperature=0.05",
        "generate.interest_drift=0.2",
    ],
    "low_dim_slow_drift_long_history": [
        "generate.history_candidates=32",
        "generate.history_temperature=0.25",
        "generate.latent_dim=4",
        "generate.interest_drift=0.3",
        "generate.max_seq_len=64",
    ],
}


def ceiling(impressions: int, overrides: list[str]) -> dict:
    cfg = load_config(None, [f"generate.num_impressions={impressions}", *overrides]).generate
    world = World.build(cfg)
    chunks = [generate_chunk(world, c) for c in range(num_chunks(cfg))]
    imps = pa.concat_tables([c["impressions"] for c in chunks])
    truth = pa.concat_tables([c["truth"] for c in chunks])
    ads = pc.equal(imps["task_type"], "ads")
    imps, truth = imps.filter(ads), truth.filter(ads)
    y = truth["true_checkout"].to_numpy(zero_copy_only=False)
    ones = np.ones(len(y))
    oracle = auc(y, truth["p_checkout"].to_numpy(), ones)
    reference = auc(y, world.sequence_reference(imps), ones)
    return {
        "ads_rows": len(y),
        "checkouts": int(y.sum()),
        "auc_oracle": round(oracle, 4),
        "auc_sequence_reference": round(reference, 4),
        "reference_share": round((reference - 0.5) / (oracle - 0.5), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="10k impressions instead of 200k")
    p.add_argument("--impressions", type=int, default=None)
    p.add_argument("overrides", nargs="*", help="generate.* overrides for every variant")
    args = p.parse_args()
    impressions = args.impressions or (10_000 if args.quick else 200_000)
    t0 = time.perf_counter()
    out = {
        "benchmark": "generator_ceiling",
        "quick": args.quick,
        "impressions": impressions,
        "variants": {},
    }
    for name, variant in VARIANTS.items():
        out["variants"][name] = ceiling(impressions, [*variant, *args.overrides])
        out["variants"][name]["overrides"] = variant
    base = out["variants"]["default"]["reference_share"]
    for v in out["variants"].values():
        v["ratio_vs_default"] = round(v["reference_share"] / base, 4)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    emit(out)


if __name__ == "__main__":
    main()
