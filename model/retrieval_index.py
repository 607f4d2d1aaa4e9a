"""The candidate retrieval index: its file format and its builder.

Training writes it (``ray_jobs.export`` builds it from the train split into the serving
directory as ``retrieval.npz``); serving reads it (``serve_apps.retrieval.RetrievalIndex``
does the look-ups). Both import this module, neither imports the other.

Which columns it is built from comes from the dataset config (:meth:`IndexColumns.from_config`:
``dataset.catalogue`` names the item column and the item features, ``dataset.features`` the
task_type, time and sequence columns), so a bring-your-own parquet exports with an index made
of what it has. A column the data lacks leaves its part out, named in ``meta["skipped"]``;
only the item column is indispensable (:class:`RetrievalError` names it). String id columns
become int64 ids with ``model.hashing.string_ids``, the same ids the feature path uses.

The file (one ``.npz``, no pickles) holds:

- ``items`` (N,) sorted item ids; ``popularity`` (N,) label positives + shows / 10;
- ``feat:<column>`` (N,) the catalogue value of each item feature: the item's newest
  non-missing value over all rows (missing = null, NaN, or the placeholder id 0). Retrieval
  structures use it (items by category, eligible ads by campaign) and it answers for a
  task_type an item never appeared in;
- per task_type, the features training saw: ``tt_names`` (T,), ``tt_indptr`` (T+1,),
  ``tt_pos`` (M,) catalogue positions (sorted within each task_type) and ``tt:<column>``
  (M,) the values of the item's newest row *of that task_type*, placeholders included.
  Why per task_type: the use-cases log different item features (a notifications row of an ad
  item carries advertiser 0, an ads row its advertiser and campaign), and the model learned
  each task_type from its own rows. Taking each item's features from its last row of any
  task_type (as this index once did) gave the ads use-case candidates without advertiser and
  campaign whenever that row came from another use-case: features training never paired with
  ads. Serving asks ``features(ids, task_type)`` and gets the ads rows' values for ads;
- ``list:<column>:offsets`` (N+1,) / ``list:<column>:values``: each item's content lists
  (title tokens, its own categories; ``IndexColumns.lists``) in CSR form
  (``model.id_lists.IdLists``), from the item's newest row that logged a non-empty list.
  Content describes the item, not the use-case, so it is kept once per item; the scalar
  content columns (brand, price tier, release year) are item features like the ones above;
- ``co_keys/co_indptr/co_items/co_weight``: item -> items seen within ``window`` positions in
  users' sequences, plus clicked (source, item) pairs of the ``related_items`` task_type;
- ``tok_keys/tok_indptr/tok_items/tok_weight``: query token -> items shown for it;
- ``meta``: JSON (format version, columns used, skipped parts, rows).

CLI::

    python -m model.retrieval_index DATA [DATA ...] -o out/model/retrieval.npz [--config CFG]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from model.config import DatasetConfig
from model.hashing import is_string_type, string_ids
from model.id_lists import IdLists, newest, newest_lists
from model.schema import ITEM_CONTENT_COLUMNS, ITEM_CONTENT_LISTS

INDEX_FILE = "retrieval.npz"
FORMAT_VERSION = 3  # 3: item content lists (list:<column>:*); 2: per-task_type features
# The unified item features; an index built before FORMAT_VERSION 2 holds exactly these.
UNIFIED_ITEM_FEATURES = (
    "category_id",
    "advertiser_id",
    "campaign_id",
    "price",
    "advertiser_reliability",
)
# The item features serving always fills (placeholders when the index lacks one).
SERVED_ITEM_FEATURES = (*UNIFIED_ITEM_FEATURES, *ITEM_CONTENT_COLUMNS)
RELATED_TASK_TYPE = "related_items"  # its clicked (source_item, item) pairs are neighbours


class RetrievalError(ValueError):
    """An index that cannot be built or loaded; names the file / column and what is wrong."""


@dataclass(frozen=True)
class IndexColumns:
    """The columns an index is built from; ``None``: the dataset has no such column."""

    item: str = "item_id"
    features: tuple[str, ...] = SERVED_ITEM_FEATURES
    lists: tuple[str, ...] = tuple(ITEM_CONTENT_LISTS)
    task_type: str | None = "task_type"
    time: str | None = "event_time"
    label: str | None = "click"
    sequence: str | None = "seq_item_ids"
    source_item: str | None = "source_item_id"
    query: str | None = "query_tokens"

    @classmethod
    def from_config(cls, dataset: DatasetConfig) -> IndexColumns:
        f, c = dataset.features, dataset.catalogue
        label = c.popularity_label or (dataset.tasks[0].column if dataset.tasks else None)
        # Only the content lists the model reads are worth storing.
        model_reads = {x.name for x in f.categorical if x.multi}
        return cls(
            item=c.item_column,
            features=tuple(c.item_features),
            lists=tuple(x for x in c.item_lists if x in model_reads),
            task_type=f.task_type_column,
            time=f.time_column,
            label=label,
            sequence=f.sequence.item_column if f.sequence is not None else None,
        )

    def wanted(self) -> list[str]:
        named = [self.item, *self.features, *self.lists, self.task_type, self.time, self.label]
        named += [self.sequence, self.source_item, self.query]
        return list(dict.fromkeys(c for c in named if c is not None))


@dataclass
class IndexArrays:
    """The arrays of one index file and its metadata."""

    arrays: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.arrays["items"])

    @property
    def feature_names(self) -> list[str]:
        return list(self.meta.get("features", UNIFIED_ITEM_FEATURES))

    @property
    def list_names(self) -> list[str]:
        return list(self.meta.get("lists", []))

    def item_lists(self, name: str) -> IdLists:
        """The content list ``name`` of every catalogue item, in catalogue order."""
        return IdLists.stored(self.arrays, f"list:{name}")

    def save(self, path: str | Path) -> Path:
        return write_npz(path, self.arrays, self.meta)

    @classmethod
    def load(cls, path: str | Path) -> IndexArrays:
        """Read an index file; one written before ``meta`` existed reads as the unified
        features, catalogue only."""
        hint = f"build it with `python -m model.retrieval_index DATA -o {path}`"
        arrays, meta = read_npz(path, "retrieval index", hint)
        if "items" not in arrays:
            raise RetrievalError(f"retrieval index {path} has no 'items' array")
        if not meta:  # format 1: features stored under their bare names
            meta = {"format": 1, "features": list(UNIFIED_ITEM_FEATURES)}
            for name in UNIFIED_ITEM_FEATURES:
                if name in arrays:
                    arrays[f"feat:{name}"] = arrays.pop(name)
        return cls(arrays, meta)


def write_npz(path: str | Path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Arrays + JSON metadata as one ``.npz`` (no pickles)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
    return path


def read_npz(path: str | Path, what: str, hint: str = "") -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, metadata ({} when the file has none)) of a ``write_npz`` file;
    :class:`RetrievalError` naming ``what`` and the path when it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise RetrievalError(
            f"{what} {path} does not exist" + (f"; {hint}" if hint else "")
        ) from None
    except (ValueError, OSError) as exc:  # not an npz, truncated, or pickled objects
        raise RetrievalError(f"{what} {path} cannot be read: {exc}") from None
    meta = json.loads(str(arrays.pop("meta"))) if "meta" in arrays else {}
    return arrays, meta


# --------------------------------------------------------------------------- reading


def open_source(
    source: Sequence[str | Path] | pa.Table | ds.Dataset,
) -> tuple[pa.Table | ds.Dataset, str]:
    """Training rows as a table or a lazy parquet dataset, and how to name them in errors."""
    if isinstance(source, pa.Table | ds.Dataset):
        return source, "table"
    paths = [str(s) for s in source]
    try:
        return ds.dataset(paths if len(paths) > 1 else paths[0], format="parquet"), (
            f"parquet at {paths}"
        )
    except (FileNotFoundError, pa.ArrowInvalid) as exc:
        raise RetrievalError(f"cannot read parquet from {paths}: {exc}") from None


def read_table(
    source: Sequence[str | Path] | pa.Table | ds.Dataset, columns: IndexColumns
) -> tuple[pa.Table, dict[str, str]]:
    """The index's columns that ``source`` has, and {column: why it is left out}."""
    data, where = open_source(source)
    names = set(data.schema.names)
    if columns.item not in names:
        raise RetrievalError(
            f"{where} has no item column {columns.item!r} (dataset.catalogue.item_column): "
            f"a retrieval index needs one"
        )
    present = [c for c in columns.wanted() if c in names]
    skipped = {c: "not in the data" for c in columns.wanted() if c not in names}
    table = data.select(present) if isinstance(data, pa.Table) else data.to_table(present)
    for name in columns.features:
        if name in present and not _is_scalar(table.schema.field(name).type):
            skipped[name] = f"type {table.schema.field(name).type}: not a scalar item feature"
    for name in columns.lists:
        t = table.schema.field(name).type if name in present else None
        if t is not None and not (pa.types.is_list(t) or pa.types.is_large_list(t)):
            skipped[name] = f"type {t}: not a list item feature"
    return table, skipped


