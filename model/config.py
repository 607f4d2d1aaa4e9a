"""The one typed config tree of unirank.

Every YAML file in ``configs/`` is an instance of :class:`UnirankConfig`. Any field can be
overridden on the command line as ``section.field=value`` (values are parsed as YAML scalars,
list items are addressed by index: ``dataset.tasks.0.weight=2``). A bad config fails here, at
load time, with the file and the dotted field path, never deep inside a Ray worker.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

TASK_TYPES_DEFAULT = ["ads", "notifications", "related_items", "search", "category"]


class ConfigError(ValueError):
    """A config that cannot be loaded: names the source and the dotted field path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- storage


class StorageConfig(_Strict):
    """Where data, checkpoints and artifacts live. Every location accepts a local path or s3://.

    Credentials default to the usual AWS environment variables; ``endpoint_url`` (or
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``) points at a non-AWS S3 such as MinIO or moto.
    """

    root: str = "out"
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None

    def resolved_endpoint(self) -> str | None:
        return (
            self.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )


# --------------------------------------------------------------------------- dataset / feature spec


class CategoricalFeature(_Strict):
    """An id or categorical column. Exactly one of vocab_size / hash_buckets, or share_with.

    ``vocab_size``: ids are in [0, vocab_size); out-of-range ids map to 0 (the placeholder).
    ``hash_buckets``: any int64 id is hashed into that many buckets (for huge id spaces).
    ``share_with``: use the embedding table of another feature (item_id / source_item_id).
    ``multi``: the column is list<int64> (e.g. query_tokens), mean-pooled.
    ``max_len``: for ``multi`` features, ids kept per row (the first ones), padded with 0 to
    this fixed width so batches have fixed shapes for TorchScript / CUDA Graphs.
    """

    name: str
    vocab_size: int | None = Field(default=None, gt=0)
    hash_buckets: int | None = Field(default=None, gt=0)
    share_with: str | None = None
    multi: bool = False
    max_len: int = Field(default=8, gt=0)

    @model_validator(mode="after")
    def _one_size(self) -> CategoricalFeature:
        given = [x is not None for x in (self.vocab_size, self.hash_buckets, self.share_with)]
        if sum(given) != 1:
            raise ValueError(
                f"feature {self.name!r}: set exactly one of vocab_size, hash_buckets, share_with"
            )
        return self


class NumericFeature(_Strict):
    """A numeric column, normalized with mean/std from the training split."""

    name: str
    log1p: bool = False


class SequenceSpec(_Strict):
    """The user's prior events, newest last. Item ids share the table of ``share_with``."""

    item_column: str = "seq_item_ids"
    event_type_column: str | None = "seq_event_types"
    timestamp_column: str | None = "seq_timestamps"
    share_with: str = "item_id"
    num_event_types: int = Field(default=8, gt=0)
    max_len: int = Field(default=32, gt=0)


class TaskSpec(_Strict):
    name: str
    label_column: str | None = None
    loss: Literal["bce", "mse"] = "bce"
    weight: float = Field(default=1.0, ge=0)

    @property
    def column(self) -> str:
        return self.label_column or self.name


class FeatureSpec(_Strict):
    categorical: list[CategoricalFeature] = Field(default_factory=list)
    numeric: list[NumericFeature] = Field(default_factory=list)
    sequence: SequenceSpec | None = None
    task_type_column: str | None = "task_type"
    time_column: str | None = "event_time"
    weight_column: str | None = "sample_weight"

    @model_validator(mode="after")
    def _shares_exist(self) -> FeatureSpec:
        names = {f.name for f in self.categorical}
        for f in self.categorical:
            if f.share_with is not None and f.share_with not in names:
                raise ValueError(
                    f"feature {f.name!r}: share_with {f.share_with!r} is not a feature"
                )
        if self.sequence is not None and self.sequence.share_with not in names:
            raise ValueError(
                f"sequence.share_with {self.sequence.share_with!r} is not a categorical feature"
            )
        return self


