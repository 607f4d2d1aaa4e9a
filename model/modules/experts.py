"""Per-task inputs for the towers (ModelConfig.experts.kind), against negative transfer.

* none: plain shared bottom, every tower reads the same vector;
* mmoe: Multi-gate Mixture-of-Experts (Ma et al. 2018), one softmax gate per task over E
  shared experts;
* ple: one CGC level of Progressive Layered Extraction (Tang et al. 2020): each task gates
  over its own specific experts plus the shared ones, so a sparse task (checkout) cannot
  be drowned by a dense one (click) in a shared expert it does not need.

Signature: (z (B, in)) -> T x (B, out).
"""

from __future__ import annotations

import torch
from torch import nn

from model.modules.mlp import MLP


class NoExperts(nn.Module):
    def __init__(self, in_dim: int, num_tasks: int):
        super().__init__()
        self.num_tasks = num_tasks
        self.out_dim = in_dim

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        return [z for _ in range(self.num_tasks)]


def _mix(experts: list[torch.Tensor], gate: torch.Tensor) -> torch.Tensor:
    return (torch.stack(experts, 1) * gate.unsqueeze(-1)).sum(1)  # (B, E, H) x (B, E) -> (B, H)


class MMoE(nn.Module):
    def __init__(self, in_dim: int, num_experts: int, hidden: int, num_tasks: int, dropout: float):
        super().__init__()
        self.experts = nn.ModuleList([MLP(in_dim, [hidden], dropout) for _ in range(num_experts)])
        self.gates = nn.ModuleList([nn.Linear(in_dim, num_experts) for _ in range(num_tasks)])
        self.out_dim = hidden

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        experts = [e(z) for e in self.experts]  # E x (B, H)
        return [_mix(experts, torch.softmax(g(z), -1)) for g in self.gates]


class PLE(nn.Module):
    def __init__(
        self,
        in_dim: int,
        num_specific: int,
        num_shared: int,
        hidden: int,
        num_tasks: int,
        dropout: float,
    ):
        super().__init__()
        self.num_tasks, self.num_specific = num_tasks, num_specific
        self.shared = nn.ModuleList([MLP(in_dim, [hidden], dropout) for _ in range(num_shared)])
        self.specific = nn.ModuleList(
            [MLP(in_dim, [hidden], dropout) for _ in range(num_tasks * num_specific)]
        )
        self.gates = nn.ModuleList(
            [nn.Linear(in_dim, num_specific + num_shared) for _ in range(num_tasks)]
        )
        self.out_dim = hidden

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        shared = [e(z) for e in self.shared]  # S x (B, H)
        specific = [e(z) for e in self.specific]  # T*E x (B, H), task-major
        out: list[torch.Tensor] = []
        for t, gate in enumerate(self.gates):
            own = specific[t * self.num_specific : (t + 1) * self.num_specific]
            out.append(_mix(own + shared, torch.softmax(gate(z), -1)))
        return out
