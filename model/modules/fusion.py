"""Fusion of the backbones' outputs into one representation (ModelConfig.fusion).

All modes share one signature: (outputs: E x (B, H), shared (B, S), task (B, D)) -> (B, H).
"""

from __future__ import annotations

import torch
from torch import nn


class AverageFusion(nn.Module):
    def forward(
        self, outs: list[torch.Tensor], shared: torch.Tensor, task: torch.Tensor
    ) -> torch.Tensor:
        return torch.stack(outs, 1).mean(1)  # (B, E, H) -> (B, H)


class GatingFusion(nn.Module):
    """Per-example softmax weights over backbones, conditioned on the shared representation
    and the task_type embedding: each use-case can lean on the backbone that suits it."""

    def __init__(self, num: int, shared_dim: int, task_dim: int):
        super().__init__()
        self.gate = nn.Linear(shared_dim + task_dim, num)
        nn.init.zeros_(self.gate.weight)  # start as the average, learn to deviate
        nn.init.zeros_(self.gate.bias)

    def forward(
        self, outs: list[torch.Tensor], shared: torch.Tensor, task: torch.Tensor
    ) -> torch.Tensor:
        g = torch.softmax(self.gate(torch.cat([shared, task], -1)), -1)  # (B, E)
        return (torch.stack(outs, 1) * g.unsqueeze(-1)).sum(1)  # (B, H)


class BlendFusion(nn.Module):
    """One learned softmax weight per backbone, the same for every example."""

    def __init__(self, num: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num))

    def forward(
        self, outs: list[torch.Tensor], shared: torch.Tensor, task: torch.Tensor
    ) -> torch.Tensor:
        w = torch.softmax(self.logits, 0)  # (E,)
        return (torch.stack(outs, 1) * w.view(1, -1, 1)).sum(1)  # (B, H)
