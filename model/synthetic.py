"""Synthetic raw logs with ground truth, in numpy: the world and one chunk of impressions.

It lives in ``model/`` because two sides use the same world: ``ray_jobs.generate`` writes
its logs, and ``serve_apps.simulate`` lets its users answer live ranked responses (the
closed loop of online experiments); neither imports the other.

The world (users, items, advertisers) is rebuilt from the seed in every task, so chunks are
generated independently and rows depend only on (seed, chunk id): the output is identical
whatever the number of Ray blocks.

Signal the model can find:
- a user's interest drifts linearly in time, so recent events in the user's sequence describe
  today's interest better than old ones (the sequence model with recency weighting wins);
- click depends on interest·item, plus per use-case context (source item, query, category);
- add_to_cart / checkout depend on the advertiser's base conversion rate, interest and price;
  they arrive hours to days after the click (lognormal delays).
Noise the label pipeline must handle: duplicate events, low match-confidence conversions and
noisy advertisers that report inflated (fabricated) conversions.

What the logs carry besides ids, as real platforms log it: item content (brand, price tier,
category, title words) and user profiles (declared interests, region, age band). Each is a
noisy view of the hidden item or user vector; the generate.*_noise knobs say how noisy. Labels
never read them: they only reveal what the hidden vectors already decide.
Cold start: generate.new_user_fraction / new_item_fraction of users and items arrive during
the last generate.cold_start_days, so the later splits hold users and items training never saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from model.config import GenerateConfig
from model.schema import (
    ADVERTISER_TRUTH_SCHEMA,
    EVENT_TYPES,
    EVENTS_SCHEMA,
    IMPRESSIONS_SCHEMA,
    TRUTH_SCHEMA,
)

HOUR = 3600
ALWAYS = -(2**62)  # arrival time of the users and items that exist before the logs start
DAY = 24 * HOUR
SURFACES = {"ads": 1, "notifications": 2, "related_items": 3, "search": 4, "category": 5}
TOKENS_PER_CATEGORY = 8
CANDIDATE_POOL = 8  # items compared when a user picks one (history) or retrieval picks one
TASK_TYPE_BIAS = {
    "ads": -3.0,
    "notifications": -2.5,
    "related_items": -1.6,
    "search": -1.2,
    "category": -1.8,
}  # click logit offset per use-case


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _zscore(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / max(float(x.std()), 1e-12)


def _quantile_bins(x: np.ndarray, k: int) -> np.ndarray:
    """1..k by the quantile of each value (equal shares)."""
    edges = np.quantile(x, np.linspace(0, 1, k + 1)[1:-1])
    return 1 + np.searchsorted(edges, x, side="right").astype(np.int64)


BLOCK = 32_768  # rows per step of the world's per-item / per-user views (bounded memory)


def _nearest(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest centre of each row of x, (n, D) x (K, D) -> (n,)."""
    sq = (centers**2).sum(1)[None, :]  # |x|^2 is the same for every centre of a row
    out = np.empty(len(x), dtype=np.int64)
    for lo in range(0, len(x), BLOCK):
        out[lo : lo + BLOCK] = (sq - 2.0 * (x[lo : lo + BLOCK] @ centers.T)).argmin(1)
    return out


def _title_words(rng, item_vec: np.ndarray, word_vec: np.ndarray, n_words: int) -> np.ndarray:
    """(I, n_words) words per item: each the best of 16 random words for the item vector, by
    dot product / 0.25 plus Gumbel noise (a soft argmax)."""
    out = np.zeros((len(item_vec), n_words), dtype=np.int64)
    for lo in range(0, len(item_vec), BLOCK):
        vec = item_vec[lo : lo + BLOCK]
        words = rng.integers(1, len(word_vec), size=(len(vec), n_words, 16))
        score = np.einsum("id,iwkd->iwk", vec, word_vec[words]) / 0.25  # (B, W, 16)
        best = (score + rng.gumbel(size=score.shape)).argmax(-1)
        out[lo : lo + BLOCK] = np.take_along_axis(words, best[..., None], -1)[..., 0]
    return out


