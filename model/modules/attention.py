"""Self-attention over fields (AutoInt-style): every field attends to every other field."""

from __future__ import annotations

import torch
from torch import nn

from model.modules.transformer import TransformerStack


class FieldAttention(nn.Module):
    def __init__(
        self,
        num_fields: int,
        dim: int,
        num_layers: int,
        num_heads: int,
        out_dim: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.stack = TransformerStack(dim, num_layers, num_heads, dropout)
        self.out = nn.Linear(num_fields * dim, out_dim)

    def forward(self, fields: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        h = self.stack(fields, None)  # (B, K, D); no mask: every field is present
        return self.out(h.flatten(1))  # (B, H)
