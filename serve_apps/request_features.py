"""A request's model inputs besides its ids, filled in the way training rows carried them.

- Candidates (``candidate_features``): the item features of the use-case's own training rows
  and the item's content (title tokens, brand, ...) from the retrieval index the model was
  exported with; then the fields the request sends per candidate; then the request-level
  context that training rows logged as a column (the category browse use-case's
  ``category_id``). An item the index does not know gets placeholders (0, NaN, empty lists),
  as a cold-start item did in training.
- The user (``user_profile``): the export's profile table (model.user_profiles), then the
  online profile in the feature store, then the request's ``profile``; an unknown user gets
  placeholders, as in training.

``tests/serve_apps/test_skew.py`` checks that logged rows served this way score as the rows
themselves.
"""

from __future__ import annotations

import numpy as np

from model.config import UseCaseConfig
from model.id_lists import IdLists
from model.retrieval_index import SERVED_ITEM_FEATURES
from model.schema import ITEM_CONTENT_LISTS, USER_PROFILE_COLUMNS, USER_PROFILE_LISTS
from model.user_profiles import PROFILE_FILE, UserProfiles
from serve_apps.retrieval import RetrievalIndex
from serve_apps.schemas import Candidate, RankRequest, UserProfile
from serve_apps.settings import AppSettings

# The retrieval whose request-level category is the rows' category_id: in training, a
# category-browse row logs the browsed category (not the item's own, which is content).
BROWSE_RETRIEVAL = "popular_by_category"


def candidate_features(
    index: RetrievalIndex | None, uc: UseCaseConfig, req: RankRequest, ids: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, IdLists]]:
    """The model inputs of each candidate (``ids``), as the use-case's training rows carried
    them: catalogue, then the request's per-candidate fields, then its browse context."""
    feats, lists = catalogue_features(index, ids, uc.name)
    given: list[Candidate | None] = [None] * len(ids)
    if req.candidates is not None:
        first: dict[int, Candidate] = {}
        for c in req.candidates:
            first.setdefault(c.item_id, c)
        given = [first[int(x)] for x in ids]
        override_candidates(given, feats, lists)
    if uc.retrieval == BROWSE_RETRIEVAL and req.category_id is not None:
        # the browsed category, unless a candidate sent its own category_id
        own = np.array([c is not None and c.category_id is not None for c in given], bool)
        feats["category_id"] = np.where(own, feats["category_id"], req.category_id)
    return feats, lists


def load_profiles(s: AppSettings) -> UserProfiles | None:
    """The user-profile table exported with the model (``<model dir>/user_profiles.npz``);
    None for a model exported without one (its users then get profile placeholders, unless
    the request sends a ``profile``)."""
    from serve_apps.model_store import resolve_model_dir

    path = resolve_model_dir(s.model_uri, s.cfg) / PROFILE_FILE
    return UserProfiles.load(path) if path.is_file() else None


def catalogue_features(
    index: RetrievalIndex | None, ids: np.ndarray, task_type: str
) -> tuple[dict[str, np.ndarray], dict[str, IdLists]]:
    """The candidates' item features as ``task_type``'s training rows carried them (+
    ``popularity``) and their content lists; all placeholders without an index."""
    n = len(ids)
    if index is not None:
        feats = index.features(ids, task_type=task_type)
        lists = index.lists(ids)
    else:
        feats = {k: np.zeros(n, np.int64) for k in SERVED_ITEM_FEATURES}
        feats["price"] = np.full(n, np.nan, np.float32)
        feats["advertiser_reliability"] = np.full(n, np.nan, np.float32)
        feats["popularity"] = np.zeros(n, np.float32)
        lists = {k: IdLists.empty(n) for k in ITEM_CONTENT_LISTS}
    feats["item_id"] = np.asarray(ids, np.int64)
    return feats, lists


def override_candidates(
    given: list[Candidate], feats: dict[str, np.ndarray], lists: dict[str, IdLists]
) -> None:
    """Per candidate (aligned with the feature rows), the fields the request sent replace
    the catalogue's (in place)."""
    for name in Candidate.model_fields:
        if name == "item_id":
            continue
        values = [getattr(c, name) for c in given]
        if all(v is None for v in values):
            continue
        if name in lists or name in ITEM_CONTENT_LISTS:
            old = lists.get(name, IdLists.empty(len(given)))
            rows = old.rows()
            lists[name] = IdLists.from_rows(
                [rows[i] if v is None else v for i, v in enumerate(values)]
            )
        else:
            col = feats[name].copy()
            for i, v in enumerate(values):
                if v is not None:
                    col[i] = v
            feats[name] = col


def user_profile(
    profiles: UserProfiles | None,
    user_id: int,
    online: dict | None = None,
    override: UserProfile | None = None,
) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """(scalar, list) profile columns of a user: the profile table's (placeholders for an
    unknown user, as in training), then the online profile's fields (feature store), then the
    request's."""
    if profiles is not None:
        scalars, lists = profiles.lookup(user_id)
    else:
        scalars = {c: 0 for c in USER_PROFILE_COLUMNS}
        lists = {c: np.zeros(0, np.int64) for c in USER_PROFILE_LISTS}
    given = override.model_dump(exclude_none=True) if override is not None else {}
    for name, v in {**(online or {}), **given}.items():
        if isinstance(v, list):
            lists[name] = np.asarray(v, np.int64)
        else:
            scalars[name] = int(v)
    return scalars, lists
