"""The HTTP API's JSON bodies (strict: unknown fields and wrong types are 422s)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

ID = Field(ge=0, le=2**63 - 1)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Candidate(_Strict):
    """A request-supplied candidate; missing features come from the item catalogue."""

    item_id: int = ID
    category_id: int | None = Field(default=None, ge=0)
    advertiser_id: int | None = Field(default=None, ge=0)
    campaign_id: int | None = Field(default=None, ge=0)
    price: float | None = None
    advertiser_reliability: float | None = None


class Context(_Strict):
    device: int = Field(default=0, ge=0)
    hour: int | None = Field(default=None, ge=0, le=23)  # default: the current UTC hour
    surface: int = Field(default=0, ge=0)


class RankRequest(_Strict):
    """One ranking request. Which fields matter depends on the use-case's retrieval rule:
    ``candidates`` (request), ``category_id`` (popular_by_category), ``source_item_id``
    (co_occurrence), ``query_tokens`` (inverted_index), ``campaign_ids`` (eligible_ads,
    optional). Request-supplied ``candidates`` replace retrieval for any use-case."""

    user_id: int = ID
    request_id: str | None = Field(default=None, max_length=128)
    task_type: str | None = Field(default=None, max_length=64)
    candidates: list[Candidate] | None = None
    category_id: int | None = Field(default=None, ge=0)
    source_item_id: int | None = Field(default=None, ge=0)
    query_tokens: list[int] | None = Field(default=None, max_length=64)
    campaign_ids: list[int] | None = Field(default=None, max_length=1000)
    exclude_item_ids: list[int] = Field(default_factory=list, max_length=10_000)
    context: Context = Field(default_factory=Context)
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


class Event(_Strict):
    user_id: int = ID
    item_id: int = ID
    event_type: int = Field(default=1, ge=0, le=255)  # model.schema.EVENT_TYPES
    timestamp: int | None = Field(default=None, ge=0)  # unix seconds; default: now


class EventAck(BaseModel):
    user_id: int
    stored_events: int


class ErrorField(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    error: str
    fields: list[ErrorField] = Field(default_factory=list)
    request_id: str | None = None
