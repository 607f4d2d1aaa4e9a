"""The one feature path: a columnar batch in the unified schema -> the model's typed Batch.

Training (Ray Data ``map_batches`` / ``iter_torch_batches`` collate), evaluation and Ray Serve
all call :class:`FeatureProcessor`; hashing, vocabularies, normalization statistics,
truncation and padding live here once and travel with the exported model as JSON.

Inputs: a ``pyarrow.Table`` / ``RecordBatch``, or a dict of columns as numpy arrays (list
columns as object arrays of arrays / lists, or lists of lists, or 2-D arrays) — what Ray
Data's ``batch_format="numpy"`` and a JSON request produce — or a pandas DataFrame. All give
identical Batches.

Everything is vectorized: list columns become (flat values, starts, lengths) and are gathered
into fixed-width matrices with one fancy-indexing step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from model.batch import Batch
from model.config import CategoricalFeature, DatasetConfig
from model.hashing import clip_vocab, hash_ids, is_string_type, string_ids

Columns = pa.Table | pa.RecordBatch | Mapping[str, Any]
STATE_VERSION = 1
_EMPTY = np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class FeatureLayout:
    """Column order of a Batch and the embedding tables behind it (the model reads this)."""

    sparse_names: tuple[str, ...]  # single-valued categorical features, Batch.sparse order
    multi_names: tuple[str, ...]  # list-valued categorical features (Batch.multi keys)
    multi_len: dict[str, int]  # multi feature -> fixed padded width
    table_of: dict[str, str]  # every categorical feature -> the feature owning its table
    table_rows: dict[str, int]  # table owner -> rows (hash_buckets or vocab_size)
    numeric_names: tuple[str, ...]
    task_names: tuple[str, ...]
    task_types: tuple[str, ...]  # index 0 is "<unknown>", then DatasetConfig.task_types
    seq_len: int  # 0 when the spec has no sequence
    seq_table: str | None  # table of the sequence item ids
    num_event_types: int


def _root(name: str, by_name: dict[str, CategoricalFeature]) -> str:
    seen = [name]
    while by_name[name].share_with is not None:
        name = by_name[name].share_with
        if name in seen:
            raise ValueError(f"share_with cycle: {' -> '.join(seen + [name])}")
        seen.append(name)
    return name


def feature_layout(cfg: DatasetConfig) -> FeatureLayout:
    f = cfg.features
    by_name = {c.name: c for c in f.categorical}
    table_of = {c.name: _root(c.name, by_name) for c in f.categorical}
    table_rows = {}
    for owner in dict.fromkeys(table_of.values()):
        c = by_name[owner]
        table_rows[owner] = c.hash_buckets if c.hash_buckets is not None else c.vocab_size
    seq = f.sequence
    return FeatureLayout(
        sparse_names=tuple(c.name for c in f.categorical if not c.multi),
        multi_names=tuple(c.name for c in f.categorical if c.multi),
        multi_len={c.name: c.max_len for c in f.categorical if c.multi},
        table_of=table_of,
        table_rows=table_rows,
        numeric_names=tuple(n.name for n in f.numeric),
        task_names=tuple(t.name for t in cfg.tasks),
        task_types=("<unknown>", *cfg.task_types),
        seq_len=seq.max_len if seq is not None else 0,
        seq_table=table_of[seq.share_with] if seq is not None else None,
        num_event_types=seq.num_event_types if seq is not None else 1,
    )


# --------------------------------------------------------------------------- column access


class _Lists:
    """A list column as flat values plus per-row (start, length)."""

    __slots__ = ("values", "starts", "lengths")

    def __init__(self, values: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
        self.values, self.starts, self.lengths = values, starts, lengths


def _arrow(col: Any) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    return col


class _Reader:
    """Uniform, vectorized access to the columns of an arrow table or a dict of arrays."""

    def __init__(self, columns: Columns):
        if isinstance(columns, (pa.Table, pa.RecordBatch)):
            self.cols: Mapping[str, Any] = {n: columns.column(n) for n in columns.schema.names}
            self.n = columns.num_rows
        elif isinstance(columns, Mapping):
            self.cols = columns
            self.n = len(next(iter(columns.values()))) if columns else 0
        elif hasattr(columns, "columns") and hasattr(columns, "to_numpy"):  # pandas DataFrame
            self.cols = {str(c): columns[c].to_numpy() for c in columns.columns}
            self.n = len(columns)
        else:
            raise TypeError(
                f"FeatureProcessor: expected a pyarrow Table/RecordBatch, a dict of columns or "
                f"a pandas DataFrame, "
                f"got {type(columns).__name__}"
            )

    def has(self, name: str | None) -> bool:
        return name is not None and name in self.cols

    def _check(self, name: str, got: int) -> None:
        if got != self.n:
            raise ValueError(f"column {name!r} has {got} rows, expected {self.n}")

    def floats(self, name: str) -> np.ndarray:
        """float64 (n,), NaN where null."""
        col = self.cols[name]
        if isinstance(col, (pa.Array, pa.ChunkedArray)):
            out = _arrow(col).cast(pa.float64()).to_numpy(zero_copy_only=False)
        else:
            arr = np.asarray(col)
            if arr.dtype == object:  # None in a JSON list
                arr = np.array([np.nan if v is None else v for v in arr], dtype=np.float64)
            out = arr.astype(np.float64, copy=False)
        self._check(name, len(out))
        return out

    def ints(self, name: str) -> np.ndarray:
        """int64 (n,), nulls -> 0. String columns (string, large_string, dictionary) become
        stable ids (``model.hashing.string_ids``)."""
        col = self.cols[name]
        if isinstance(col, (pa.Array, pa.ChunkedArray)):
            if is_string_type(col.type):
                out = string_ids(col)
            else:
                out = _arrow(col).fill_null(0).cast(pa.int64()).to_numpy(zero_copy_only=False)
        else:
            arr = np.asarray(col)
            if arr.dtype.kind in "US" or (
                arr.dtype == object and any(isinstance(v, str) for v in arr)
            ):
                arr = string_ids(pa.array([None if v is None else str(v) for v in arr]))
            elif arr.dtype == object:
                arr = np.array([0 if v is None else v for v in arr], dtype=np.int64)
            elif arr.dtype.kind == "f":
                arr = np.nan_to_num(arr, nan=0.0)
            out = arr.astype(np.int64, copy=False)
        self._check(name, len(out))
        return out

    def lists(self, name: str) -> _Lists:
        col = self.cols[name]
        if isinstance(col, (pa.Array, pa.ChunkedArray)):
            return self._arrow_lists(name, _arrow(col))
        if isinstance(col, np.ndarray) and col.dtype != object and col.ndim == 2:
            # Ray Data gives equal-length lists as one 2-D tensor column.
            b, m = col.shape
            self._check(name, b)
            return _Lists(
                col.astype(np.int64).ravel(),
                np.arange(b, dtype=np.int64) * m,
                np.full(b, m, dtype=np.int64),
            )
        rows = list(col)
        if any(v is None for v in rows):  # a null list is an empty list
            rows = [_EMPTY if v is None else v for v in rows]
        self._check(name, len(rows))
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        if lengths.sum() == 0:
            values = np.zeros(0, dtype=np.int64)
        else:
            # One C-level pass over all rows; "unsafe" only lets empty (float64) rows through.
            values = np.concatenate(rows, dtype=np.int64, casting="unsafe")
        starts = np.zeros(len(rows), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        return _Lists(values, starts, lengths)

    def _arrow_lists(self, name: str, arr: pa.Array) -> _Lists:
        self._check(name, len(arr))
        t = arr.type
        if pa.types.is_fixed_size_list(t):
            m = t.list_size
            flat = arr.flatten().fill_null(0).cast(pa.int64()).to_numpy(zero_copy_only=False)
            starts = np.arange(len(arr), dtype=np.int64) * m
            lengths = np.full(len(arr), m, dtype=np.int64)
            if arr.null_count:
                lengths[arr.is_null().to_numpy(zero_copy_only=False)] = 0
                if len(flat) != len(arr) * m:  # flatten() skipped the null rows
                    flat = _refill(flat, len(arr), m, lengths)
            return _Lists(flat, starts, lengths)
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
            raise TypeError(f"column {name!r} has type {t}, expected list<int64>")
        # .offsets honours a slice of the array; .values is the whole child, which the
        # offsets index into, so the two stay consistent without copying.
        offsets = arr.offsets.to_numpy().astype(np.int64, copy=False)
        values = arr.values.fill_null(0).cast(pa.int64()).to_numpy(zero_copy_only=False)
        starts = offsets[:-1].copy()
        lengths = np.diff(offsets)
        if arr.null_count:  # a null list is empty, whatever its offsets say
            lengths[arr.is_null().to_numpy(zero_copy_only=False)] = 0
        return _Lists(values, starts, lengths)

    def strings(self, name: str) -> pa.Array:
        col = self.cols[name]
        if isinstance(col, (pa.Array, pa.ChunkedArray)):
            arr = _arrow(col)
        else:
            arr = pa.array([None if v is None else str(v) for v in np.asarray(col, dtype=object)])
        self._check(name, len(arr))
        return arr.cast(pa.string())

    def seconds(self, name: str) -> np.ndarray:
        """A timestamp (any unit / tz) or int-seconds column -> int64 seconds (n,); null -> min."""
        col = self.cols[name]
        null = np.iinfo(np.int64).min
        if isinstance(col, (pa.Array, pa.ChunkedArray)):
            arr = _arrow(col)
            scale = 1
            if pa.types.is_timestamp(arr.type):
                scale = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[arr.type.unit]
                arr = arr.cast(pa.int64())
            ints = arr.cast(pa.int64())
            out = ints.fill_null(0).to_numpy(zero_copy_only=False) // scale
            if ints.null_count:
                out[ints.is_null().to_numpy(zero_copy_only=False)] = null
        else:
            a = np.asarray(col)
            if a.dtype.kind == "M":
                sec = a.astype("datetime64[s]")
                out = np.where(np.isnat(sec), null, sec.astype(np.int64))
            elif a.dtype.kind in "iu":
                out = a.astype(np.int64)
            elif a.dtype.kind == "f" or (a.dtype == object and _all_numbers(a)):
                f = np.array([np.nan if v is None else v for v in a], dtype=np.float64)
                out = np.where(np.isnan(f), null, np.nan_to_num(f)).astype(np.int64)
            else:  # strings / datetime objects from a JSON request
                import pandas as pd

                ts = pd.to_datetime(pd.Series(a), utc=True).dt.tz_localize(None)
                sec = ts.to_numpy().astype("datetime64[s]")  # resolution-independent
                out = np.where(np.isnat(sec), null, sec.astype(np.int64))
        self._check(name, len(out))
        return np.asarray(out, dtype=np.int64)


def _all_numbers(a: np.ndarray) -> bool:
    return all(v is None or isinstance(v, (int, float, np.number)) for v in a)


def _refill(flat: np.ndarray, n: int, m: int, lengths: np.ndarray) -> np.ndarray:
    """Fixed-size-list flatten() skips null rows; put zeros back so row i starts at i*m."""
    out = np.zeros(n * m, dtype=np.int64)
    keep = np.repeat(lengths > 0, m)
    out[keep] = flat
    return out


def pad_lists(lists: _Lists, width: int, keep: str) -> tuple[np.ndarray, np.ndarray]:
    """Gather each row's list into a (n, width) matrix.

    keep="newest": the last ``width`` elements, right-aligned (left padding): the newest
    event is at column width-1 whatever the row's length — position means recency.
    keep="first": the first ``width`` elements, left-aligned (right padding).
    Returns (values (n, width) int64 with 0 padding, mask (n, width) bool).
    """
    n = len(lists.lengths)
    k = np.minimum(lists.lengths, width)  # (n,) elements kept per row
    col = np.arange(width, dtype=np.int64)[None, :]  # (1, W)
    if keep == "newest":
        end = lists.starts + lists.lengths  # (n,)
        idx = end[:, None] - width + col  # (n, W) source index, < start for padding
        mask = col >= (width - k)[:, None]
    elif keep == "first":
        idx = lists.starts[:, None] + col
        mask = col < k[:, None]
    else:
        raise ValueError(f"keep must be 'newest' or 'first', got {keep!r}")
    if lists.values.size == 0 or n == 0:
        return np.zeros((n, width), dtype=np.int64), mask
    idx = np.where(mask, idx, 0)
    out = lists.values[idx]
    out[~mask] = 0
    return out, mask


# --------------------------------------------------------------------------- the processor


class FeatureProcessor:
    """Turns columnar batches into Batches; owns hashing, vocabularies and dense statistics.

    ``fit(batches)`` streams over the training split once to collect mean/std of the numeric
    features (nulls ignored); ``state_dict()`` / ``from_state_dict()`` round-trip the
    statistics through JSON so the exported model carries them.
    """

    def __init__(self, cfg: DatasetConfig):
        self.cfg = cfg
        self.layout = feature_layout(cfg)
        f = cfg.features
        self._by_name = {c.name: c for c in f.categorical}
        self._log1p = {n.name: n.log1p for n in f.numeric}
        self._type_ids = {t: i + 1 for i, t in enumerate(cfg.task_types)}
        n = len(f.numeric)
        # Streaming moments per numeric feature (Chan et al. parallel update).
        self._count = np.zeros(n)
        self._mean = np.zeros(n)
        self._m2 = np.zeros(n)

    # ------------------------------------------------------------------ statistics

    @property
    def mean(self) -> np.ndarray:
        return self._mean.copy()

    @property
    def std(self) -> np.ndarray:
        var = np.where(self._count > 1, self._m2 / np.maximum(self._count - 1, 1), 1.0)
        std = np.sqrt(var)
        return np.where(std > 1e-8, std, 1.0)  # a constant column stays as is, not inf

    def fit(self, batches: Iterable[Columns]) -> FeatureProcessor:
        for columns in batches:
            self.partial_fit(columns)
        return self

    def partial_fit(self, columns: Columns) -> FeatureProcessor:
        raw = self._raw_dense(_Reader(columns))  # (n, N), NaN where null
        ok = ~np.isnan(raw)
        nb = ok.sum(0).astype(np.float64)
        safe = np.where(ok, raw, 0.0)
        mb = np.divide(safe.sum(0), nb, out=np.zeros_like(nb), where=nb > 0)
        m2b = (np.where(ok, raw - mb, 0.0) ** 2).sum(0)
        tot = self._count + nb
        delta = mb - self._mean
        frac = np.divide(nb, tot, out=np.zeros_like(nb), where=tot > 0)
        self._mean = self._mean + delta * frac
        self._m2 = self._m2 + m2b + delta**2 * self._count * frac
        self._count = tot
        return self

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "numeric": list(self.layout.numeric_names),
            "count": self._count.tolist(),
            "mean": self._mean.tolist(),
            "m2": self._m2.tolist(),
        }

    @classmethod
    def from_state_dict(cls, cfg: DatasetConfig, state: Mapping) -> FeatureProcessor:
        proc = cls(cfg)
        if list(state["numeric"]) != list(proc.layout.numeric_names):
            raise ValueError(
                f"processor state is for numeric features {state['numeric']}, "
                f"config has {list(proc.layout.numeric_names)}"
            )
        proc._count = np.asarray(state["count"], dtype=np.float64)
        proc._mean = np.asarray(state["mean"], dtype=np.float64)
        proc._m2 = np.asarray(state["m2"], dtype=np.float64)
        return proc

    # ------------------------------------------------------------------ transform

    def __call__(self, columns: Columns) -> Batch:
        return self.transform(columns)

    def transform(self, columns: Columns) -> Batch:
        r = _Reader(columns)
        lay, f = self.layout, self.cfg.features
        sparse = np.zeros((r.n, len(lay.sparse_names)), dtype=np.int64)  # (B, F)
        for j, name in enumerate(lay.sparse_names):
            if r.has(name):
                sparse[:, j] = self._bucketize(name, r.ints(name))
        multi = {}
        for name in lay.multi_names:
            width = lay.multi_len[name]
            if r.has(name):
                ids, _ = pad_lists(r.lists(name), width, keep="first")
                multi[name] = torch.from_numpy(self._bucketize(name, ids))  # (B, M)
            else:
                multi[name] = torch.zeros((r.n, width), dtype=torch.int64)

        raw = self._raw_dense(r)  # (B, N)
        dense = ((raw - self._mean) / self.std).astype(np.float32)
        dense[np.isnan(dense)] = 0.0  # null -> the mean, after normalization

        seq_items, seq_types, seq_gaps, seq_mask = self._sequence(r)
        labels, label_mask = self._labels(r)
        weight = np.ones(r.n, dtype=np.float32)
        if r.has(f.weight_column):
            w = r.floats(f.weight_column)
            weight = np.where(np.isnan(w), 1.0, w).astype(np.float32)
        return Batch(
            sparse=torch.from_numpy(sparse),
            multi=multi,
            dense=torch.from_numpy(dense),
            seq_items=torch.from_numpy(seq_items),
            seq_types=torch.from_numpy(seq_types),
            seq_gaps=torch.from_numpy(seq_gaps),
            seq_mask=torch.from_numpy(seq_mask),
            task_type=torch.from_numpy(self._task_type_ids(r)),
            labels=torch.from_numpy(labels),
            label_mask=torch.from_numpy(label_mask),
            weight=torch.from_numpy(weight),
        )

    def unknown_task_types(self, columns: Columns) -> list[str]:
        """Distinct task_type values not in DatasetConfig.task_types (Serve answers 4xx)."""
        r = _Reader(columns)
        col = self.cfg.features.task_type_column
        if not r.has(col):
            return []
        uniq = pc.unique(r.strings(col)).to_pylist()
        return sorted(str(v) for v in uniq if v not in self._type_ids)

    # ------------------------------------------------------------------ pieces

    def _bucketize(self, name: str, ids: np.ndarray) -> np.ndarray:
        owner = self._by_name[self.layout.table_of[name]]
        if owner.hash_buckets is not None:
            return hash_ids(ids, owner.hash_buckets)
        return clip_vocab(ids, owner.vocab_size)

    def _raw_dense(self, r: _Reader) -> np.ndarray:
        out = np.full((r.n, len(self.layout.numeric_names)), np.nan)  # (B, N)
        for j, name in enumerate(self.layout.numeric_names):
            if r.has(name):
                x = r.floats(name)
                # sign * log1p(|x|): compresses heavy tails, defined for negatives too
                out[:, j] = np.sign(x) * np.log1p(np.abs(x)) if self._log1p[name] else x
        return out

    def _sequence(self, r: _Reader):
        seq, n, length = self.cfg.features.sequence, r.n, self.layout.seq_len
        if seq is None or not r.has(seq.item_column):
            shape = (n, length)
            return (
                np.zeros(shape, np.int64),
                np.zeros(shape, np.int64),
                np.zeros(shape, np.float32),
                np.zeros(shape, bool),
            )
        raw_items, mask = pad_lists(r.lists(seq.item_column), length, keep="newest")  # (B, L)
        items = self._bucketize(seq.share_with, raw_items)
        items[~mask] = 0
        types = np.zeros_like(items)
        if r.has(seq.event_type_column):
            t, _ = pad_lists(r.lists(seq.event_type_column), length, keep="newest")
            types = np.where(mask, clip_vocab(t, seq.num_event_types), 0)
        gaps = np.zeros(items.shape, dtype=np.float32)
        if r.has(seq.timestamp_column):
            ts_lists = r.lists(seq.timestamp_column)
            ts, ts_mask = pad_lists(ts_lists, length, keep="newest")  # (B, L) seconds
            time_col = self.cfg.features.time_column
            if r.has(time_col):
                now = r.seconds(time_col)  # (B,)
            else:
                now = np.iinfo(np.int64).min * np.ones(n, dtype=np.int64)
            # No (or null) event_time: measure gaps from the row's newest event instead.
            missing = now == np.iinfo(np.int64).min
            if missing.any():
                now = np.where(missing, ts[:, -1], now)
            g = (now[:, None] - ts).astype(np.float32)
            gaps = np.where(mask & ts_mask, np.maximum(g, 0.0), 0.0).astype(np.float32)
        return items, types, gaps, mask

    def _labels(self, r: _Reader) -> tuple[np.ndarray, np.ndarray]:
        tasks = self.cfg.tasks
        labels = np.zeros((r.n, len(tasks)), dtype=np.float32)  # (B, T)
        mask = np.zeros((r.n, len(tasks)), dtype=bool)
        for j, t in enumerate(tasks):
            if r.has(t.column):
                y = r.floats(t.column)
                ok = ~np.isnan(y)
                labels[:, j] = np.where(ok, y, 0.0)
                mask[:, j] = ok
        return labels, mask

    def _task_type_ids(self, r: _Reader) -> np.ndarray:
        col = self.cfg.features.task_type_column
        if not r.has(col):
            return np.zeros(r.n, dtype=np.int64)
        known = pa.array(list(self.cfg.task_types), type=pa.string())
        idx = pc.index_in(r.strings(col), value_set=known)  # null where unknown
        return idx.fill_null(-1).cast(pa.int64()).to_numpy(zero_copy_only=False) + 1
