"""The user-profile table: each user's profile as the training logs last carried it.

Training rows carry the user's profile (region, age band, declared interests:
``model.schema.USER_PROFILE_COLUMNS`` / ``USER_PROFILE_LISTS``), so the model learned from
them; a ranking request carries only a user id. ``ray_jobs.export`` therefore writes this
table from the training split next to the retrieval index (``user_profiles.npz``), and each
ingress replica looks the requesting user up in it (serving may override it: the request's
``profile`` object, or a profile written to the online feature store). A user the table does
not know gets the placeholders (0, empty list), exactly like a user whose rows logged no
profile in training.

Which columns: ``dataset.profiles`` (user column, scalar and list columns), keeping only
those the feature spec reads; columns the data lacks are left out and named in
``meta["skipped"]``, so a bring-your-own dataset without profiles still exports (an empty
table). The profile of a user is the one of their newest row (by the time column): the
profile at the end of the training window, one consistent snapshot.

The file (one ``.npz``, no pickles): ``users`` (U,) sorted int64 ids (string ids hashed with
``model.hashing.string_ids``, as the feature path does); ``col:<name>`` (U,) int64;
``list:<name>:offsets`` (U+1,) / ``list:<name>:values`` (``model.id_lists.IdLists``);
``meta`` JSON (format, columns, skipped, rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from model.config import DatasetConfig
from model.id_lists import IdLists, newest
from model.retrieval_index import (
    RetrievalError,
    _ids,
    open_source,
    read_npz,
    row_rank,
    write_npz,
)
from model.schema import USER_PROFILE_COLUMNS, USER_PROFILE_LISTS

PROFILE_FILE = "user_profiles.npz"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ProfileColumns:
    """The columns a profile table is built from."""

    user: str = "user_id"
    features: tuple[str, ...] = tuple(USER_PROFILE_COLUMNS)
    lists: tuple[str, ...] = tuple(USER_PROFILE_LISTS)
    time: str | None = "event_time"

    @classmethod
    def from_config(cls, dataset: DatasetConfig) -> ProfileColumns:
        p, f = dataset.profiles, dataset.features
        reads = {c.name for c in f.categorical if not c.multi}
        reads_lists = {c.name for c in f.categorical if c.multi}
        return cls(
            user=p.user_column,
            features=tuple(c for c in p.features if c in reads),
            lists=tuple(c for c in p.lists if c in reads_lists),
            time=f.time_column,
        )


@dataclass
class UserProfiles:
    """A loaded profile table: ``lookup(user_id)`` -> the user's profile columns."""

    arrays: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.users = self.arrays["users"]
        self.features = list(self.meta.get("features", []))
        self.lists = list(self.meta.get("lists", []))

    def __len__(self) -> int:
        return len(self.users)

    def position(self, user_id: int) -> int:
        """The user's row, -1 when unknown."""
        k = int(np.searchsorted(self.users, user_id))
        return k if k < len(self.users) and self.users[k] == user_id else -1

    def lookup(self, user_id: int) -> tuple[dict[str, int], dict[str, np.ndarray]]:
        """(scalar columns, list columns) of the user; placeholders for an unknown user."""
        k = self.position(user_id)
        scalars = {c: int(self.arrays[f"col:{c}"][k]) if k >= 0 else 0 for c in self.features}
        lists = {
            c: IdLists.stored(self.arrays, f"list:{c}").row(k).copy()
            if k >= 0
            else np.zeros(0, np.int64)
            for c in self.lists
        }
        return scalars, lists

    def save(self, path: str | Path) -> Path:
        return write_npz(path, self.arrays, self.meta)

    @classmethod
    def load(cls, path: str | Path) -> UserProfiles:
        arrays, meta = read_npz(path, "user-profile table")
        if "users" not in arrays or not meta:
            raise RetrievalError(f"user-profile table {path} has no 'users' / 'meta' array")
        for c in meta.get("features", []):
            if f"col:{c}" not in arrays:
                raise RetrievalError(f"user-profile table {path}: column {c!r} is missing")
        return cls(arrays, meta)


def build_profiles(
    source: Sequence[str | Path] | pa.Table | ds.Dataset,
    out: str | Path | None = None,
    columns: ProfileColumns | None = None,
) -> UserProfiles:
    """Each user's newest training row's profile columns; written to ``out`` when given."""
    columns = columns or ProfileColumns()
    data, where = open_source(source)
    names = set(data.schema.names)
    if columns.user not in names:
        raise RetrievalError(
            f"{where} has no user column {columns.user!r} (dataset.profiles.user_column)"
        )
    skipped = {c: "not in the data" for c in (*columns.features, *columns.lists) if c not in names}
    feats = [c for c in columns.features if c in names]
    lists = [c for c in columns.lists if c in names]
    wanted = [columns.user, *feats, *lists, *([columns.time] if columns.time in names else [])]
    t = data.select(wanted) if isinstance(data, pa.Table) else data.to_table(wanted)
    for c in list(lists):
        typ = t.schema.field(c).type
        if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)):
            skipped[c] = f"type {typ}: not a list profile feature"
            lists.remove(c)
    user = _ids(t[columns.user])
    users, pos = np.unique(user, return_inverse=True)
    _, rows = newest(pos, row_rank(t, columns.time, skipped), np.arange(len(user)))
    arrays: dict[str, np.ndarray] = {"users": users.astype(np.int64)}  # rows: one per user
    for c in feats:
        arrays[f"col:{c}"] = _ids(t[c])[rows].astype(np.int64)
    for c in lists:
        arrays.update(IdLists.from_arrow(t[c]).take(rows).arrays(f"list:{c}"))
    meta = {
        "format": FORMAT_VERSION,
        "user_column": columns.user,
        "features": feats,
        "lists": lists,
        "skipped": skipped,
        "rows": t.num_rows,
    }
    profiles = UserProfiles(arrays, meta)
    if out is not None:
        profiles.save(out)
    return profiles