def default_feature_spec() -> FeatureSpec:
    """The feature spec of the unified example (synthetic ads + MovieLens use-cases)."""
    cat = CategoricalFeature
    return FeatureSpec(
        categorical=[
            cat(name="user_id", hash_buckets=100_000),
            cat(name="item_id", hash_buckets=100_000),
            cat(name="source_item_id", share_with="item_id"),
            cat(name="advertiser_id", hash_buckets=10_000),
            cat(name="campaign_id", hash_buckets=50_000),
            cat(name="category_id", hash_buckets=1_000),
            cat(name="query_tokens", hash_buckets=20_000, multi=True),
            cat(name="device", vocab_size=8),
            cat(name="hour", vocab_size=24),
            cat(name="surface", vocab_size=8),
            # item content: words share the query vocabulary, categories the category table
            cat(name="brand_id", hash_buckets=10_000),
            cat(name="price_tier", vocab_size=16),
            cat(name="release_year_bucket", vocab_size=64),
            cat(name="title_tokens", share_with="query_tokens", multi=True, max_len=8),
            cat(name="item_categories", share_with="category_id", multi=True, max_len=4),
            # user profile
            cat(name="declared_interests", share_with="category_id", multi=True, max_len=4),
            cat(name="region", hash_buckets=1_000),
            cat(name="age_band", vocab_size=16),
        ],
        numeric=[
            NumericFeature(name="price", log1p=True),
            NumericFeature(name="advertiser_reliability"),
        ],
        sequence=SequenceSpec(),
    )


def default_tasks() -> list[TaskSpec]:
    return [
        TaskSpec(name="click"),
        TaskSpec(name="add_to_cart"),
        TaskSpec(name="checkout"),
        TaskSpec(name="engage"),
    ]


class CatalogueSpec(_Strict):
    """Which columns the candidate retrieval index (model.retrieval_index, built by
    ray_jobs.export from the train split) is made of.

    ``item_column``: the item id. ``item_features``: scalar columns that describe an item and
    that serving fills in for retrieved candidates; the index keeps them per item and per
    task_type, as training saw them. ``popularity_label``: the label column whose positives
    rank items by popularity (default: the first task's label column). The task_type, time and
    sequence columns come from ``features``; clicked related-item pairs (``source_item_id``)
    and the search index (``query_tokens``) use those unified columns when the data has them.
    A column the dataset lacks leaves its part of the index out, named in the index's
    metadata, instead of failing the export.
    """

    item_column: str = "item_id"
    item_features: list[str] = Field(
        default_factory=lambda: [
            "category_id",
            "advertiser_id",
            "campaign_id",
            "price",
            "advertiser_reliability",
            # item content (model.schema.ITEM_CONTENT_COLUMNS)
            "brand_id",
            "price_tier",
            "release_year_bucket",
        ]
    )
    # list<int> item content, kept per item when the feature spec reads it
    item_lists: list[str] = Field(default_factory=lambda: ["title_tokens", "item_categories"])
    popularity_label: str | None = None


class ProfileSpec(_Strict):
    """Which columns the user-profile table (model.user_profiles, written by ray_jobs.export
    next to the retrieval index) keeps per user: each user's newest training row. Columns the
    feature spec does not read, or the data lacks, are left out (named in its metadata)."""

    user_column: str = "user_id"
    features: list[str] = Field(default_factory=lambda: ["region", "age_band"])
    lists: list[str] = Field(default_factory=lambda: ["declared_interests"])


class DatasetConfig(_Strict):
    """A dataset: where its splits are and what its columns mean.

    Locations are a file, a directory or a glob; local paths or s3:// URIs.
    """

    name: str = "synthetic_ads"
    source: Literal["synthetic", "movielens", "parquet"] = "synthetic"
    train: list[str] = Field(default_factory=list)
    validation: list[str] = Field(default_factory=list)
    test: list[str] = Field(default_factory=list)
    task_types: list[str] = Field(default_factory=lambda: list(TASK_TYPES_DEFAULT))
    features: FeatureSpec = Field(default_factory=default_feature_spec)
    tasks: list[TaskSpec] = Field(default_factory=default_tasks)
    catalogue: CatalogueSpec = Field(default_factory=CatalogueSpec)
    profiles: ProfileSpec = Field(default_factory=ProfileSpec)

    @model_validator(mode="after")
    def _unique_tasks(self) -> DatasetConfig:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        return self