def _noisy(rng, values: np.ndarray, noise: float, k: int) -> np.ndarray:
    """Each value replaced, with probability noise, by a uniform one of 1..k."""
    values = np.asarray(values, dtype=np.int64)
    swap = rng.random(values.shape) < noise
    return np.where(swap, rng.integers(1, k + 1, size=values.shape), values)


def _arrivals(rng, n: int, fraction: float, start: int, end: int, window: float) -> np.ndarray:
    """(n+1,) first time each id exists: ALWAYS (before the logs start), or for a `fraction` of
    ids 1..n a uniform time in the last `window` seconds before end."""
    arrival = np.full(n + 1, ALWAYS, dtype=np.int64)
    late = rng.choice(np.arange(1, n + 1), size=int(round(fraction * n)), replace=False)
    arrival[late] = end - window + rng.uniform(0, window, size=len(late)).astype(np.int64)
    return arrival


def start_epoch_s(cfg: GenerateConfig) -> int:
    dt = datetime.fromisoformat(cfg.start_time)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


@dataclass
class World:
    """Latent users, items and advertisers; index 0 of every id space is the placeholder."""

    cfg: GenerateConfig
    start: int
    user_vec: np.ndarray  # (U+1, D) interest at the start
    user_drift: np.ndarray  # (U+1, D) interest change per day
    user_weight: np.ndarray  # (U+1,) activity share
    item_vec: np.ndarray  # (I+1, D)
    item_category: np.ndarray  # (I+1,)
    item_price: np.ndarray  # (I+1,)
    item_advertiser: np.ndarray  # (I+1,)
    ad_items: np.ndarray  # item ids that belong to advertisers
    adv_cvr_logit: np.ndarray  # (A+1,) advertiser's base add_to_cart logit
    adv_noisy: np.ndarray  # (A+1,) bool
    category_tokens: np.ndarray  # (C+1, TOKENS_PER_CATEGORY)
    # What the logs show of items and users (index 0: the placeholder, 0 / empty).
    item_brand: np.ndarray  # (I+1,) 1..num_brands
    item_price_tier: np.ndarray  # (I+1,) 1..num_price_tiers
    item_category_logged: np.ndarray  # (I+1,) the category the catalogue lists
    item_title: np.ndarray  # (I+1, title_len) words of the query-token vocabulary
    user_interests: np.ndarray  # (U+1, declared_interests) category ids, 0-padded
    user_num_interests: np.ndarray  # (U+1,) how many the user declared (0 or all)
    user_region: np.ndarray  # (U+1,) 1..num_regions
    user_age_band: np.ndarray  # (U+1,) 1..num_age_bands
    # Cold start: when each user / item first exists (epoch seconds; ALWAYS for most).
    user_arrival: np.ndarray  # (U+1,)
    item_arrival: np.ndarray  # (I+1,)

    @classmethod
    def build(cls, cfg: GenerateConfig) -> World:
        rng = np.random.default_rng([cfg.seed, 0])
        d, nu, ni, nc, na = (
            cfg.latent_dim,
            cfg.num_users,
            cfg.num_items,
            cfg.num_categories,
            cfg.num_advertisers,
        )
        cat_center = rng.normal(size=(nc + 1, d)) / np.sqrt(d) * 1.5
        item_category = rng.integers(1, nc + 1, size=ni + 1)
        item_vec = cat_center[item_category] + rng.normal(size=(ni + 1, d)) / np.sqrt(d) * 0.7
        user_vec = rng.normal(size=(nu + 1, d)) / np.sqrt(d) * 1.5
        # Drift: over `days` the interest moves by interest_drift in a random direction.
        user_drift = rng.normal(size=(nu + 1, d)) / np.sqrt(d) * 1.5 * cfg.interest_drift / cfg.days
        user_weight = rng.pareto(1.5, size=nu + 1) + 1.0
        user_weight[0] = 0.0
        user_weight /= user_weight.sum()
        price_noise = rng.normal(0.0, 1.0, size=ni + 1)
        item_advertiser = np.zeros(ni + 1, dtype=np.int64)
        is_ad = rng.random(ni + 1) < 0.5
        is_ad[0] = False
        item_advertiser[is_ad] = rng.integers(1, na + 1, size=int(is_ad.sum()))
        ad_items = np.flatnonzero(is_ad)
        adv_cvr_logit = rng.normal(-3.0, 0.5, size=na + 1)
        n_noisy = int(round(cfg.noisy_advertiser_fraction * na))
        adv_noisy = np.zeros(na + 1, dtype=bool)
        if n_noisy:
            adv_noisy[rng.choice(np.arange(1, na + 1), size=n_noisy, replace=False)] = True
        category_tokens = rng.integers(
            1, cfg.num_query_tokens + 1, size=(nc + 1, TOKENS_PER_CATEGORY)
        )
        item_vec = item_vec.astype(np.float32)
        start = start_epoch_s(cfg)

        # ---- what the logs show: noisy views of the hidden vectors (their own random stream)
        rng = np.random.default_rng([cfg.seed, 2])
        # Price: lognormal(3, 1) as before, a share of its log from the "premium" direction.
        premium = _zscore(item_vec @ _unit(rng.normal(size=d)))
        item_price = np.exp(3.0 + 0.6 * premium + 0.8 * price_noise).astype(np.float32)
        tier = _quantile_bins(premium, cfg.num_price_tiers)
        brand_center = (
            cat_center[rng.integers(1, nc + 1, size=cfg.num_brands)]
            + rng.normal(size=(cfg.num_brands, d)) / np.sqrt(d) * 0.7
        )
        brand = 1 + _nearest(item_vec, brand_center)
        word_vec = rng.normal(size=(cfg.num_query_tokens + 1, d)) / np.sqrt(d) * 1.5
        word_vec = word_vec.astype(np.float32)
        title = _title_words(rng, item_vec, word_vec, max(cfg.title_len - 1, 0))
        region = 1 + _nearest(user_vec, rng.normal(size=(cfg.num_regions, d)) / np.sqrt(d) * 1.5)
        age = _quantile_bins(user_vec @ _unit(rng.normal(size=d)), cfg.num_age_bands)
        # Cold start: new users and items arrive uniformly during the last cold_start_days.
        end = start + cfg.days * DAY
        window = min(cfg.cold_start_days, cfg.days) * DAY
        user_arrival = _arrivals(rng, nu, cfg.new_user_fraction, start, end, window)
        item_arrival = _arrivals(rng, ni, cfg.new_item_fraction, start, end, window)
        # Declared interests: the categories the user's interest at sign-up likes most.
        signup_days = np.maximum(user_arrival - start, 0) / DAY
        signup = user_vec + user_drift * signup_days[:, None]
        k = min(cfg.declared_interests, nc)
        liked = np.argsort(-(signup @ cat_center[1:].T), axis=1, kind="stable")[:, :k] + 1
        filled = rng.random(nu + 1) < cfg.profile_fill_rate

        logged_category = _noisy(rng, item_category, cfg.item_category_noise, nc)
        first_word = category_tokens[
            logged_category, rng.integers(0, TOKENS_PER_CATEGORY, size=ni + 1)
        ][:, None]  # the title names the category the catalogue lists
        title = np.concatenate([first_word, title], 1)[:, : cfg.title_len]
        views = {
            "brand": _noisy(rng, brand, cfg.brand_noise, cfg.num_brands),
            "tier": _noisy(rng, tier, cfg.price_tier_noise, cfg.num_price_tiers),
            "category": logged_category,
            "title": _noisy(rng, title, cfg.title_noise, cfg.num_query_tokens),
            "interests": _noisy(rng, liked, cfg.declared_interests_noise, nc),
            "num_interests": np.where(filled, k, 0),
            "region": _noisy(rng, region, cfg.region_noise, cfg.num_regions),
            "age": _noisy(rng, age, cfg.age_band_noise, cfg.num_age_bands),
        }
        for arr in views.values():
            arr[0] = 0  # the placeholder user / item shows nothing
        return cls(
            cfg,
            start,
            user_vec,
            user_drift,
            user_weight,
            item_vec,
            item_category,
            item_price,
            item_advertiser,
            ad_items,
            adv_cvr_logit,
            adv_noisy,
            category_tokens,
            *views.values(),
            user_arrival,
            item_arrival,
        )

    def interest(self, users: np.ndarray, t: np.ndarray) -> np.ndarray:
        days = (t - self.start) / DAY
        return (self.user_vec[users] + self.user_drift[users] * days[..., None]).astype(np.float32)

    def pick_items(
        self,
        rng,
        interest: np.ndarray,
        pool: np.ndarray | None,
        temperature: float,
        candidates: int = CANDIDATE_POOL,
        t: np.ndarray | None = None,
    ):
        """Each row picks one of `candidates` random items, softly preferring its interest;
        with `t` (the rows' times), only among items that exist by then."""
        shape = interest.shape[:-1]
        if pool is None:
            cand = rng.integers(1, self.cfg.num_items + 1, size=(*shape, candidates))
        else:
            cand = pool[rng.integers(0, len(pool), size=(*shape, candidates))]
        if t is not None:
            cand = self.existing_items(rng, cand, np.asarray(t)[..., None], pool)
        score = np.einsum("...d,...kd->...k", interest, self.item_vec[cand]) / temperature
        score += rng.gumbel(size=score.shape)
        return np.take_along_axis(cand, score.argmax(-1)[..., None], -1)[..., 0]

    def existing_items(
        self, rng, items: np.ndarray, t: np.ndarray, pool: np.ndarray | None = None
    ) -> np.ndarray:
        """Items that do not exist yet at time t (broadcast) are replaced by random items that
        existed from the start (from `pool` when given)."""
        late = self.item_arrival[items] > t
        if not late.any():
            return items
        old = np.flatnonzero(self.item_arrival == ALWAYS)[1:]  # without the placeholder
        if pool is not None:
            old = np.intersect1d(pool, old)
        items = items.copy()
        items[late] = old[rng.integers(0, len(old), size=int(late.sum()))]
        return items

    def existing_users(self, rng, users: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Users who have not arrived by time t are replaced by users from the start, drawn by
        activity."""
        late = self.user_arrival[users] > t
        if not late.any():
            return users
        w = np.where(self.user_arrival == ALWAYS, self.user_weight, 0.0)
        users = users.copy()
        users[late] = rng.choice(len(w), size=int(late.sum()), p=w / w.sum())
        return users

    def probabilities(
        self,
        task_type: np.ndarray,  # (n,) use-case names
        affinity: np.ndarray,  # (n,) interest . item vector
        related: np.ndarray,  # (n,) source item . item vector (related_items, else 0)
        matches: np.ndarray,  # (n,) query / browsed category matches the item's category
        device: np.ndarray,
        hour: np.ndarray,
        advertiser: np.ndarray,  # (n,) 0 outside ads
        price: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The generator's true P(click), P(add_to_cart | click), P(checkout | add_to_cart)
        and P(engage | click). One definition: the generator draws labels from it and
        benchmarks score estimated affinities with it."""
        tt_bias = np.array([TASK_TYPE_BIAS.get(x, -2.0) for x in task_type])
        is_ads = task_type == "ads"
        ctx = 0.15 * (device == 1) - 0.1 * ((hour < 6) | (hour > 22))
        p_click = _sigmoid(tt_bias + 1.2 * affinity + 0.8 * related + matches + ctx)
        log_price = np.log(price) - 3.0
        p_atc_c = np.where(
            is_ads, _sigmoid(self.adv_cvr_logit[advertiser] + 0.8 * affinity - 0.3 * log_price), 0.0
        )
        p_co_a = np.where(is_ads, _sigmoid(-0.3 + 0.5 * affinity - 0.4 * log_price), 0.0)
        p_eng_c = np.where(is_ads, 0.0, _sigmoid(-0.5 + 1.0 * affinity + 0.5 * related))
        return p_click, p_atc_c, p_co_a, p_eng_c

    def sequence_interest(self, sequences: list[list[int]]) -> np.ndarray:
        """A user's interest as their logged sequence shows it: the mean true vector of its
        items (zeros for an empty sequence)."""
        zero = np.zeros(self.item_vec.shape[1], dtype=self.item_vec.dtype)
        return np.stack([self.item_vec[s].mean(0) if s else zero for s in sequences])

    def sequence_reference(self, impressions: pa.Table) -> np.ndarray:
        """P(checkout) by the generator's formula with the one hidden input, the user's
        interest, replaced by what the logs show: the mean true vector of the items in the
        user's sequence. What a model that had learned every item's vector perfectly and
        pooled the sequence by its mean could score. Needs the impressions' task_type,
        item_id, advertiser_id, device, hour, price and seq_item_ids; checkout exists on ads
        only, which have no source item or query, so those terms are 0."""
        interest = self.sequence_interest(impressions["seq_item_ids"].to_pylist())
        item = impressions["item_id"].to_numpy()
        none = np.zeros(len(item))
        p_click, p_atc, p_co, _ = self.probabilities(
            np.asarray(impressions["task_type"].to_pylist(), dtype=object),
            (interest * self.item_vec[item]).sum(1),
            none,
            none,
            impressions["device"].to_numpy(),
            impressions["hour"].to_numpy(),
            impressions["advertiser_id"].to_numpy(),
            impressions["price"].to_numpy(),
        )
        return p_click * p_atc * p_co

    def advertiser_table(self) -> pa.Table:
        ids = np.arange(1, self.cfg.num_advertisers + 1)
        return pa.table(
            {
                "advertiser_id": ids,
                "noisy": self.adv_noisy[ids],
                "base_cvr_logit": self.adv_cvr_logit[ids].astype(np.float32),
            },
            schema=ADVERTISER_TRUTH_SCHEMA,
        )


def _list_array(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.int64)))


