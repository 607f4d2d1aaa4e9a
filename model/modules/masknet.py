"""MaskNet (Wang et al. 2021): serial MaskBlocks with instance-guided masks.

Each block multiplies its input by a mask generated from the (whole) flat embedding, so
feature interactions are multiplicative and instance-specific, unlike a plain MLP.
"""

from __future__ import annotations

import torch
from torch import nn


class MaskBlock(nn.Module):
    def __init__(self, emb_dim: int, in_dim: int, out_dim: int, reduction: float):
        super().__init__()
        hidden = max(1, int(emb_dim / reduction))
        self.mask = nn.Sequential(nn.Linear(emb_dim, hidden), nn.ReLU(), nn.Linear(hidden, in_dim))
        self.hidden = nn.Linear(in_dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x (B, in), emb (B, K*D) -> (B, out)
        return torch.relu(self.norm(self.hidden(self.mask(emb) * x)))


class MaskNet(nn.Module):
    heavy = True

    def __init__(self, in_dim: int, num_blocks: int, reduction: float, out_dim: int):
        super().__init__()
        dims = [in_dim] + [out_dim] * num_blocks
        self.blocks = nn.ModuleList(
            [MaskBlock(in_dim, dims[i], dims[i + 1], reduction) for i in range(num_blocks)]
        )
        self.compute_dtype = torch.float32

    def forward(self, fields: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        emb = flat.to(self.compute_dtype)  # (B, K*D)
        x = emb
        for block in self.blocks:
            x = block(x, emb)  # (B, H)
        return x.float()
