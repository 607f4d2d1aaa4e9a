"""Candidate retrieval: the indices the ranker's candidates come from, and their builder.

Built once from prepared unified-schema parquet (training data) with pyarrow, saved as one
``.npz`` file next to the exported model (``<model_dir>/retrieval.npz``) or at a configured
path, loaded by every ingress replica:

- item catalogue: features per item (category, advertiser, campaign, price, reliability) and
  a popularity score (clicks + impressions / 10) — also the fallback ranking;
- ``popular_by_category``: items of a category by popularity;
- ``co_occurrence``: item -> items seen close together in users' sequences (and clicked
  related-item pairs), top ``neighbours`` by count;
- ``inverted_index``: query token -> items shown for it in search, by clicks then shows;
- ``eligible_ads``: items that belong to a campaign (advertiser > 0), optionally by campaign.

CLI::

    python -m serve_apps.retrieval DATA [DATA ...] -o out/model/retrieval.npz
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from model.schema import UNIFIED_SCHEMA

INDEX_FILE = "retrieval.npz"
INDEX_COLUMNS = _COLUMNS = [
    "task_type",
    "item_id",
    "category_id",
    "advertiser_id",
    "campaign_id",
    "source_item_id",
    "price",
    "advertiser_reliability",
    "query_tokens",
    "seq_item_ids",
    "click",
]


class RetrievalError(ValueError):
    """An index that cannot be built or loaded; names the file and what is wrong."""


def _read(sources: Sequence[str | Path] | pa.Table) -> pa.Table:
    """The index's columns, cast to their unified-schema types."""
    if isinstance(sources, pa.Table):
        missing = [c for c in _COLUMNS if c not in sources.schema.names]
        if missing:
            raise RetrievalError(f"table lacks columns {missing}")
        return _typed(sources.select(_COLUMNS))
    paths = [str(s) for s in sources]
    try:
        dataset = ds.dataset(paths if len(paths) > 1 else paths[0], format="parquet")
    except (FileNotFoundError, pa.ArrowInvalid) as exc:
        raise RetrievalError(f"cannot read parquet from {paths}: {exc}") from None
    missing = [c for c in _COLUMNS if c not in dataset.schema.names]
    if missing:
        raise RetrievalError(f"parquet at {paths} lacks columns {missing}")
    return _typed(dataset.to_table(columns=_COLUMNS))


def _typed(t: pa.Table) -> pa.Table:
    schema = pa.schema([UNIFIED_SCHEMA.field(c).with_nullable(True) for c in _COLUMNS])
    return t.cast(schema)


def _csr(keys: np.ndarray, values: np.ndarray, weights: np.ndarray, top: int):
    """Group (key, value) pairs: per key, values by summed weight desc, at most ``top``.

    Returns (unique keys, indptr, values, weights) in CSR form.
    """
    if keys.size == 0:
        z = np.zeros(0, np.int64)
        return z, np.zeros(1, np.int64), z, np.zeros(0, np.float32)
    pair = np.stack([keys, values], 1)
    uniq, inverse = np.unique(pair, axis=0, return_inverse=True)
    w = np.bincount(inverse.ravel(), weights=weights, minlength=len(uniq))
    order = np.lexsort((-w, uniq[:, 0]))  # by key, then weight desc
    uniq, w = uniq[order], w[order]
    ukeys, start, counts = np.unique(uniq[:, 0], return_index=True, return_counts=True)
    keep = np.arange(len(uniq)) - np.repeat(start, counts) < top
    uniq, w = uniq[keep], w[keep]
    kept = np.minimum(counts, top)
    indptr = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
    return ukeys.astype(np.int64), indptr, uniq[:, 1].astype(np.int64), w.astype(np.float32)


