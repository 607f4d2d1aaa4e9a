"""Embeddings of every input field: categorical ids, list ids, numerics, task_type.

All categorical tables live in ONE ``nn.Embedding`` (TorchRec-style fused table): table t
occupies rows [offset_t, offset_t + rows_t). One lookup serves all single-valued fields, the
per-field offsets are a buffer, and features that ``share_with`` another feature (item_id,
source_item_id, seq_item_ids) simply use the same offset — the same rows.
"""

from collections.abc import Mapping, Sequence

import torch
from torch import nn


class FusedEmbeddings(nn.Module):
    multi_names: list[str]  # class-level: TorchScript needs the type even when empty
    multi_offsets: list[int]  # class-level: TorchScript needs the type even when empty

    def __init__(
        self,
        table_rows: Mapping[str, int],
        sparse_tables: Sequence[str],
        multi_names: Sequence[str],
        multi_tables: Sequence[str],
        seq_table: str | None,
        dim: int,
        sparse: bool = False,
    ):
        super().__init__()
        offsets, total = {}, 0
        for name, rows in table_rows.items():
            offsets[name] = total
            total += rows
        self.offsets = dict(offsets)  # table -> first row, for inspection / tests
        # sparse=True: gradients touch only the looked-up rows (pair with torch.optim.SparseAdam
        # for this table); about 1.5x faster training steps with 1M-row tables on CPU.
        self.table = nn.Embedding(total, dim, sparse=sparse)
        # Small init: many fields are summed / crossed downstream; N(0, 1) would saturate.
        nn.init.normal_(self.table.weight, std=0.05)
        self.register_buffer(
            "sparse_offsets", torch.tensor([offsets[t] for t in sparse_tables], dtype=torch.long)
        )
        self.multi_names = list(multi_names)
        self.multi_offsets = [offsets[t] for t in multi_tables]
        self.seq_offset = offsets[seq_table] if seq_table is not None else 0

    def sparse(self, ids: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, F, D)
        return self.table(ids + self.sparse_offsets)

    def pooled(self, multi: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Masked mean of each list feature (0 = padding); an empty list gives zeros."""
        out: list[torch.Tensor] = []
        for i, name in enumerate(self.multi_names):
            ids = multi[name]  # (B, M)
            keep = (ids != 0).unsqueeze(-1).to(self.table.weight.dtype)  # (B, M, 1)
            e = self.table(ids + self.multi_offsets[i]) * keep  # (B, M, D)
            out.append(e.sum(1) / keep.sum(1).clamp_min(1.0))  # (B, D)
        return out

    def sequence(self, items: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, D)
        return self.table(items + self.seq_offset)


class NumericEmbedding(nn.Module):
    """Each normalized numeric x_n becomes a field x_n * w_n + b_n (AutoInt-style)."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num, dim) * 0.05)  # (N, D)
        self.bias = nn.Parameter(torch.zeros(num, dim))  # (N, D)

    def forward(self, dense: torch.Tensor) -> torch.Tensor:  # (B, N) -> (B, N, D)
        return dense.unsqueeze(-1) * self.weight + self.bias
