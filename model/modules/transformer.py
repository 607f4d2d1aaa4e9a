"""A pre-LayerNorm transformer block, shared by the sequence encoder and field attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, ffn_mult: int = 2):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """x (B, L, D); allowed (B, 1, L, L) bool, True where query may attend to key."""
        b, length, d = x.shape
        h = self.num_heads
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)  # 3 x (B, L, D)
        q = q.reshape(b, length, h, d // h).transpose(1, 2)  # (B, H, L, Dh)
        k = k.reshape(b, length, h, d // h).transpose(1, 2)
        v = v.reshape(b, length, h, d // h).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, H, L, Dh)
        a = a.transpose(1, 2).reshape(b, length, d)  # (B, L, D)
        x = x + self.drop(self.proj(a))
        return x + self.drop(self.ffn(self.norm2(x)))


class TransformerStack(nn.Module):
    """Blocks that may run in reduced precision (``compute_dtype``), returning float32."""

    heavy = True

    def __init__(self, dim: int, num_layers: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(
            [TransformerBlock(dim, num_heads, dropout) for _ in range(num_layers)]
        )
        self.compute_dtype = torch.float32

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        for block in self.blocks:
            x = block(x, allowed)
        return x.float()