# --------------------------------------------------------------------------- jobs


class GenerateConfig(_Strict):
    """Synthetic raw logs (ray_jobs.generate). Deterministic for a seed, whatever the blocks."""

    output: str = "out/raw"
    seed: int = 7
    num_impressions: int = Field(default=200_000, gt=0)
    rows_per_chunk: int = Field(default=20_000, gt=0)
    num_users: int = Field(default=5_000, gt=0)
    num_items: int = Field(default=20_000, gt=0)
    num_categories: int = Field(default=50, gt=0)
    num_advertisers: int = Field(default=200, gt=0)
    campaigns_per_advertiser: int = Field(default=3, gt=0)
    num_query_tokens: int = Field(default=2_000, gt=0)
    task_type_mix: dict[str, float] = Field(
        default_factory=lambda: {
            "ads": 0.5,
            "notifications": 0.15,
            "related_items": 0.15,
            "search": 0.1,
            "category": 0.1,
        }
    )
    start_time: str = "2026-01-01T00:00:00"
    days: int = Field(default=14, gt=0)
    # Logs are exported this many hours after the last impression: later events are not yet
    # observed (their conversions are still to come). Re-export later to see them.
    observe_hours_after_end: float = Field(default=0.0, ge=0)
    max_seq_len: int = Field(default=32, gt=0)
    # A history event is the user's pick among this many random items, by interest / this
    # temperature plus Gumbel noise: more candidates and a lower temperature make histories
    # reveal the user's interest more clearly.
    history_candidates: int = Field(default=8, gt=0)
    history_temperature: float = Field(default=0.5, gt=0)
    latent_dim: int = Field(default=8, gt=0)
    interest_drift: float = Field(default=1.0, ge=0)
    # conversion delays, lognormal in hours: median exp(mu)
    atc_delay_log_mu: float = 2.0
    atc_delay_log_sigma: float = 1.3
    checkout_delay_log_mu: float = 2.5
    checkout_delay_log_sigma: float = 1.2
    # What the logs carry besides ids: each feature is a noisy view of the hidden item or user
    # vector. A *_noise knob is the probability that a value is replaced by a random one: 0
    # logs the view exactly, 1 makes it uninformative.
    # Items: brand (the nearest of num_brands brand centres in the latent space), price tier
    # (quantile of the item's position on a "premium" direction, which also moves its price),
    # category (the cluster the item was drawn around) and title tokens (words picked by the
    # item vector from the query-token vocabulary; the first names the category).
    num_brands: int = Field(default=400, gt=0)
    brand_noise: float = Field(default=0.2, ge=0, le=1)
    num_price_tiers: int = Field(default=5, gt=0)
    price_tier_noise: float = Field(default=0.1, ge=0, le=1)
    item_category_noise: float = Field(default=0.05, ge=0, le=1)
    title_len: int = Field(default=4, ge=0)
    title_noise: float = Field(default=0.3, ge=0, le=1)
    # Users: declared interests (the categories nearest to the user's interest at sign-up, as
    # a few ids; only profile_fill_rate of users fill them in), region (the nearest of
    # num_regions region centres) and age band (quantile on an "age" direction).
    declared_interests: int = Field(default=3, ge=0)
    declared_interests_noise: float = Field(default=0.3, ge=0, le=1)
    profile_fill_rate: float = Field(default=0.6, ge=0, le=1)
    num_regions: int = Field(default=20, gt=0)
    region_noise: float = Field(default=0.5, ge=0, le=1)
    num_age_bands: int = Field(default=6, gt=0)
    age_band_noise: float = Field(default=0.5, ge=0, le=1)
    # Cold start: these shares of users and items arrive during the last cold_start_days of
    # the logs (after prepare's train/validation boundary with its default split sizes), so
    # the validation and test splits hold users and items that training never saw. They have
    # no events before they arrive.
    new_user_fraction: float = Field(default=0.1, ge=0, le=1)
    new_item_fraction: float = Field(default=0.1, ge=0, le=1)
    cold_start_days: float = Field(default=4.0, ge=0)
    noisy_advertiser_fraction: float = Field(default=0.1, ge=0, le=1)
    noisy_inflation: float = Field(default=4.0, ge=1)
    duplicate_event_rate: float = Field(default=0.01, ge=0, le=1)
    bad_row_rate: float = Field(default=0.0, ge=0, le=1)
    num_blocks: int | None = None

    @model_validator(mode="after")
    def _mix(self) -> GenerateConfig:
        if not self.task_type_mix or any(v < 0 for v in self.task_type_mix.values()):
            raise ValueError("task_type_mix needs non-negative shares")
        if sum(self.task_type_mix.values()) <= 0:
            raise ValueError("task_type_mix shares must sum to > 0")
        return self