def _ts(seconds: np.ndarray) -> pa.Array:
    return pa.array((np.asarray(seconds, dtype=np.int64) * 1_000_000), type=pa.int64()).cast(
        EVENTS_SCHEMA.field("event_time").type
    )


def chunk_bounds(cfg: GenerateConfig, chunk: int) -> tuple[int, int]:
    lo = chunk * cfg.rows_per_chunk
    return lo, min(lo + cfg.rows_per_chunk, cfg.num_impressions)


def num_chunks(cfg: GenerateConfig) -> int:
    return -(-cfg.num_impressions // cfg.rows_per_chunk)


def generate_chunk(world: World, chunk: int) -> dict[str, pa.Table]:
    """Impressions, events and truth for one chunk; depends only on (seed, chunk)."""
    cfg = world.cfg
    rng = np.random.default_rng([cfg.seed, 1, chunk])
    lo, hi = chunk_bounds(cfg, chunk)
    n = hi - lo
    imp_id = np.arange(lo, hi, dtype=np.int64)

    names = list(cfg.task_type_mix)
    shares = np.array([cfg.task_type_mix[k] for k in names], dtype=float)
    tt_idx = rng.choice(len(names), size=n, p=shares / shares.sum())
    task_type = np.array(names, dtype=object)[tt_idx]
    is_ads = task_type == "ads"

    t = world.start + rng.integers(0, cfg.days * DAY, size=n)
    users = rng.choice(len(world.user_weight), size=n, p=world.user_weight)
    users = world.existing_users(rng, users, t)  # a new user appears only once arrived
    now_interest = world.interest(users, t)  # (n, D)

    # ---- the user's prior events: newest last, gaps of hours to days, none before sign-up
    seq_len = rng.integers(0, cfg.max_seq_len + 1, size=n)
    gaps = rng.exponential(18 * HOUR, size=(n, cfg.max_seq_len))
    back = np.cumsum(gaps, axis=1)[:, ::-1]  # oldest first
    seq_t = (t[:, None] - back).astype(np.int64)  # (n, Lmax)
    keep = np.arange(cfg.max_seq_len)[None, :] >= (cfg.max_seq_len - seq_len)[:, None]
    keep &= seq_t >= world.user_arrival[users][:, None]
    seq_len = keep.sum(1)
    seq_t_flat = seq_t[keep]  # (sum(seq_len),) row-major: per row oldest .. newest
    seq_users = np.broadcast_to(users[:, None], keep.shape)[keep]
    seq_items_flat = world.pick_items(
        rng,
        world.interest(seq_users, seq_t_flat),
        None,
        cfg.history_temperature,
        cfg.history_candidates,
        t=seq_t_flat,
    )
    seq_types_flat = rng.choice([1, 2, 4, 5], size=len(seq_t_flat), p=[0.6, 0.1, 0.2, 0.1])
    ends = np.cumsum(seq_len) - 1

    # ---- candidate item, per use-case context
    relevant = rng.random(n) < 0.5
    item = np.where(
        relevant,
        world.pick_items(rng, now_interest, None, 0.5, t=t),
        world.existing_items(rng, rng.integers(1, cfg.num_items + 1, size=n), t),
    )
    if is_ads.any():
        ad_pick = world.pick_items(rng, now_interest[is_ads], world.ad_items, 1.0, t=t[is_ads])
        item[is_ads] = ad_pick
    advertiser = np.where(is_ads, world.item_advertiser[item], 0)
    campaign = np.where(
        is_ads, advertiser * cfg.campaigns_per_advertiser + (item % cfg.campaigns_per_advertiser), 0
    )
    category = world.item_category[item]
    last_item = np.where(
        seq_len > 0, seq_items_flat[np.maximum(ends, 0)] if len(seq_items_flat) else 0, 0
    )
    source_item = np.where(task_type == "related_items", last_item, 0)
    browse_cat = np.where(
        rng.random(n) < 0.7, category, rng.integers(1, cfg.num_categories + 1, size=n)
    )
    category_id = np.where(task_type == "category", browse_cat, 0)
    query_cat = np.where(
        rng.random(n) < 0.7, category, rng.integers(1, cfg.num_categories + 1, size=n)
    )
    is_search = task_type == "search"
    q_len = np.where(is_search, rng.integers(1, 4, size=n), 0)
    q_tok = world.category_tokens[
        query_cat[:, None], rng.integers(0, TOKENS_PER_CATEGORY, size=(n, 3))
    ]
    q_keep = np.arange(3)[None, :] < q_len[:, None]
    device = rng.integers(1, 5, size=n)
    hour = ((t % DAY) // HOUR).astype(np.int64)
    surface = np.array([SURFACES.get(x, 0) for x in names])[tt_idx]  # per name, not per row
    price = world.item_price[item]

    # ---- true probabilities
    affinity = np.einsum("nd,nd->n", now_interest, world.item_vec[item])
    related = np.where(
        source_item > 0,
        np.einsum("nd,nd->n", world.item_vec[source_item], world.item_vec[item]),
        0.0,
    )
    matches = np.where(is_search, (query_cat == category) * 1.0, 0.0) + np.where(
        task_type == "category", (browse_cat == category) * 0.8, 0.0
    )
    p_click, p_atc_c, p_co_a, p_eng_c = world.probabilities(
        task_type, affinity, related, matches, device, hour, advertiser, price
    )

    click = rng.random(n) < p_click
    atc = click & (rng.random(n) < p_atc_c)
    checkout = atc & (rng.random(n) < p_co_a)
    engage = click & (rng.random(n) < p_eng_c)

    click_t = t + rng.exponential(20, size=n).astype(np.int64) + 1
    atc_delay_h = rng.lognormal(cfg.atc_delay_log_mu, cfg.atc_delay_log_sigma, size=n)
    co_delay_h = atc_delay_h + rng.lognormal(
        cfg.checkout_delay_log_mu, cfg.checkout_delay_log_sigma, size=n
    )
    atc_t = click_t + (atc_delay_h * HOUR).astype(np.int64)
    co_t = click_t + (co_delay_h * HOUR).astype(np.int64)
    engage_t = click_t + rng.exponential(60, size=n).astype(np.int64) + 1

    # Match confidence: true conversions are mostly well matched; a few mismatches are low.
    def confidence(size):
        good = rng.beta(8, 2, size=size)
        bad = rng.beta(2, 6, size=size)
        return np.where(rng.random(size) < 0.9, good, bad)

    # Noisy advertisers fabricate conversions on clicked impressions that did not convert, at
    # (inflation - 1) times their true rate, and at least at that multiple of a typical rate, so
    # that an advertiser with a tiny true rate still reports an inflated one.
    noisy = is_ads & world.adv_noisy[advertiser]
    extra = cfg.noisy_inflation - 1.0
    typical_atc = 0.08
    fake_rate = np.clip(extra * np.maximum(p_atc_c, typical_atc), 0, 0.95)
    fake_atc = noisy & click & ~atc & (rng.random(n) < fake_rate)
    fake_co = noisy & click & ~checkout & (rng.random(n) < np.clip(fake_rate * p_co_a, 0, 0.95))

    ev_parts = []

    def add(mask, etype, when, conf):
        idx = np.flatnonzero(mask)
        code = EVENT_TYPES[etype]
        fake = 8 if conf is None else 0
        ev_parts.append(
            {
                "event_id": imp_id[idx] * 16 + code + fake,
                "impression_id": imp_id[idx],
                "task_type": task_type[idx],
                "event_type": np.full(len(idx), etype, dtype=object),
                "event_time": when[idx],
                "advertiser_id": advertiser[idx],
                "match_confidence": np.ones(len(idx))
                if conf == 1.0
                else confidence(len(idx))
                if conf is not None
                else rng.beta(4, 4, size=len(idx)),  # fabricated: hard to match to a user
            }
        )

    add(click, "click", click_t, 1.0)
    add(engage, "engage", engage_t, 1.0)
    add(atc, "add_to_cart", atc_t, 0.0)
    add(checkout, "checkout", co_t, 0.0)
    add(fake_atc, "add_to_cart", atc_t, None)
    add(fake_co, "checkout", co_t, None)
    ev = {k: np.concatenate([p[k] for p in ev_parts]) for k in ev_parts[0]}
    dup = rng.random(len(ev["event_id"])) < cfg.duplicate_event_rate
    ev = {k: np.concatenate([v, v[dup]]) for k, v in ev.items()}
    # Drawn before filtering, so a later export sees the same events plus the newer ones. The
    # export is taken at that instant: events strictly before it are logged, so with no extra
    # hours the newest logged time falls on the last generated day and prepare's day-aligned
    # split boundaries stay where generate.cold_start_days expects them.
    seen = ev["event_time"] < world.start + cfg.days * DAY + int(cfg.observe_hours_after_end * HOUR)
    ev = {k: v[seen] for k, v in ev.items()}
    order = np.lexsort((ev["event_id"], ev["event_time"]))
    ev = {k: v[order] for k, v in ev.items()}

    # ---- bad rows (for the label pipeline's quarantine), off by default
    user_out = users.astype(np.int64)
    user_null = np.zeros(n, dtype=bool)
    if cfg.bad_row_rate > 0:
        bad = rng.random(n) < cfg.bad_row_rate
        kind = rng.integers(0, 3, size=n)
        user_null = bad & (kind == 0)
        t = np.where(bad & (kind == 1), world.start + 400 * DAY * 50, t)  # far future
        task_type = np.where(bad & (kind == 2), "unknown_use_case", task_type)

    impressions = pa.table(
        {
            "impression_id": imp_id,
            "request_id": pa.compute.binary_join_element_wise(
                "r", pa.array(imp_id).cast(pa.string()), ""
            ),
            "task_type": pa.array(task_type.astype(str)),
            "event_time": _ts(t),
            "user_id": pa.array(user_out, mask=user_null),
            "item_id": item.astype(np.int64),
            "advertiser_id": advertiser.astype(np.int64),
            "campaign_id": campaign.astype(np.int64),
            "source_item_id": source_item.astype(np.int64),
            "category_id": category_id.astype(np.int64),
            "query_tokens": _list_array(q_tok[q_keep], q_len),
            "device": device.astype(np.int64),
            "hour": hour,
            "surface": surface.astype(np.int64),
            "price": price.astype(np.float32),
            # item content and user profile: what the catalogue and the sign-up form show
            "brand_id": world.item_brand[item],
            "price_tier": world.item_price_tier[item],
            "release_year_bucket": np.zeros(n, dtype=np.int64),  # not modelled here
            "title_tokens": _list_array(
                world.item_title[item].ravel(), np.full(n, world.item_title.shape[1])
            ),
            "item_categories": _list_array(world.item_category_logged[item], np.ones(n, int)),
            "region": world.user_region[users],
            "age_band": world.user_age_band[users],
            "declared_interests": _list_array(
                world.user_interests[users][
                    np.arange(world.user_interests.shape[1])[None, :]
                    < world.user_num_interests[users][:, None]
                ],
                world.user_num_interests[users],
            ),
            "seq_item_ids": _list_array(seq_items_flat, seq_len),
            "seq_event_types": _list_array(seq_types_flat, seq_len),
            "seq_timestamps": _list_array(seq_t_flat, seq_len),
        },
        schema=IMPRESSIONS_SCHEMA,
    )
    events = pa.table(
        {
            "event_id": ev["event_id"].astype(np.int64),
            "impression_id": ev["impression_id"].astype(np.int64),
            "task_type": pa.array(ev["task_type"].astype(str)),
            "event_type": pa.array(ev["event_type"].astype(str)),
            "event_time": _ts(ev["event_time"]),
            "advertiser_id": ev["advertiser_id"].astype(np.int64),
            "match_confidence": ev["match_confidence"].astype(np.float32),
        },
        schema=EVENTS_SCHEMA,
    )
    truth = pa.table(
        {
            "impression_id": imp_id,
            "task_type": pa.array(task_type.astype(str)),
            "advertiser_id": advertiser.astype(np.int64),
            "p_click": p_click.astype(np.float32),
            "p_add_to_cart": (p_click * p_atc_c).astype(np.float32),
            "p_checkout": (p_click * p_atc_c * p_co_a).astype(np.float32),
            "p_engage": (p_click * p_eng_c).astype(np.float32),
            "true_click": click,
            "true_add_to_cart": atc,
            "true_checkout": checkout,
            "true_engage": engage,
            "atc_delay_h": pa.array(atc_delay_h.astype(np.float32), mask=~atc),
            "checkout_delay_h": pa.array(co_delay_h.astype(np.float32), mask=~checkout),
            "cold_user": world.user_arrival[users] != ALWAYS,
            "cold_item": world.item_arrival[item] != ALWAYS,
        },
        schema=TRUTH_SCHEMA,
    )
    return {"impressions": impressions, "events": events, "truth": truth}
