"""Lists of int64 ids in CSR form (offsets + values), and the newest row per key.

The retrieval index (item content lists such as title tokens) and the user-profile table
(declared interests) store list columns this way in ``.npz`` files (no pickles), and serving
passes them to the ranker this way: one flat array instead of one small array per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model.hashing import is_string_type, string_ids


@dataclass(frozen=True)
class IdLists:
    """n lists of ids: list i is ``values[offsets[i]:offsets[i+1]]``."""

    offsets: np.ndarray  # (n+1,) int64, non-decreasing, offsets[0] == 0
    values: np.ndarray  # (offsets[-1],) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def empty(cls, n: int) -> IdLists:
        """n empty lists (the placeholder of a list feature)."""
        return cls(np.zeros(n + 1, np.int64), np.zeros(0, np.int64))

    @classmethod
    def from_rows(cls, rows: list) -> IdLists:
        lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        values = (
            np.concatenate([np.asarray(r, np.int64) for r in rows])
            if lengths.sum()
            else np.zeros(0, np.int64)
        )
        return cls(offsets, values)

    @classmethod
    def from_arrow(cls, col: pa.Array | pa.ChunkedArray) -> IdLists:
        """A list column (ints or strings, nulls = empty lists) -> IdLists."""
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int64)
        flat = arr.flatten()  # skips null lists, honours slices
        if is_string_type(flat.type):
            values = string_ids(flat)
        else:
            values = pc.fill_null(flat.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(offsets, np.asarray(values, np.int64))

    def take(self, rows: np.ndarray, present: np.ndarray | None = None) -> IdLists:
        """The lists at ``rows``; where ``present`` is False, an empty list."""
        rows = np.asarray(rows, np.int64)
        lo, hi = self.offsets[rows], self.offsets[rows + 1]
        lengths = hi - lo
        if present is not None:
            lengths = np.where(present, lengths, 0)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        # flat positions: for each output list, lo .. lo + length
        starts = np.repeat(lo - offsets[:-1], lengths)
        idx = starts + np.arange(offsets[-1], dtype=np.int64)
        return IdLists(offsets, self.values[idx])

    def rows(self) -> list[np.ndarray]:
        """One array (a view) per list: what the feature path reads per row."""
        return np.split(self.values, self.offsets[1:-1]) if len(self) else []

    def to_arrow(self) -> pa.LargeListArray:
        """A zero-copy arrow list column (what the feature path reads fastest)."""
        return pa.LargeListArray.from_arrays(pa.array(self.offsets), pa.array(self.values))

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        """The two arrays as stored in an ``.npz`` under ``name``."""
        return {f"{name}:offsets": self.offsets, f"{name}:values": self.values}

    @classmethod
    def stored(cls, arrays: dict[str, np.ndarray], name: str) -> IdLists:
        return cls(arrays[f"{name}:offsets"], arrays[f"{name}:values"])

    @staticmethod
    def concat(parts: list[IdLists]) -> IdLists:
        if not parts:
            return IdLists.empty(0)
        sizes = np.cumsum([0, *(len(p.values) for p in parts)])
        offsets = [parts[0].offsets[:1]] + [
            p.offsets[1:] + s for p, s in zip(parts, sizes[:-1], strict=True)
        ]
        return IdLists(
            np.concatenate(offsets).astype(np.int64), np.concatenate([p.values for p in parts])
        )


def newest(group: np.ndarray, rank: np.ndarray, rows: np.ndarray):
    """Among ``rows``, the newest (highest ``rank``) row of each group: (groups, rows)."""
    g = group[rows]
    o = np.lexsort((rank[rows], g))
    last = np.r_[g[o][1:] != g[o][:-1], True] if len(o) else np.zeros(0, bool)
    return g[o][last], rows[o][last]


def newest_lists(lists: IdLists, group: np.ndarray, rank: np.ndarray, size: int) -> IdLists:
    """Per group 0..size-1, the list of its newest row whose list is not empty (empty when
    it has none): as training rows carried it, without the rows that did not log it."""
    rows = np.flatnonzero(np.diff(lists.offsets) > 0)
    g, r = newest(group, rank, rows)
    at = np.zeros(size, np.int64)
    at[g] = r
    has = np.zeros(size, bool)
    has[g] = True
    return lists.take(at, has) if len(lists) else IdLists.empty(size)