class MovieLensConfig(_Strict):
    """The MovieLens builder (ray_jobs.movielens)."""

    source: str = "data/ml-latest-small"
    output: str = "out/movielens"
    seed: int = 11
    negatives_per_positive: int = Field(default=2, ge=1)
    related_window_s: int = Field(default=3600 * 24, gt=0)
    max_seq_len: int = Field(default=32, gt=0)
    validation_fraction: float = Field(default=0.1, gt=0, lt=1)
    test_fraction: float = Field(default=0.1, gt=0, lt=1)
    engage_threshold: float = 4.0


class PrepareConfig(_Strict):
    """The label pipeline (ray_jobs.prepare)."""

    input: str = "out/raw"
    output: str = "out/prepared"
    attribution_window_hours: dict[str, float] = Field(
        default_factory=lambda: {"add_to_cart": 72.0, "checkout": 168.0}
    )
    cutoff_time: str | None = None
    min_match_confidence: float = Field(default=0.5, ge=0, le=1)
    low_confidence_action: Literal["drop", "downweight"] = "drop"
    low_confidence_weight: float = Field(default=0.5, ge=0, le=1)
    outlier_z_threshold: float = Field(default=3.5, gt=0)
    outlier_prior_strength: float = Field(default=200.0, ge=0)
    outlier_action: Literal["drop", "downweight", "none"] = "downweight"
    outlier_weight: float = Field(default=0.1, ge=0, le=1)
    negative_rate: float = Field(default=0.5, gt=0, le=1)
    sparse_tasks: list[str] = Field(default_factory=lambda: ["add_to_cart", "checkout"])
    task_type_mix: dict[str, float] | None = None
    max_bad_fraction: float = Field(default=0.05, ge=0, le=1)
    # Rows older than this are impossible for these logs (quarantined as timestamp_too_old).
    min_event_time: str = "1995-01-01T00:00:00"
    validation_days: float = Field(default=2.0, ge=0)
    test_days: float = Field(default=2.0, ge=0)
    seed: int = 13


class EmbeddingGroup(_Strict):
    dim: int = Field(default=16, gt=0)


class SequenceEncoderConfig(_Strict):
    enabled: bool = True
    num_layers: int = Field(default=1, ge=1)
    num_heads: int = Field(default=2, ge=1)
    time_buckets: int = Field(default=16, ge=2)
    recency_bias: bool = True
    candidate_attention: bool = True


class CrossConfig(_Strict):
    num_layers: int = Field(default=2, ge=1)
    low_rank: int | None = Field(default=None, gt=0)


class AttentionInteractionConfig(_Strict):
    num_layers: int = Field(default=1, ge=1)
    num_heads: int = Field(default=2, ge=1)


class MaskNetConfig(_Strict):
    num_blocks: int = Field(default=2, ge=1)
    reduction: float = Field(default=2.0, gt=0)


