"""DCNv2 cross network (Wang et al. 2021): x_{l+1} = x_0 * (W_l x_l + b_l) + x_l.

Full-rank W_l is (d, d); the low-rank variant factorizes it as U_l V_l^T with rank r << d,
which is what makes DCNv2 affordable on wide inputs.
"""

from __future__ import annotations

import torch
from torch import nn


class CrossNetV2(nn.Module):
    heavy = True

    def __init__(self, in_dim: int, num_layers: int, low_rank: int | None, out_dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(num_layers):
            if low_rank is None:
                layers.append(nn.Linear(in_dim, in_dim))
            else:
                layers.append(
                    nn.Sequential(
                        nn.Linear(in_dim, low_rank, bias=False), nn.Linear(low_rank, in_dim)
                    )
                )
        self.layers = nn.ModuleList(layers)
        self.out = nn.Linear(in_dim, out_dim)
        self.compute_dtype = torch.float32

    def forward(self, fields: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        x0 = flat.to(self.compute_dtype)  # (B, K*D)
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x  # (B, K*D)
        return self.out(x).float()  # (B, H)