def _is_scalar(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or is_string_type(t)


def _ids(col: pa.ChunkedArray) -> np.ndarray:
    """int64 ids, nulls -> 0; string ids hashed as the feature path hashes them."""
    if is_string_type(col.type):
        return string_ids(col)
    return pc.fill_null(col.cast(pa.int64()), 0).to_numpy()


def _id_lists(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list column -> (flat int64 ids, parent row of each)."""
    arr = col.combine_chunks()
    flat = arr.flatten()
    values = string_ids(flat) if is_string_type(flat.type) else _ids(pa.chunked_array([flat]))
    return values, pc.list_parent_indices(arr).to_numpy()


def _values(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A scalar feature column -> (values, whether each is a real value, not missing).

    Floats: float32, null -> NaN, missing = NaN. Ids: int64, null -> 0 (the placeholder),
    missing = 0.
    """
    if pa.types.is_floating(col.type):
        v = pc.fill_null(col.cast(pa.float32()), np.nan).to_numpy()
        return v, ~np.isnan(v)
    v = _ids(col)
    return v, v != 0


# --------------------------------------------------------------------------- building


def row_rank(t: pa.Table, time: str | None, skipped: dict[str, str]) -> np.ndarray:
    """(n,) newer rows rank higher: by the time column, else by row order (noted in
    ``skipped`` when the time column has an unusable type)."""
    rank = np.arange(t.num_rows)
    if time in t.column_names:
        tcol = t[time]
        if pa.types.is_timestamp(tcol.type) or pa.types.is_integer(tcol.type):
            times = pc.fill_null(pc.cast(tcol, pa.int64()), -(2**62)).to_numpy()
            rank = np.argsort(np.argsort(times, kind="stable"), kind="stable")
        else:
            skipped[time] = f"type {tcol.type}: newest rows are taken in row order"
    return rank


def _csr(keys: np.ndarray, values: np.ndarray, weights: np.ndarray, top: int):
    """Group (key, value) pairs: per key, values by summed weight desc, at most ``top``.

    Returns (unique keys, indptr, values, weights) in CSR form.
    """
    if keys.size == 0:
        z = np.zeros(0, np.int64)
        return z, np.zeros(1, np.int64), z, np.zeros(0, np.float32)
    o = np.lexsort((values, keys))  # by key, then value (np.unique(axis=0) is ~50x slower)
    k, v = keys[o], values[o]
    starts = np.flatnonzero(np.r_[True, (k[1:] != k[:-1]) | (v[1:] != v[:-1])])
    k, v = k[starts], v[starts]  # distinct pairs
    w = np.add.reduceat(np.asarray(weights, np.float64)[o], starts)  # summed per pair
    order = np.lexsort((-w, k))  # by key, then weight desc (ties: value asc)
    k, v, w = k[order], v[order], w[order]
    ukeys, start, counts = np.unique(k, return_index=True, return_counts=True)
    keep = np.arange(len(k)) - np.repeat(start, counts) < top
    v, w = v[keep], w[keep]
    kept = np.minimum(counts, top)
    indptr = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
    return ukeys.astype(np.int64), indptr, v.astype(np.int64), w.astype(np.float32)


def build_index(
    source: Sequence[str | Path] | pa.Table | ds.Dataset,
    out: str | Path | None = None,
    columns: IndexColumns | None = None,
    window: int = 3,
    neighbours: int = 50,
    per_token: int = 200,
) -> IndexArrays:
    """Build the index from training rows; write it to ``out`` when given."""
    columns = columns or IndexColumns()
    t, skipped = read_table(source, columns)
    if t.num_rows == 0:
        raise RetrievalError("no rows to build the retrieval index from")
    has = set(t.column_names)
    item = _ids(t[columns.item])
    n = len(item)
    label = (
        np.nan_to_num(pc.cast(t[columns.label], pa.float64()).to_numpy(zero_copy_only=False))
        if columns.label in has
        else np.zeros(n)
    )
    rank = row_rank(t, columns.time, skipped)
    items, pos = np.unique(item, return_inverse=True)  # pos: row -> catalogue position
    popularity = np.bincount(pos, weights=(label > 0) + 0.1, minlength=len(items))
    arrays: dict[str, np.ndarray] = {
        "items": items.astype(np.int64),
        "popularity": popularity.astype(np.float32),
    }

    # catalogue features: each item's newest non-missing value over all rows
    features = [c for c in columns.features if c in has and c not in skipped]
    values = {c: _values(t[c]) for c in features}
    for name, (v, real) in values.items():
        fill = np.nan if v.dtype.kind == "f" else 0
        col = np.full(len(items), fill, dtype=v.dtype)
        g, rows = newest(pos, rank, np.flatnonzero(real))
        col[g] = v[rows]
        arrays[f"feat:{name}"] = col

    # content lists: each item's newest non-empty list (content describes the item)
    lists = [c for c in columns.lists if c in has and c not in skipped]
    for name in lists:
        stored = newest_lists(IdLists.from_arrow(t[name]), pos, rank, len(items))
        arrays.update(stored.arrays(f"list:{name}"))

    # per task_type: the item's newest row of that task_type, as training saw it
    tt_names: list[str] = []
    if columns.task_type in has:
        tt = pc.fill_null(t[columns.task_type].cast(pa.string()), "").to_numpy(zero_copy_only=False)
        tt_names, tt_code = np.unique(tt.astype(str), return_inverse=True)
        tt_names = [str(x) for x in tt_names]
        key = tt_code.astype(np.int64) * len(items) + pos  # (task_type, item) groups
        g, rows = newest(key, rank, np.arange(n))  # sorted by task_type, then position
        code = g // len(items)
        arrays["tt_names"] = np.array(tt_names, dtype=str)
        arrays["tt_indptr"] = np.searchsorted(code, np.arange(len(tt_names) + 1)).astype(np.int64)
        arrays["tt_pos"] = (g % len(items)).astype(np.int64)
        for name, (v, _) in values.items():
            arrays[f"tt:{name}"] = v[rows]
    else:
        tt = None
        skipped.setdefault("per_task_type_features", "no task_type column")

    # co-occurrence: pairs within ``window`` positions of one sequence, both directions
    src, dst = [], []
    if columns.sequence in has:
        flat, row = _id_lists(t[columns.sequence])
        for d in range(1, window + 1):
            same = row[d:] == row[:-d]
            src += [flat[:-d][same], flat[d:][same]]
            dst += [flat[d:][same], flat[:-d][same]]
    if columns.source_item in has and tt is not None:
        rel = (tt == RELATED_TASK_TYPE) & (label > 0)
        source_item = _ids(t[columns.source_item])
        src += [source_item[rel], item[rel]]
        dst += [item[rel], source_item[rel]]
    a = np.concatenate(src) if src else np.zeros(0, np.int64)
    b = np.concatenate(dst) if dst else np.zeros(0, np.int64)
    ok = (a != b) & np.isin(b, items) & (a != 0) & (b != 0)
    for k, v in zip(
        ("keys", "indptr", "items", "weight"),
        _csr(a[ok], b[ok], np.ones(int(ok.sum())), neighbours),
        strict=True,
    ):
        arrays[f"co_{k}"] = v

    # inverted index: token -> items shown for it (a positive counts 10 shows)
    if columns.query in has:
        tok, qrow = _id_lists(t[columns.query])
    else:
        tok, qrow = np.zeros(0, np.int64), np.zeros(0, np.int64)
    inv = _csr(tok, item[qrow], 1.0 + 9.0 * (label[qrow] > 0), per_token)
    for k, v in zip(("keys", "indptr", "items", "weight"), inv, strict=True):
        arrays[f"tok_{k}"] = v

    meta = {
        "format": FORMAT_VERSION,
        "columns": {k: v for k, v in asdict(columns).items() if k not in ("features", "lists")},
        "features": features,
        "lists": lists,
        "task_types": tt_names,
        "skipped": skipped,
        "rows": n,
    }
    index = IndexArrays(arrays, meta)
    if out is not None:
        index.save(out)
    return index


def main(argv: list[str] | None = None) -> int:
    from model.config import ConfigError, load_config

    p = argparse.ArgumentParser(prog="python -m model.retrieval_index", description=__doc__)
    p.add_argument("data", nargs="+", help="training parquet files / directories")
    p.add_argument("-o", "--output", required=True, help="where to write the .npz index")
    p.add_argument("--config", help="project config whose dataset names the columns")
    p.add_argument("--window", type=int, default=3)
    p.add_argument("--neighbours", type=int, default=50)
    a = p.parse_args(argv)
    try:
        columns = IndexColumns.from_config(load_config(a.config).dataset) if a.config else None
        index = build_index(a.data, a.output, columns, window=a.window, neighbours=a.neighbours)
    except (RetrievalError, ConfigError) as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"retrieval index: {len(index)} items -> {a.output}")
    if index.meta["skipped"]:
        print(f"left out: {index.meta['skipped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
