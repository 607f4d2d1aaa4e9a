"""Masked, weighted multi-task loss."""

import pytest
import torch
import torch.nn.functional as F

from model.config import TaskSpec
from model.losses import multitask_loss, task_loss

pytestmark = pytest.mark.unit


def test_null_labels_contribute_nothing():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, generator=g, requires_grad=True)
    labels = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.float32)
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    weight = torch.ones(8)
    base = task_loss(logits, labels, mask, weight, "bce")
    # Changing labels (even to NaN) and logits of masked rows changes nothing...
    labels2 = labels.clone()
    labels2[4:] = float("nan")
    logits2 = logits.detach().clone()
    logits2[4:] = 100.0
    assert torch.equal(base, task_loss(logits2, labels2, mask, weight, "bce"))
    # ...and masked rows get no gradient.
    base.backward()
    assert (logits.grad[4:] == 0).all() and (logits.grad[:4] != 0).all()
    expected = F.binary_cross_entropy_with_logits(logits[:4], labels[:4])
    torch.testing.assert_close(base, expected)


def test_sample_weights_and_task_weights():
    logits = {"a": torch.tensor([0.5, -1.0, 2.0]), "b": torch.tensor([1.0, 2.0, 3.0])}
    labels = torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, 1.0]])
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    weight = torch.tensor([1.0, 3.0, 0.5])
    tasks = [TaskSpec(name="a", weight=2.0), TaskSpec(name="b", loss="mse", weight=0.5)]
    total, per_task = multitask_loss(logits, labels, mask, weight, tasks)
    bce = F.binary_cross_entropy_with_logits(logits["a"], labels[:, 0], reduction="none")
    la = (bce * weight).sum() / weight.sum()
    lb = (1.0 * (1.0 - 2.0) ** 2 + 0.5 * (3.0 - 1.0) ** 2) / 1.5
    torch.testing.assert_close(per_task["a"], la)
    torch.testing.assert_close(per_task["b"], torch.tensor(lb))
    torch.testing.assert_close(total, 2.0 * la + 0.5 * lb)


def test_task_without_labels_gives_zero_not_nan():
    logits = {"a": torch.randn(4, requires_grad=True)}
    total, per_task = multitask_loss(
        logits,
        torch.zeros(4, 1),
        torch.zeros(4, 1, dtype=torch.bool),
        torch.ones(4),
        [TaskSpec(name="a")],
    )
    assert total.item() == 0.0 and torch.isfinite(per_task["a"])
    total.backward()
    assert (logits["a"].grad == 0).all()


def test_label_smoothing():
    z, y, m, w = torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([True]), torch.ones(1)
    smoothed = task_loss(z, y, m, w, "bce", label_smoothing=0.2)
    torch.testing.assert_close(smoothed, F.binary_cross_entropy_with_logits(z, torch.tensor([0.9])))
    assert smoothed > task_loss(z, y, m, w, "bce")
    with pytest.raises(ValueError, match="unknown loss"):
        task_loss(z, y, m, w, "hinge")