def build_index(
    sources: Sequence[str | Path] | pa.Table,
    out: str | Path | None = None,
    window: int = 3,
    neighbours: int = 50,
    per_token: int = 200,
) -> RetrievalIndex:
    """Build every index from unified-schema rows; write it to ``out`` when given."""
    t = _read(sources)
    if t.num_rows == 0:
        raise RetrievalError("no rows to build the retrieval index from")
    item = t["item_id"].to_numpy()
    click = np.nan_to_num(t["click"].to_numpy(zero_copy_only=False), nan=0.0)

    # catalogue: last seen features per item, popularity = clicks + shows / 10
    items, first, inverse = np.unique(item[::-1], return_index=True, return_inverse=True)
    last = len(item) - 1 - first  # index of each item's last row
    inv = np.empty_like(inverse)
    inv[::-1] = inverse  # row -> catalogue position, in the original order
    popularity = np.bincount(inv, weights=click + 0.1, minlength=len(items))

    def col(name: str, fill) -> np.ndarray:
        return pc.fill_null(t[name], fill).to_numpy()[last]

    # co-occurrence: pairs within ``window`` positions of one sequence, both directions
    seq = t["seq_item_ids"].combine_chunks().cast(pa.list_(pa.int64()))
    flat = seq.flatten().to_numpy(zero_copy_only=False)
    row = pc.list_parent_indices(seq).to_numpy()
    src, dst = [], []
    for d in range(1, window + 1):
        same = row[d:] == row[:-d]
        src += [flat[:-d][same], flat[d:][same]]
        dst += [flat[d:][same], flat[:-d][same]]
    rel = (t["task_type"].to_numpy(zero_copy_only=False) == "related_items") & (click > 0)
    src += [t["source_item_id"].to_numpy()[rel], item[rel]]
    dst += [item[rel], t["source_item_id"].to_numpy()[rel]]
    a, b = np.concatenate(src), np.concatenate(dst)
    ok = (a != b) & np.isin(b, items) & (a > 0)
    co = _csr(a[ok], b[ok], np.ones(int(ok.sum())), neighbours)

    # inverted index: token -> items shown for it (a click counts 10 shows)
    qt = t["query_tokens"].combine_chunks().cast(pa.list_(pa.int64()))
    tok = qt.flatten().to_numpy(zero_copy_only=False)
    qrow = pc.list_parent_indices(qt).to_numpy()
    inv_idx = _csr(tok, item[qrow], 1.0 + 9.0 * click[qrow], per_token)

    index = RetrievalIndex(
        {
            "items": items.astype(np.int64),
            "category_id": col("category_id", 0).astype(np.int64),
            "advertiser_id": col("advertiser_id", 0).astype(np.int64),
            "campaign_id": col("campaign_id", 0).astype(np.int64),
            "price": col("price", np.nan).astype(np.float32),
            "advertiser_reliability": col("advertiser_reliability", np.nan).astype(np.float32),
            "popularity": popularity.astype(np.float32),
            "co_keys": co[0],
            "co_indptr": co[1],
            "co_items": co[2],
            "co_weight": co[3],
            "tok_keys": inv_idx[0],
            "tok_indptr": inv_idx[1],
            "tok_items": inv_idx[2],
            "tok_weight": inv_idx[3],
        }
    )
    if out is not None:
        index.save(out)
    return index


class RetrievalIndex:
    """Loaded indices. Item lists come back as catalogue positions or ids, best first."""

    FIELDS = ("category_id", "advertiser_id", "campaign_id", "price", "advertiser_reliability")

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.a = arrays
        self.items = arrays["items"]  # sorted item ids
        self.popularity = arrays["popularity"]
        self._by_pop = np.argsort(-self.popularity, kind="stable")  # positions, best first
        cats = arrays["category_id"][self._by_pop]
        order = np.argsort(cats, kind="stable")  # by category, popularity order kept
        self._cat_keys, self._cat_start = np.unique(cats[order], return_index=True)
        self._cat_sorted = self._by_pop[order]
        self._cat_end = np.append(self._cat_start[1:], len(order))
        ads = self._by_pop[arrays["campaign_id"][self._by_pop] > 0]
        self._ads = ads  # ad positions by popularity

    # ------------------------------------------------------------------ io

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            np.savez(f, **self.a)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RetrievalIndex:
        try:
            with np.load(path) as z:
                return cls({k: z[k] for k in z.files})
        except FileNotFoundError:
            raise RetrievalError(
                f"retrieval index {path} does not exist; build it with "
                f"`python -m serve_apps.retrieval DATA -o {path}`"
            ) from None

    # ------------------------------------------------------------------ lookups

    def __len__(self) -> int:
        return len(self.items)

    def positions(self, item_ids: np.ndarray) -> np.ndarray:
        """Catalogue position of each id, -1 when unknown."""
        ids = np.asarray(item_ids, dtype=np.int64)
        pos = np.searchsorted(self.items, ids).clip(max=max(len(self.items) - 1, 0))
        return np.where(self.items[pos] == ids, pos, -1) if len(self.items) else -np.ones_like(ids)

    def features(self, item_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Catalogue features of each id (0 / NaN for unknown items) + popularity."""
        pos = self.positions(item_ids)
        known = pos >= 0
        out = {}
        for name in (*self.FIELDS, "popularity"):
            arr = self.a[name] if name != "popularity" else self.popularity
            fill = np.nan if arr.dtype.kind == "f" and name != "popularity" else 0
            out[name] = np.where(known, arr[np.maximum(pos, 0)], fill).astype(arr.dtype)
        return out

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
            pos = pos[np.isin(self.a["campaign_id"][pos], np.asarray(campaign_ids))]
        return self._ids(pos, limit)

    def by_popularity(self, item_ids: np.ndarray) -> np.ndarray:
        """The given ids ordered by popularity (unknown items last): the fallback ranking."""
        pop = self.features(item_ids)["popularity"]
        return np.asarray(item_ids)[np.argsort(-pop, kind="stable")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve_apps.retrieval", description=__doc__)
    p.add_argument("data", nargs="+", help="unified-schema parquet files / directories")
    p.add_argument("-o", "--output", required=True, help="where to write the .npz index")
    p.add_argument("--window", type=int, default=3)
    p.add_argument("--neighbours", type=int, default=50)
    a = p.parse_args(argv)
    try:
        index = build_index(a.data, a.output, window=a.window, neighbours=a.neighbours)
    except RetrievalError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"retrieval index: {len(index)} items -> {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
