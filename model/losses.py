"""The training face: weighted sum over tasks of masked, sample-weighted per-task losses.

    L = sum_t w_t * sum_i(s_i m_it l(z_it, y_it)) / sum_i(s_i m_it)

w_t = TaskSpec.weight, s_i = sample weight, m_it = 0 where task t's label is null for row i
(so it contributes nothing to that task), l = BCE-with-logits or MSE per TaskSpec.loss.
A task with no observed label in the batch contributes exactly 0 (and no NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.config import TaskSpec, UnirankConfig


def task_loss(
    logits: torch.Tensor,  # (B,)
    labels: torch.Tensor,  # (B,)
    mask: torch.Tensor,  # (B,) bool
    weight: torch.Tensor,  # (B,)
    kind: str,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    logits = logits.float()
    if kind == "bce":
        # Smoothing pulls targets towards 0.5: y' = y (1 - eps) + eps / 2.
        y = labels * (1.0 - label_smoothing) + 0.5 * label_smoothing
        per_row = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    elif kind == "mse":
        per_row = (logits - labels) ** 2
    else:
        raise ValueError(f"unknown loss {kind!r}, expected 'bce' or 'mse'")
    w = weight * mask.float()  # (B,)
    # where(), not multiply: a NaN label under a False mask must not leak NaN into the sum.
    per_row = torch.where(mask, per_row, torch.zeros_like(per_row))
    return (per_row * w).sum() / w.sum().clamp_min(1e-12)


def multitask_loss(
    logits: dict[str, torch.Tensor],
    labels: torch.Tensor,  # (B, T) in task order
    label_mask: torch.Tensor,  # (B, T) bool
    weight: torch.Tensor,  # (B,)
    tasks: Sequence[TaskSpec],
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns (total loss, per-task losses detached for logging)."""
    total = torch.zeros((), device=labels.device)
    per_task: dict[str, torch.Tensor] = {}
    for j, t in enumerate(tasks):
        lt = task_loss(
            logits[t.name], labels[:, j], label_mask[:, j], weight, t.loss, label_smoothing
        )
        per_task[t.name] = lt.detach()
        total = total + t.weight * lt
    return total, per_task


class MultiTaskLoss(nn.Module):
    """The loss built from config: ``loss, per_task = criterion(model(*b.inputs()), b)``."""

    def __init__(self, tasks: Sequence[TaskSpec], label_smoothing: float = 0.0):
        super().__init__()
        self.tasks = list(tasks)
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, cfg: UnirankConfig) -> MultiTaskLoss:
        return cls(cfg.dataset.tasks, cfg.model.label_smoothing)

    def forward(self, logits: dict[str, torch.Tensor], batch) -> tuple[torch.Tensor, dict]:
        return multitask_loss(
            logits, batch.labels, batch.label_mask, batch.weight, self.tasks, self.label_smoothing
        )
