"""Candidate retrieval: look-ups in the index the model was exported with.

The index file (``retrieval.npz``), its builder and the columns it is made of are
``model.retrieval_index`` (shared with ``ray_jobs.export``, which writes it next to the
exported model); this module loads it in every ingress replica and answers:

- ``features(ids, task_type)``: the catalogue features of candidates, as the use-case's own
  training rows carried them (see model.retrieval_index), + popularity (the fallback ranking);
- ``lists(ids)``: the candidates' content lists (title tokens, item categories);
- ``popular_in_category``: items of a category by popularity;
- ``neighbours``: item -> items seen close together in users' sequences (and clicked
  related-item pairs);
- ``search``: query tokens -> items shown for them, by tokens matched then clicks;
- ``eligible_ads``: items that belong to a campaign, optionally of given campaigns.

An index lacks a structure its data had no columns for (e.g. no sequences): that look-up
returns no items.

CLI (the same as ``python -m model.retrieval_index``)::

    python -m serve_apps.retrieval DATA [DATA ...] -o out/model/retrieval.npz
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from model.id_lists import IdLists
from model.retrieval_index import (
    INDEX_FILE,
    SERVED_ITEM_FEATURES,
    IndexArrays,
    IndexColumns,
    RetrievalError,
    read_table,
)
from model.retrieval_index import build_index as build_arrays
from model.retrieval_index import main as _build_main
from model.schema import UNIFIED_SCHEMA

__all__ = ["INDEX_FILE", "RetrievalError", "RetrievalIndex", "build_index", "main"]


def _read(sources: Sequence[str | Path] | pa.Table) -> pa.Table:
    """The default index columns of ``sources`` that exist, cast to their unified types
    (serve_apps.run's bootstrap model is fitted on them)."""
    t, _ = read_table(sources, IndexColumns())
    names = [c for c in t.column_names if c in UNIFIED_SCHEMA.names]
    return t.select(names).cast(
        pa.schema([UNIFIED_SCHEMA.field(c).with_nullable(True) for c in names])
    )


def build_index(
    sources: Sequence[str | Path] | pa.Table,
    out: str | Path | None = None,
    columns: IndexColumns | None = None,
    **kwargs,
) -> RetrievalIndex:
    """``model.retrieval_index.build_index``, loaded for look-ups."""
    return RetrievalIndex.from_arrays(build_arrays(sources, out, columns, **kwargs))


class RetrievalIndex:
    """Loaded indices. Item lists come back as catalogue positions or ids, best first."""

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict | None = None):
        self.a = arrays
        self.meta = meta or {}
        self.items = arrays["items"]  # sorted item ids
        self.popularity = arrays["popularity"]
        self.feature_names = [k.removeprefix("feat:") for k in arrays if k.startswith("feat:")]
        self._by_pop = np.argsort(-self.popularity, kind="stable")  # positions, best first
        cats = arrays.get("feat:category_id", np.zeros(len(self.items), np.int64))[self._by_pop]
        order = np.argsort(cats, kind="stable")  # by category, popularity order kept
        self._cat_keys, self._cat_start = np.unique(cats[order], return_index=True)
        self._cat_sorted = self._by_pop[order]
        self._cat_end = np.append(self._cat_start[1:], len(order))
        campaign = arrays.get("feat:campaign_id", np.zeros(len(self.items), np.int64))
        self._campaign = campaign
        self._ads = self._by_pop[campaign[self._by_pop] != 0]  # ad positions by popularity
        list_names = (self.meta or {}).get("lists", [])
        self._lists = {n: IdLists.stored(arrays, f"list:{n}") for n in list_names}
        names = arrays.get("tt_names", np.zeros(0, str))
        self._tt = {str(x): k for k, x in enumerate(names)}

    @classmethod
    def from_arrays(cls, index: IndexArrays) -> RetrievalIndex:
        return cls(index.arrays, index.meta)

    # ------------------------------------------------------------------ io

    def save(self, path: str | Path) -> Path:
        return IndexArrays(self.a, self.meta).save(path)

    @classmethod
    def load(cls, path: str | Path) -> RetrievalIndex:
        return cls.from_arrays(IndexArrays.load(path))

    # ------------------------------------------------------------------ lookups

    def __len__(self) -> int:
        return len(self.items)

    def positions(self, item_ids: np.ndarray) -> np.ndarray:
        """Catalogue position of each id, -1 when unknown."""
        ids = np.asarray(item_ids, dtype=np.int64)
        pos = np.searchsorted(self.items, ids).clip(max=max(len(self.items) - 1, 0))
        return np.where(self.items[pos] == ids, pos, -1) if len(self.items) else -np.ones_like(ids)

    def known(self, item_ids: np.ndarray, task_type: str | None = None) -> np.ndarray:
        """Whether each id is in the catalogue (with ``task_type``: in that task_type's
        training rows, whose features it is then served with)."""
        pos = self.positions(item_ids)
        if task_type is None:
            return pos >= 0
        return self._in_task_type(pos, task_type)[0]

    def _in_task_type(self, pos: np.ndarray, task_type: str):
        """(whether each catalogue position has rows of ``task_type``, the index of its
        values within that task_type's ``tt:`` slice, the slice)."""
        k = self._tt.get(task_type, -1)
        if k < 0:
            return np.zeros(len(pos), bool), np.zeros(len(pos), np.int64), slice(0, 0)
        lo, hi = self.a["tt_indptr"][k : k + 2]
        tt_pos = self.a["tt_pos"][lo:hi]
        if not len(tt_pos):
            return np.zeros(len(pos), bool), np.zeros(len(pos), np.int64), slice(lo, hi)
        j = np.searchsorted(tt_pos, pos).clip(max=len(tt_pos) - 1)
        return (pos >= 0) & (tt_pos[j] == pos), j, slice(lo, hi)

    def features(self, item_ids: np.ndarray, task_type: str | None = None) -> dict[str, np.ndarray]:
        """Catalogue features of each id + popularity; unknown items get the placeholder (0,
        NaN for floats). With ``task_type``: an item that appeared in that task_type's
        training rows gets the features those rows carried; others the catalogue values.
        The served item features (unified + content scalars) the index lacks come back as
        placeholders."""
        pos = self.positions(item_ids)
        known = pos >= 0
        safe = np.maximum(pos, 0)
        in_tt, j, tt = self._in_task_type(pos, task_type) if task_type is not None else (None,) * 3
        out = {}
        for name in self.feature_names:
            arr = self.a[f"feat:{name}"]
            fill = np.nan if arr.dtype.kind == "f" else 0
            col = np.where(known, arr[safe], fill).astype(arr.dtype)
            if in_tt is not None and in_tt.any():
                col = np.where(in_tt, self.a[f"tt:{name}"][tt][j], col).astype(arr.dtype)
            out[name] = col
        for name in SERVED_ITEM_FEATURES:
            if name not in out:
                kind = UNIFIED_SCHEMA.field(name).type
                floats = pa.types.is_floating(kind)
                out[name] = np.full(
                    len(pos), np.nan if floats else 0, np.float32 if floats else np.int64
                )
        out["popularity"] = np.where(known, self.popularity[safe], 0).astype(np.float32)
        return out

    def lists(self, item_ids: np.ndarray) -> dict[str, IdLists]:
        """The content lists of each id (title tokens, item categories, ...): empty for an
        unknown item, as for a cold-start item in training."""
        pos = self.positions(item_ids)
        return {
            name: lists.take(np.maximum(pos, 0), pos >= 0) for name, lists in self._lists.items()
        }

    def _ids(self, positions: np.ndarray, limit: int) -> np.ndarray:
        return self.items[positions[:limit]]

    def popular(self, limit: int) -> np.ndarray:
        return self._ids(self._by_pop, limit)

    def popular_in_category(self, category_id: int, limit: int) -> np.ndarray:
        k = np.searchsorted(self._cat_keys, category_id)
        if k >= len(self._cat_keys) or self._cat_keys[k] != category_id:
            return np.zeros(0, np.int64)
        return self._ids(self._cat_sorted[self._cat_start[k] : self._cat_end[k]], limit)

    def _row(self, prefix: str, key: int) -> tuple[np.ndarray, np.ndarray]:
        keys = self.a[f"{prefix}_keys"]
        k = np.searchsorted(keys, key)
        if k >= len(keys) or keys[k] != key:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        lo, hi = self.a[f"{prefix}_indptr"][k : k + 2]
        return self.a[f"{prefix}_items"][lo:hi], self.a[f"{prefix}_weight"][lo:hi]

    def neighbours(self, item_id: int, limit: int) -> np.ndarray:
        return self._row("co", item_id)[0][:limit]

    def search(self, tokens: Sequence[int], limit: int) -> np.ndarray:
        """Items matching any token, by the number of tokens matched, then summed weight."""
        hits, weights = [], []
        for tok in dict.fromkeys(tokens):
            i, w = self._row("tok", int(tok))
            hits.append(i)
            weights.append(w)
        if not hits or sum(len(h) for h in hits) == 0:
            return np.zeros(0, np.int64)
        ids = np.concatenate(hits)
        w = np.concatenate(weights)
        uniq, inv = np.unique(ids, return_inverse=True)
        matched = np.bincount(inv, minlength=len(uniq))
        score = np.bincount(inv, weights=w, minlength=len(uniq))
        order = np.lexsort((-score, -matched))
        return uniq[order][:limit]

    def eligible_ads(self, campaign_ids: Sequence[int] | None, limit: int) -> np.ndarray:
        pos = self._ads
        if campaign_ids:
            pos = pos[np.isin(self._campaign[pos], np.asarray(campaign_ids))]
        return self._ids(pos, limit)

    def by_popularity(self, item_ids: np.ndarray) -> np.ndarray:
        """The given ids ordered by popularity (unknown items last): the fallback ranking."""
        pop = self.features(item_ids)["popularity"]
        return np.asarray(item_ids)[np.argsort(-pop, kind="stable")]


def main(argv: list[str] | None = None) -> int:
    return _build_main(argv)


if __name__ == "__main__":
    sys.exit(main())
