"""The model's typed batch, and padding to fixed shape buckets for serving."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


@dataclass
class Batch:
    """One columnar batch after the feature path (model.features.FeatureProcessor).

    Column order of ``sparse`` / ``dense`` / ``labels`` is the processor's ``layout``
    (``sparse_names`` / ``numeric_names`` / ``task_names``). Sequences are left-padded: the
    newest event is always at position L-1, padding (mask False) at the front.
    """

    sparse: torch.Tensor  # (B, F) int64 bucket ids of single-valued categorical features
    multi: dict[str, torch.Tensor]  # name -> (B, M) int64 bucket ids, 0 = padding
    dense: torch.Tensor  # (B, N) float32, normalized, nulls -> 0
    seq_items: torch.Tensor  # (B, L) int64 bucket ids (table of sequence.share_with)
    seq_types: torch.Tensor  # (B, L) int64 event types
    seq_gaps: torch.Tensor  # (B, L) float32 seconds between the event and event_time, >= 0
    seq_mask: torch.Tensor  # (B, L) bool, True = real event
    task_type: torch.Tensor  # (B,) int64, 0 = unknown task_type
    labels: torch.Tensor  # (B, T) float32, 0 where unobserved
    label_mask: torch.Tensor  # (B, T) bool, False where the label is null / NaN
    weight: torch.Tensor  # (B,) float32 sample weight

    def __len__(self) -> int:
        return int(self.sparse.shape[0])

    def inputs(self) -> tuple:
        """Positional arguments of ``UnirankModel.forward`` / the exported predictor."""
        return (
            self.sparse,
            self.multi,
            self.dense,
            self.seq_items,
            self.seq_types,
            self.seq_gaps,
            self.seq_mask,
            self.task_type,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def _map(self, fn) -> Batch:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = {k: fn(t) for k, t in v.items()} if isinstance(v, dict) else fn(v)
        return Batch(**out)


def shape_bucket(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n; beyond the largest bucket, the next multiple of it."""
    if n <= 0:
        raise ValueError(f"batch of {n} rows cannot be bucketed")
    ordered = sorted(buckets)
    for b in ordered:
        if n <= b:
            return b
    top = ordered[-1]
    return -(-n // top) * top


def pad_batch(batch: Batch, size: int) -> Batch:
    """Pad every tensor along dim 0 up to ``size`` rows with zeros (masks False, weight 0).

    Padded rows look like an unknown task_type with no features and no events; their
    outputs are meaningless and must be dropped by the caller (``[:len(original)]``).
    """
    n = len(batch)
    if size < n:
        raise ValueError(f"pad_batch: size {size} < batch rows {n}")
    if size == n:
        return batch

    def pad(t: torch.Tensor) -> torch.Tensor:
        # F.pad pads from the last dim backwards: (0, 0) per trailing dim, then (0, extra) on dim 0.
        return F.pad(t, (0, 0) * (t.dim() - 1) + (0, size - n))

    return batch._map(pad)