class ExpertsConfig(_Strict):
    kind: Literal["none", "mmoe", "ple"] = "none"
    num_experts: int = Field(default=3, ge=1)
    num_shared: int = Field(default=1, ge=0)
    hidden: int = Field(default=64, gt=0)


class ModelConfig(_Strict):
    embedding_dim: int = Field(default=16, gt=0)
    bottom_dims: list[int] = Field(default_factory=lambda: [128, 64])
    sequence: SequenceEncoderConfig = Field(default_factory=SequenceEncoderConfig)
    backbones: list[Literal["cross", "attention", "masknet"]] = Field(
        default_factory=lambda: ["cross", "attention"]
    )
    cross: CrossConfig = Field(default_factory=CrossConfig)
    attention: AttentionInteractionConfig = Field(default_factory=AttentionInteractionConfig)
    masknet: MaskNetConfig = Field(default_factory=MaskNetConfig)
    fusion: Literal["average", "gating", "blend"] = "gating"
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig)
    tower_dims: list[int] = Field(default_factory=lambda: [32])
    # DLRM-style explicit interactions: the pairwise dot products of all field embeddings
    # (K*(K-1)/2 values) join the flat input of the bottom MLP, cross and MaskNet backbones.
    # A dot product is hard for an MLP to learn; user . candidate affinity, query . title and
    # source item . candidate (shared tables) are. On by default: at 200k impressions over 3
    # seeds it raised every task x task_type test AUC (objective 0.664 +- 0.004 -> 0.677 +-
    # 0.005, docs/training.md "Model quality").
    dot_interaction: bool = True
    dropout: float = Field(default=0.1, ge=0, lt=1)
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"

    @model_validator(mode="after")
    def _some_backbone(self) -> ModelConfig:
        if not self.backbones:
            raise ValueError("backbones: at least one of cross, attention, masknet")
        if len(set(self.backbones)) != len(self.backbones):
            raise ValueError(f"backbones must not repeat, got {self.backbones}")
        return self


