"""The synthetic raw-log generator on a real Ray cluster, on local disk and on S3 (moto)."""

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from model.config import load_config
from model.schema import EVENTS_SCHEMA, IMPRESSIONS_SCHEMA
from model.storage import list_parquet
from ray_jobs.common import read_parquet
from ray_jobs.generate import generate, summarize

pytestmark = pytest.mark.integration

SMALL = [
    "generate.num_impressions=12000",
    "generate.rows_per_chunk=3000",
    "generate.num_users=400",
    "generate.num_items=1500",
    "generate.num_advertisers=40",
    "generate.days=5",
    # Export the logs a month after the last impression: every conversion has arrived.
    "generate.observe_hours_after_end=720",
]


def _cfg(out, *extra):
    return load_config(None, [*SMALL, f"generate.output={out}", *extra])


@pytest.fixture(scope="module")
def generated(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "raw"
    cfg = _cfg(out)
    counts = generate(cfg)
    return cfg, counts, out


def _read_all(cfg, part):
    return _to_table(read_parquet(f"{cfg.generate.output}/{part}", cfg.storage))


def _to_table(ds):
    import pyarrow as pa
    import ray

    return pa.concat_tables(ray.get(ds.to_arrow_refs()))


def test_writes_raw_logs_with_schema(generated):
    cfg, counts, out = generated
    assert counts["impressions"] == 12000 and counts["chunks"] == 4
    imps = _read_all(cfg, "impressions")
    events = _read_all(cfg, "events")
    assert imps.schema.equals(IMPRESSIONS_SCHEMA)
    assert events.schema.equals(EVENTS_SCHEMA)
    assert imps.num_rows == 12000
    assert set(imps.column("task_type").to_pylist()) == set(cfg.generate.task_type_mix)
    assert len(set(imps.column("impression_id").to_pylist())) == 12000
    # Ads rows carry advertiser ids; the others the placeholder.
    ads = imps.filter(pc.equal(imps["task_type"], "ads"))
    assert pc.min(ads["advertiser_id"]).as_py() >= 1
    other = imps.filter(pc.not_equal(imps["task_type"], "ads"))
    assert pc.max(other["advertiser_id"]).as_py() == 0


def test_same_seed_same_rows_whatever_the_blocks(ray_cluster, generated, tmp_path):
    cfg, _, _ = generated
    other = _cfg(tmp_path / "raw", "generate.num_blocks=1")
    generate(other)
    for part in ("impressions", "events", "truth/impressions"):
        a = _read_all(cfg, part).sort_by("impression_id" if part != "events" else "event_id")
        b = _read_all(other, part).sort_by("impression_id" if part != "events" else "event_id")
        assert a.equals(b), part
    different = _cfg(tmp_path / "raw2", "generate.seed=8", "generate.num_impressions=3000")
    generate(different)
    assert (
        not _read_all(different, "impressions")
        .column("item_id")
        .equals(_read_all(cfg, "impressions").slice(0, 3000).column("item_id"))
    )


def test_label_rates_match_truth(generated):
    cfg, _, _ = generated
    truth = _read_all(cfg, "truth/impressions").to_pandas()
    rates = truth.groupby("task_type")[["p_click", "true_click"]].mean()
    for tt, row in rates.iterrows():
        assert abs(row["true_click"] - row["p_click"]) < 0.04, tt
    ads = truth[truth.task_type == "ads"]
    assert 0.0 < ads.true_checkout.mean() < ads.true_add_to_cart.mean() < ads.true_click.mean()
    # Streaming use-cases have no conversions; ads no engage.
    assert truth[truth.task_type != "ads"].true_checkout.sum() == 0
    assert ads.true_engage.sum() == 0


def test_conversions_arrive_delayed(generated):
    cfg, _, _ = generated
    events = _read_all(cfg, "events").to_pandas().drop_duplicates("event_id")
    clicks = events[events.event_type == "click"].set_index("impression_id")["event_time"]
    for kind, min_median_h in (("add_to_cart", 1.0), ("checkout", 5.0)):
        conv = (
            events[events.event_type == kind].drop_duplicates("event_id").set_index("impression_id")
        )
        delay_h = (conv["event_time"] - clicks.reindex(conv.index)).dt.total_seconds() / 3600
        assert delay_h.notna().all(), f"{kind} without a click"
        assert (delay_h > 0).all()
        assert delay_h.median() > min_median_h, kind
        assert delay_h.quantile(0.9) > 24  # days, not seconds, for a real share


def test_noisy_advertisers_inflate_reported_conversions(generated):
    cfg, _, out = generated
    adv = pq.read_table(out / "truth" / "advertisers.parquet").to_pandas()
    assert adv.noisy.mean() == pytest.approx(cfg.generate.noisy_advertiser_fraction, abs=0.03)
    logged = _read_all(cfg, "events").to_pandas()
    assert logged.duplicated("event_id").any()  # duplicates are logged, prepare counts them once
    events = logged.drop_duplicates("event_id")
    truth = _read_all(cfg, "truth/impressions").to_pandas()
    reported = events[events.event_type == "add_to_cart"].groupby("advertiser_id").size()
    true = truth[truth.true_add_to_cart].groupby("advertiser_id").size()
    ratio = (reported / true.reindex(reported.index).fillna(0).clip(lower=1)).rename("ratio")
    merged = adv.set_index("advertiser_id").join(ratio).dropna()
    assert merged[merged.noisy].ratio.mean() > 1.8 * merged[~merged.noisy].ratio.mean()


def test_summary_reads_back_per_task_type(generated):
    cfg, _, _ = generated
    summary = summarize(cfg)
    assert summary["rows"] == 12000
    truth = _read_all(cfg, "truth/impressions").to_pandas()
    ads = summary["task_types"]["ads"]
    assert ads["label_rates"]["click"] == pytest.approx(
        truth[truth.task_type == "ads"].true_click.mean(), abs=1e-4
    )
    p = ads["seq_len_pctiles"]
    assert 0 < p["p50"] <= p["p90"] <= p["p99"] <= cfg.generate.max_seq_len


def test_round_trip_through_s3(ray_cluster, s3_bucket):
    bucket, storage = s3_bucket
    cfg = load_config(
        None,
        [*SMALL, "generate.num_impressions=4000", f"generate.output=s3://{bucket}/raw", *storage],
    )
    counts = generate(cfg)
    fs, files = list_parquet(f"s3://{bucket}/raw/impressions", cfg.storage)
    assert len(files) == counts["chunks"] == 2
    imps = _to_table(read_parquet(f"s3://{bucket}/raw/impressions", cfg.storage))
    assert imps.num_rows == 4000
    assert summarize(cfg)["rows"] == 4000
    ids = np.sort(imps.column("impression_id").to_numpy())
    assert (ids == np.arange(4000)).all()


SLOW = ["generate.interest_drift=0.2"]  # so that old history events still describe today


def _ads_chunk(*extra):
    """One in-process chunk (numpy, no Ray) and its world; ads rows only."""
    from model.synthetic import World, generate_chunk

    cfg = load_config(None, [*SMALL, "generate.rows_per_chunk=12000", *extra]).generate
    world = World.build(cfg)
    chunk = generate_chunk(world, 0)
    ads = pc.equal(chunk["impressions"]["task_type"], "ads")
    return world, chunk["impressions"].filter(ads), chunk["truth"].filter(ads)


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_sharper_history_reveals_interest_and_the_reference_follows_it():
    """history_candidates / history_temperature decide how much a user's sequence tells about
    their interest; World.sequence_reference (the benchmarks' yardstick) stays a probability and
    follows the truth better when it tells more. The defaults leave the logs unchanged."""
    world, default_imps, default_truth = _ads_chunk(*SLOW)
    _, same_imps, _ = _ads_chunk(
        *SLOW, "generate.history_candidates=8", "generate.history_temperature=0.5"
    )
    assert same_imps.equals(default_imps)  # the explicit defaults are the defaults
    _, sharp_imps, sharp_truth = _ads_chunk(
        *SLOW, "generate.history_candidates=64", "generate.history_temperature=0.1"
    )
    fit, ref_fit = {}, {}
    for name, imps, truth in (
        ("default", default_imps, default_truth),
        ("sharp", sharp_imps, sharp_truth),
    ):
        # the impression's true affinity: the user's interest at that time . the item
        users = imps["user_id"].to_numpy()
        t = pc.divide(imps["event_time"].cast("int64"), 1_000_000).to_numpy()
        item_vec = world.item_vec[imps["item_id"].to_numpy()]
        true_aff = (world.interest(users, t) * item_vec).sum(1)
        seen = world.sequence_interest(imps["seq_item_ids"].to_pylist())
        fit[name] = _spearman((seen * item_vec).sum(1), true_aff)
        ref = world.sequence_reference(imps)
        assert ref.shape == (len(imps),) and ((ref >= 0) & (ref <= 1)).all()
        ref_fit[name] = _spearman(ref, truth["p_checkout"].to_numpy())
    assert 0.3 < fit["default"] < fit["sharp"] - 0.05, fit
    assert ref_fit["default"] < ref_fit["sharp"], ref_fit


# --------------------------------------------------------------- content, profiles, cold start

ITEM_VIEWS = ("brand_id", "price_tier", "title_tokens", "item_categories")
USER_VIEWS = ("region", "age_band", "declared_interests")
NOISE_KNOBS = (
    "brand_noise",
    "price_tier_noise",
    "item_category_noise",
    "title_noise",
    "declared_interests_noise",
    "region_noise",
    "age_band_noise",
)


def _world(*extra):
    from model.synthetic import World

    return World.build(load_config(None, [*SMALL, *extra]).generate)


def _shared_cosine(vec, groups=None):
    """Mean cosine similarity of the pairs of rows that share a non-zero value of ``groups``
    ((n,) or (n, k) ids); over all pairs when groups is None. Near the all-pairs mean when the
    ids say nothing about the vectors; far above it when they group similar vectors."""
    u = vec / np.linalg.norm(vec, axis=1, keepdims=True)
    if groups is None:
        s = u.sum(0)
        return float((s @ s - len(u)) / (len(u) * (len(u) - 1)))
    g = np.asarray(groups).reshape(len(u), -1)
    rows, keys = np.repeat(np.arange(len(u)), g.shape[1]), g.ravel()
    rows, keys = rows[keys > 0], keys[keys > 0]
    _, inv = np.unique(keys, return_inverse=True)
    sums = np.zeros((inv.max() + 1, u.shape[1]))
    np.add.at(sums, inv, u[rows])
    m = np.bincount(inv).astype(float)
    return float(((sums * sums).sum(1) - m).sum() / (m * (m - 1)).sum())


def test_impressions_carry_item_content_and_user_profiles():
    """Every row logs its item's content and its user's profile, the same for every row of
    that item / user (a catalogue and a profile, not per-impression noise), and a chunk is a
    pure function of (seed, chunk id)."""
    from model.synthetic import generate_chunk

    world = _world()
    imps = generate_chunk(world, 1)["impressions"]
    assert imps.equals(generate_chunk(_world(), 1)["impressions"])  # a fresh world, same rows
    assert not imps.column("brand_id").equals(generate_chunk(world, 2)["impressions"]["brand_id"])
    df = imps.to_pandas()
    cfg = world.cfg
    for col in (*ITEM_VIEWS, *USER_VIEWS):
        assert imps.schema.field(col).type == IMPRESSIONS_SCHEMA.field(col).type, col
    assert df.brand_id.between(1, cfg.num_brands).all()
    assert df.price_tier.between(1, cfg.num_price_tiers).all()
    assert (df.title_tokens.map(len) == cfg.title_len).all()
    assert df.title_tokens.map(lambda t: ((t >= 1) & (t <= cfg.num_query_tokens)).all()).all()
    assert (df.item_categories.map(len) == 1).all()
    assert df.region.between(1, cfg.num_regions).all()
    assert df.age_band.between(1, cfg.num_age_bands).all()
    declared = df.declared_interests.map(len)
    assert set(declared) == {0, cfg.declared_interests}  # some users fill the form, some not
    assert 0.4 < (declared > 0).mean() < 0.8  # profile_fill_rate 0.6, by activity
    for key, cols in (("item_id", ITEM_VIEWS), ("user_id", USER_VIEWS)):
        for col in cols:
            per_id = df.groupby(key)[col].agg(lambda s: len({tuple(np.atleast_1d(v)) for v in s}))
            assert (per_id == 1).all(), (key, col)
    # The logged values are the world's views of the row's item and user.
    item, user = df.item_id.to_numpy(), df.user_id.to_numpy()
    assert (df.brand_id.to_numpy() == world.item_brand[item]).all()
    assert (np.stack(df.title_tokens.to_numpy()) == world.item_title[item]).all()
    assert (df.region.to_numpy() == world.user_region[user]).all()


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_noise_knobs_decide_how_much_the_features_reveal(noise):
    """At noise 0 items (users) that share a brand, tier, category or title word (a region,
    age band or declared interest) have similar hidden vectors; at noise 1 sharing one says
    nothing: their vectors are as similar as any two."""
    world = _world(*[f"generate.{k}={noise}" for k in NOISE_KNOBS])
    items, users = world.item_vec[1:], world.user_vec[1:]
    base = {"item": _shared_cosine(items), "user": _shared_cosine(users)}
    views = {
        "brand": ("item", world.item_brand),
        "price_tier": ("item", world.item_price_tier),
        "category": ("item", world.item_category_logged),
        "title": ("item", world.item_title),
        "declared_interests": ("user", world.user_interests),
        "region": ("user", world.user_region),
        "age_band": ("user", world.user_age_band),
    }
    for name, (kind, ids) in views.items():
        vec = items if kind == "item" else users
        lift = _shared_cosine(vec, ids[1:]) - base[kind]
        if noise == 0.0:
            assert lift > 0.08, (name, lift)
        else:
            assert abs(lift) < 0.03, (name, lift)


def test_cold_start_users_and_items_arrive_only_late():
    """new_user_fraction / new_item_fraction of ids exist only in the last cold_start_days:
    no impression, history event or history item of theirs before they arrive, and the truth
    flags them. With the fractions at 0 there are none."""
    from model.synthetic import DAY, generate_chunk

    days, window = 5, 2
    knobs = [
        f"generate.cold_start_days={window}",
        "generate.rows_per_chunk=6000",
        "generate.observe_hours_after_end=0",  # exported right at the end, like the demo
    ]
    world = _world(*knobs, "generate.new_user_fraction=0.2", "generate.new_item_fraction=0.2")
    chunk = generate_chunk(world, 0)
    df, truth = chunk["impressions"].to_pandas(), chunk["truth"].to_pandas()
    t = df.event_time.astype("int64").to_numpy() // 10**6
    late_from = world.start + (days - window) * DAY
    user, item = df.user_id.to_numpy(), df.item_id.to_numpy()
    cold_user, cold_item = truth.cold_user.to_numpy(), truth.cold_item.to_numpy()
    assert cold_user.sum() > 50 and cold_item.sum() > 50
    assert (t[cold_user | cold_item] >= late_from).all()
    assert (t[cold_user] >= world.user_arrival[user[cold_user]]).all()
    assert (t[cold_item] >= world.item_arrival[item[cold_item]]).all()
    assert not (cold_user | cold_item)[t < late_from].any()
    assert (cold_user == (world.user_arrival[user] >= late_from)).all()
    # Histories: a new user's events start after sign-up; no item is seen before it exists.
    for u, seq_t in zip(user[cold_user], df.seq_timestamps[cold_user], strict=True):
        assert (seq_t >= world.user_arrival[u]).all()
    seq_items = np.concatenate(df.seq_item_ids.to_numpy())
    seq_times = np.concatenate(df.seq_timestamps.to_numpy())
    assert (world.item_arrival[seq_items] <= seq_times).all()
    assert (world.item_arrival[seq_items] >= late_from).any()  # new items do enter histories
    # Logs end before the export instant, so prepare's last day is the last generated day and
    # its default boundaries (2 + 2 days) fall where the new users and items arrive.
    end_us = (world.start + days * DAY) * 10**6
    assert chunk["events"]["event_time"].cast("int64").to_numpy().max() < end_us
    none = generate_chunk(
        _world(*knobs, "generate.new_user_fraction=0", "generate.new_item_fraction=0"), 0
    )["truth"].to_pandas()
    assert not none.cold_user.any() and not none.cold_item.any()
