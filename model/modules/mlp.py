"""Plain MLP blocks (shared bottom, experts, towers)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Sequential):
    """Linear -> ReLU -> Dropout per hidden size. ``out_dim`` is dims[-1] (in_dim if empty)."""

    def __init__(self, in_dim: int, dims: Sequence[int], dropout: float = 0.0):
        layers: list[nn.Module] = []
        d = in_dim
        for h in dims:
            layers += [nn.Linear(d, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        super().__init__(*layers)
        self.out_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, out)
        for layer in self:
            x = layer(x)
        return x