class TrainConfig(_Strict):
    run_name: str = "unirank"
    storage_path: str = "out/runs"
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    batch_size: int = Field(default=1024, gt=0)
    epochs: int = Field(default=3, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    embedding_lr: float | None = Field(default=None, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0)
    # AdamW's decoupled decay on the id embedding tables (every row, every step); 0 = none.
    embedding_weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float | None = Field(default=5.0, gt=0)
    lr_schedule: Literal["constant", "cosine", "linear_warmup"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    patience: int = Field(default=2, ge=1)
    # The objective of early stopping, the search and the champion rule: a weighted mean of
    # ranking quality *within* each use-case, over task x task_type cells (model.metrics.
    # within_use_case_objective). objective: task -> weight; objective_task_types:
    # task_type -> weight (empty = every task_type weighs 1); objective_metric: AUC within
    # the task_type, or grouped AUC (per user within the task_type: noisier on small data).
    objective: dict[str, float] = Field(default_factory=lambda: {"click": 1.0})
    objective_task_types: dict[str, float] = Field(default_factory=dict)
    objective_metric: Literal["auc", "gauc"] = "auc"
    amp: bool = True
    max_failures: int = Field(default=1, ge=0)
    init_from: str | None = None
    max_steps_per_epoch: int | None = Field(default=None, gt=0)
    # Per epoch, the train split's files are read in a new random order (streaming, unlike a
    # block shuffle that materializes the split first); rows are then mixed in a local buffer
    # of this many rows on each worker (0: off).
    shuffle_files: bool = True
    shuffle_buffer_rows: int = Field(default=0, ge=0)
    prefetch_batches: int = Field(default=4, ge=0)
    # Keep the train / validation splits in Ray's object store after the first read, so an
    # epoch starts without re-reading parquet: "auto" when they fit in a share of the store.
    cache_datasets: bool | Literal["auto"] = "auto"
    seed: int = 17
    # Same data, config and seed -> the same weights and metrics, bit for bit, on one worker:
    # Ray Data keeps block order (reads, cache, ingest) and torch uses deterministic kernels.
    # Costs some input throughput; with several workers, which worker gets which block still
    # follows their pace.
    deterministic: bool = False


class EvaluateConfig(_Strict):
    """Offline evaluation (ray_jobs.evaluate) and the champion rule (ray_jobs.export)."""

    split: Literal["test", "validation"] = "test"
    calibration: Literal["isotonic", "platt", "none"] = "isotonic"
    per_task_type_calibration: bool = True
    bootstrap: int = Field(default=200, ge=0)
    # Rows are grouped by this categorical feature for grouped AUC (per user within each
    # task_type); None, or a feature the dataset does not have, skips grouped AUC.
    group_by: str | None = "user_id"
    baseline_tasks: list[str] | None = None  # None: every task gets a single-task baseline
    output: str | None = None  # default: <train.storage_path>/<train.run_name>/eval
    seed: int = 23


class MlflowConfig(_Strict):
    tracking_uri: str = "sqlite:///out/mlflow.db"
    experiment: str = "unirank"
    registered_model: str = "unirank"
    champion_alias: str = "champion"


class TuneConfig(_Strict):
    num_samples: int = Field(default=4, ge=1)
    max_concurrent_trials: int = Field(default=1, ge=1)
    search_alg: Literal["random", "grid", "optuna"] = "random"
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(default=1, ge=1)
    reduction_factor: int = Field(default=2, ge=2)
    trial_driver_cpus: float = Field(default=0.1, gt=0)
    space: dict[str, Any] = Field(default_factory=dict)
    storage_path: str = "out/tune"
    name: str = "unirank_search"


EXPERIMENT_METRICS = ("ctr", "add_to_cart_rate", "checkout_rate", "engage_rate")


class ArmConfig(_Strict):
    """One arm of an online experiment: a model (a registry URI or version, e.g.
    ``models:/unirank/7``; None = the use-case's ``serve.model_uri``) or the non-personalized
    ``popularity`` policy (a holdout), and its share of users."""

    name: str = Field(pattern=r"^[a-z0-9_-]{1,32}$")
    share: float = Field(ge=0, le=1, allow_inf_nan=False)
    policy: Literal["model", "popularity"] = "model"
    model_uri: str | None = None

    @model_validator(mode="after")
    def _policy(self) -> ArmConfig:
        if self.policy == "popularity" and self.model_uri is not None:
            raise ValueError(f"arm {self.name!r}: a popularity arm takes no model_uri")
        return self


class GuardrailConfig(_Strict):
    """A metric the challenger must not harm: a significant drop (mSPRT at the experiment's
    alpha) larger than ``max_drop`` (relative, 0 = any significant drop) stops the arm."""

    metric: Literal[EXPERIMENT_METRICS]  # type: ignore[valid-type]
    max_drop: float = Field(default=0.0, ge=0, le=1)


class ExperimentConfig(_Strict):
    """An online experiment of one use-case (serve_apps.experiments).

    Users are assigned by a hash of (user_id, salt): the same user always gets the same arm,
    a new salt reshuffles everyone. ``control`` is the arm the others are compared with."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    salt: str = Field(min_length=1, max_length=64)
    arms: list[ArmConfig] = Field(min_length=2)
    control: str = "champion"
    primary_metric: Literal[EXPERIMENT_METRICS] = "ctr"  # type: ignore[valid-type]
    guardrails: list[GuardrailConfig] = Field(default_factory=list)
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    # mSPRT mixing sd, relative to the control arm's rate (tau = msprt_tau * control rate)
    msprt_tau: float = Field(default=0.1, gt=0, le=10)
    check_every: int = Field(default=1000, ge=10)  # exposures per sequential look
    # the relative lift the experiment is planned to detect: the report compares when the
    # sequential test decided with the exposures a fixed-horizon test needs for it (80% power)
    minimum_detectable_lift: float = Field(default=0.05, gt=0, le=10)
    attribution_window_s: int = Field(default=86_400, ge=1, le=90 * 86_400)

    @model_validator(mode="after")
    def _arms(self) -> ExperimentConfig:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.id!r}: arm names repeat: {names}")
        if self.control not in names:
            raise ValueError(
                f"experiment {self.id!r}: control {self.control!r} is not an arm {names}"
            )
        total = sum(a.share for a in self.arms)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"experiment {self.id!r}: arm shares sum to {total}, expected 1")
        return self


class UseCaseConfig(_Strict):
    """One serving use-case (task_type): its Serve deployment and business rules."""

    name: str
    route_prefix: str
    score_weights: dict[str, float] = Field(default_factory=lambda: {"click": 1.0})
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=4, gt=0)
    max_ongoing_requests: int = Field(default=16, ge=1)
    num_cpus: float = Field(default=0.2, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    max_batch_size: int = Field(default=16, ge=1)
    batch_wait_timeout_s: float = Field(default=0.005, ge=0)
    request_timeout_s: float = Field(default=1.0, gt=0)
    cache_ttl_s: float = Field(default=5.0, ge=0)
    feature_freshness_s: float = Field(default=3600.0, ge=0)
    fallback: Literal["popularity", "none"] = "popularity"
    retrieval: Literal[
        "request", "popular_by_category", "co_occurrence", "inverted_index", "eligible_ads"
    ] = "request"
    max_candidates: int = Field(default=500, ge=1)
    top_k: int = Field(default=20, ge=1)
    rules: list[str] = Field(default_factory=list)
    rules_module: str | None = None
    experiment: ExperimentConfig | None = None

    @model_validator(mode="after")
    def _replicas(self) -> UseCaseConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})"
            )
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {self.route_prefix!r}")
        return self


class ServeConfig(_Strict):
    model_uri: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8000, gt=0, lt=65536)
    feature_store: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    shape_buckets: list[int] = Field(default_factory=lambda: [16, 64, 128, 512])
    device: Literal["cpu", "cuda", "auto"] = "auto"
    # Every ranked response (exposure) and posted event (outcome), model.exposure_log:
    # redis = a stream per use-case that ray_jobs.flush_log moves to exposure_log_output.
    exposure_log: Literal["memory", "redis", "off"] = "memory"
    exposure_log_output: str = "out/exposure_log"


class UserEmbeddingsConfig(_Strict):
    """ray_jobs.user_embeddings: precompute the sequence encodings of active users."""

    input: list[str] = Field(default_factory=list)  # prepared parquet; [] = dataset splits
    output: str = "out/user_embeddings"  # parquet copy of what was written (inspectable)
    model_uri: str | None = None  # exported dir or models:/...; None = serve.model_uri
    lookback_s: float = Field(default=7 * 86400.0, gt=0)  # active = an event this recent
    as_of: int | None = None  # unix s, end of the activity window; None = now
    batch_size: int = Field(default=256, ge=1)  # users per encoder call
    num_actors: int = Field(default=1, ge=1)
    actor_cpus: float = Field(default=0.5, gt=0)
    ttl_s: float | None = Field(default=7 * 86400.0, gt=0)  # Redis key expiry; None = never


def _check_weights(path: str, weights: dict[str, float], known, unknown_hint: str) -> None:
    """Objective weights: known keys, finite weights >= 0, at least one > 0 (if any)."""
    for key, w in weights.items():
        if not known(key):
            raise ValueError(f"{path}: {key!r} {unknown_hint}")
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"{path}.{key}: expected a finite weight >= 0, got {w}")
    if weights and not any(w > 0 for w in weights.values()):
        raise ValueError(f"{path}: at least one weight must be > 0")


class UnirankConfig(_Strict):
    storage: StorageConfig = Field(default_factory=StorageConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    movielens: MovieLensConfig = Field(default_factory=MovieLensConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    user_embeddings: UserEmbeddingsConfig = Field(default_factory=UserEmbeddingsConfig)
    use_cases: list[UseCaseConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_checks(self) -> UnirankConfig:
        task_names = {t.name for t in self.dataset.tasks}
        _check_weights(
            "train.objective",
            self.train.objective,
            lambda key: not task_names or key in task_names,
            "is not in dataset.tasks",
        )
        known = set(self.dataset.task_types) | {"unknown"}
        _check_weights(
            "train.objective_task_types",
            self.train.objective_task_types,
            known.__contains__,
            f"is not in dataset.task_types {sorted(self.dataset.task_types)} "
            "(use 'unknown' for rows without one)",
        )
        if "pooled" in self.dataset.task_types:
            raise ValueError("dataset.task_types: 'pooled' is reserved for all-rows metrics")
        seen = set()
        for uc in self.use_cases:
            if uc.name in seen:
                raise ValueError(f"use_cases: {uc.name!r} appears twice")
            seen.add(uc.name)
        return self

    # ------------------------------------------------------------------ helpers

    def task(self, name: str) -> TaskSpec:
        for t in self.dataset.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task {name!r}; tasks are {[t.name for t in self.dataset.tasks]}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted-key view of the resolved config (for MLflow params)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                for i, v in enumerate(value):
                    walk(f"{prefix}.{i}", v)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out


# --------------------------------------------------------------------------- loading


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required field missing"
        lines.append(f"  {path}: {msg}" + (f" (got {e['input']!r})" if _show_input(e) else ""))
    return "\n".join(lines)


def _show_input(e: dict) -> bool:
    return e["type"] not in ("missing", "extra_forbidden") and not isinstance(
        e.get("input"), (dict, list)
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.field=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            where = ".".join(path[: i + 1])
            if isinstance(node, list):
                node = _list_item(node, part, text, where)
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise ConfigError(f"override {text!r}: {where} is a value, not a section")
        last = path[-1]
        if isinstance(node, list):
            idx = _list_index(node, last, text, ".".join(path))
            node[idx] = value
        else:
            node[last] = value
    return data


def _list_index(node: list, part: str, text: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(
            f"override {text!r}: {where}: expected a list index in [0, {len(node)}), got {part!r}"
        )
    return int(part)


def _list_item(node: list, part: str, text: str, where: str) -> Any:
    return node[_list_index(node, part, text, where)]


def config_from_dict(data: dict, source: str = "<dict>", overrides: list[str] | None = None):
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: top level must be a mapping")
    try:
        cfg = UnirankConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    if not overrides:
        return cfg
    # Overrides apply to the resolved tree, so defaults (e.g. list items) are addressable.
    data = apply_overrides(cfg.model_dump(mode="json"), overrides)
    try:
        return UnirankConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, f"{source} with overrides {overrides}")) from None


def config_args(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """A CLI's (config, overrides) positionals: a bare ``key=value`` in the config slot that
    is not a file is the first override (``python -m ... key=value`` on the defaults)."""
    if config and "=" in config and not os.path.exists(config):
        return None, [config, *overrides]
    return config, list(overrides)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> UnirankConfig:
    """Load a YAML config (or the embedded defaults when path is None) and apply overrides."""
    if path is None:
        return config_from_dict({}, "<defaults>", overrides)
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid config {path}: not valid YAML: {exc}") from None
    data = _resolve_base(path, data, seen=(path.resolve(),))
    return config_from_dict(data, str(path), overrides)


def _resolve_base(path: Path, data: dict, seen: tuple[Path, ...]) -> dict:
    """`base: other.yaml` (relative to the file) is merged under the file, recursively."""
    base = data.pop("base", None)
    if base is None:
        return data
    parent_path = (path.parent / base).resolve()
    if parent_path in seen:
        raise ConfigError(f"invalid config {path}: base {base!r} is circular")
    try:
        parent = yaml.safe_load(parent_path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"invalid config {path}: base {base!r}: {exc.strerror}") from None
    parent = _resolve_base(parent_path, parent, (*seen, parent_path))
    return _deep_merge(parent, data)


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def save_config(cfg: UnirankConfig, path: str | Path) -> None:
    Path(path).write_text(cfg.to_yaml())
