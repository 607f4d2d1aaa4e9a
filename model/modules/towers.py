"""One tower per task: MLP -> one logit."""

from collections.abc import Sequence

import torch
from torch import nn

from model.modules.mlp import MLP


class Towers(nn.Module):
    task_names: list[str]  # class-level: TorchScript needs the type even when empty

    def __init__(self, in_dim: int, dims: Sequence[int], task_names: Sequence[str], dropout: float):
        super().__init__()
        self.task_names = list(task_names)
        towers = []
        for _ in task_names:
            mlp = MLP(in_dim, dims, dropout)
            towers.append(nn.Sequential(mlp, nn.Linear(mlp.out_dim, 1)))
        self.towers = nn.ModuleList(towers)

    def forward(self, xs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, tower in enumerate(self.towers):
            out[self.task_names[i]] = tower(xs[i]).squeeze(-1)  # (B,) logits
        return out
