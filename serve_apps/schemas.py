"""The HTTP API's JSON bodies (strict: unknown fields and wrong types are 422s).

Bounds, enforced here so that nothing out of range ever reaches the feature store or a
batched model call (docs/serving.md, "Bounds"):

- every id (user, item, category, advertiser, campaign, source item, query token, campaign
  and excluded ids) is an int64 >= 0: the model hashes any of them into its tables, so every
  int64 is usable; a larger or negative value is a 422 naming the field;
- the context ids ``device`` / ``surface``, a candidate's content ids (``brand_id``,
  ``price_tier``, ``release_year_bucket``, ``title_tokens``, ``item_categories``) and the
  ``profile`` ids (``region``, ``age_band``, ``declared_interests``) are int64 >= 0 too; a
  value the model has no row for (>= the feature's ``vocab_size``) becomes the placeholder 0
  in the model's feature path, exactly as in training (``model.hashing.clip_vocab``); ``hour``
  is 0..23; id lists hold at most ``MAX_LIST_IDS`` ids;
- every float is finite and fits float32 (NaN, Infinity, 1e309 or 1e39 are 422s; leave a
  feature out or send null to mean "unknown"); ``advertiser_reliability`` is in [0, 1];
- event timestamps are checked against ``prepare.min_event_time`` .. now + 1 day by the
  ingress (the upper bound moves with the clock).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from serve_apps.bounds import MAX_LIST_IDS

INT64_MAX = 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38
MAX_FIELD_ERRORS = 20  # an error body lists at most this many fields (plus the total count)

ID = Field(ge=0, le=INT64_MAX)
OptId = Field(default=None, ge=0, le=INT64_MAX)
IdItem = Annotated[int, Field(ge=0, le=INT64_MAX)]
# printable ASCII: it is echoed in logs and headers
RequestId = Field(default=None, min_length=1, max_length=128, pattern=r"^[ -~]+$")


def _float(lo: float = -FLOAT32_MAX, hi: float = FLOAT32_MAX):
    return Field(default=None, ge=lo, le=hi, allow_inf_nan=False)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _ids(max_length: int = MAX_LIST_IDS):
    return Field(default=None, max_length=max_length)


class Candidate(_Strict):
    """A request-supplied candidate; missing features come from the item catalogue (the
    retrieval index), as the training rows carried them; an unknown item gets placeholders,
    as a cold-start item in training."""

    item_id: int = ID
    category_id: int | None = OptId
    advertiser_id: int | None = OptId
    campaign_id: int | None = OptId
    price: float | None = _float()
    advertiser_reliability: float | None = _float(0.0, 1.0)
    # item content (model.schema.ITEM_CONTENT_COLUMNS / ITEM_CONTENT_LISTS)
    brand_id: int | None = OptId
    price_tier: int | None = OptId
    release_year_bucket: int | None = OptId
    title_tokens: list[IdItem] | None = _ids()
    item_categories: list[IdItem] | None = _ids()


class UserProfile(_Strict):
    """The requesting user's profile (model.schema.USER_PROFILE_COLUMNS / _LISTS). A field
    given here overrides the stored one (feature store, then the export's profile table);
    a field left out keeps it."""

    region: int | None = OptId
    age_band: int | None = OptId
    declared_interests: list[IdItem] | None = _ids()


class Context(_Strict):
    device: int = Field(default=0, ge=0, le=INT64_MAX)  # >= vocab_size: placeholder 0
    hour: int | None = Field(default=None, ge=0, le=23)  # default: the current UTC hour
    surface: int = Field(default=0, ge=0, le=INT64_MAX)  # >= vocab_size: placeholder 0


class RankRequest(_Strict):
    """One ranking request. Which fields matter depends on the use-case's retrieval rule:
    ``candidates`` (request), ``category_id`` (popular_by_category), ``source_item_id``
    (co_occurrence), ``query_tokens`` (inverted_index), ``campaign_ids`` (eligible_ads,
    optional). Request-supplied ``candidates`` replace retrieval for any use-case."""

    user_id: int = ID
    request_id: str | None = RequestId
    task_type: str | None = Field(default=None, max_length=64)
    candidates: list[Candidate] | None = None
    category_id: int | None = OptId
    source_item_id: int | None = OptId
    query_tokens: list[IdItem] | None = Field(default=None, max_length=64)
    campaign_ids: list[IdItem] | None = Field(default=None, max_length=1000)
    exclude_item_ids: list[IdItem] = Field(default_factory=list, max_length=10_000)
    context: Context = Field(default_factory=Context)
    profile: UserProfile | None = None
    top_k: int | None = Field(default=None, ge=1, le=1000)


class ScoredItem(BaseModel):
    item_id: int
    score: float | None  # None in a fallback response
    probs: dict[str, float] | None = None
    category_id: int
    advertiser_id: int


class Fallback(BaseModel):
    policy: str
    reason: str


class RankResponse(BaseModel):
    request_id: str
    use_case: str
    model_version: str
    items: list[ScoredItem]
    num_candidates: int  # after retrieval and pre-rules, what the model scored
    fallback: Fallback | None = None
    cached: bool = False
    used_precomputed_encoding: bool = False
    experiment: str | None = None  # the use-case's online experiment, if it runs one
    arm: str | None = None  # the user's arm in it (serve_apps.experiments.assign_arm)


class Event(_Strict):
    user_id: int = ID
    # the /rank response this event answers (its exposure in the log), when the client knows it
    request_id: str | None = RequestId
    item_id: int = ID
    event_type: int = Field(default=1, ge=0, le=255)  # model.schema.EVENT_TYPES
    # unix seconds, prepare.min_event_time .. now + 1 day (checked by the ingress); default now
    timestamp: int | None = Field(default=None, ge=0, le=INT64_MAX)


class ProfileUpdate(_Strict):
    """``POST /profile``: set these fields of the user's online profile (feature store); the
    fields left out keep their stored value, else the export's profile table's."""

    user_id: int = ID
    profile: UserProfile


class ProfileAck(BaseModel):
    user_id: int
    profile: dict[str, int | list[int]]  # the user's stored online profile after the update


class EventAck(BaseModel):
    user_id: int
    stored_events: int


class ErrorField(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    """Every 4xx / 5xx body: a summary, the first ``MAX_FIELD_ERRORS`` field errors and how
    many there were in all, and the request id (also in the logs and the X-Request-ID
    header)."""

    error: str
    fields: list[ErrorField] = Field(default_factory=list)
    error_count: int = 0
    request_id: str | None = None
